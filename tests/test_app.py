"""Each app page driven through streamlit.testing.v1.AppTest (no browser)."""

from __future__ import annotations

import csv
import io
import re

import pytest
from app_helpers import APP_ENTRY, make_checkpoint, make_results, png_bytes, rg1_bytes, rg1_study_series
from streamlit.testing.v1 import AppTest

from medxray.labels import CHESTXRAY14_FINDINGS, display_name
from medxray.review import ReviewStore
from medxray.review.settings import ENV_BACKEND, ENV_CHECKPOINT, ENV_MAX_UPLOAD_MB, ENV_RESULTS, ENV_REVIEWS
from medxray.review.store import ImageKey

TIMEOUT = 120  # first run imports torch and loads the model on 2 shared CPU cores


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture
def env(monkeypatch, tmp_path, checkpoint):
    """A configured app: checkpoint, empty review folder; returns the folder paths."""
    monkeypatch.setenv(ENV_CHECKPOINT, str(checkpoint))
    monkeypatch.setenv(ENV_REVIEWS, str(tmp_path / "reviews"))
    monkeypatch.delenv(ENV_RESULTS, raising=False)
    monkeypatch.delenv(ENV_MAX_UPLOAD_MB, raising=False)
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    return tmp_path


def _app() -> AppTest:
    at = AppTest.from_file(str(APP_ENTRY), default_timeout=TIMEOUT)
    return at.run()


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _texts(elements) -> str:
    """The texts as a reader sees them: md_escape's backslashes and word joiners (issue 19) removed."""
    return " | ".join(re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", str(e.value)).replace("\u2060", "") for e in elements)


def _table(at: AppTest, *columns: str):
    """The first table that has these columns (plain st.dataframe elements carry no key)."""
    for d in at.dataframe:
        v = d.value
        if all(c in v.columns for c in columns):
            return v
    raise AssertionError(f"no table with columns {columns}")


def _findings(at: AppTest):
    return _table(at, "finding", "probability", "threshold", "positive")


def _by_prefix(widgets, prefix: str):
    return next(w for w in widgets if str(w.key).startswith(prefix))


def _worklist(at: AppTest):
    return next(d for d in at.dataframe if str(d.key).startswith("worklist_table_")).value


def _cam_finding(at: AppTest) -> str:
    return _by_prefix(at.selectbox, "cam_finding_").value


def _cam_caption(at: AppTest) -> str:
    return next(c for im in at.image for c in im.captions if c.startswith("CAM: "))


def _upload(at: AppTest, name: str, data: bytes, mime: str = "application/octet-stream") -> AppTest:
    at.file_uploader(key="upload").set_value((name, data, mime))
    return at.run()


def test_without_checkpoint_every_page_explains_how_to_make_one(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_CHECKPOINT, raising=False)
    monkeypatch.delenv(ENV_RESULTS, raising=False)
    monkeypatch.setenv(ENV_REVIEWS, str(tmp_path / "r"))
    at = _app()
    _ok(at)
    assert "make demo" in _texts(at.info) and "medxray finetune" in _texts(at.info)
    _upload(at, "x.png", png_bytes(), "image/png")  # viewing still works, just no predictions
    _ok(at)
    assert len(at.image) == 1 and not at.error
    at.switch_page("app_pages/worklist.py").run()
    _ok(at)
    assert "score-dicom" in _texts(at.info)
    at.switch_page("app_pages/model_card.py").run()
    _ok(at)
    assert "make demo" in _texts(at.info) and "not for clinical use" in _texts(at.error)


def test_pages_are_found_with_a_relative_script_path(monkeypatch, tmp_path):
    """``AppTest.from_file("app/medxray_app.py")`` typed at a prompt or in ``python -c`` (caller file "<stdin>").

    AppTest then runs the script under a relative path; pages resolved from an unresolved
    ``Path(__file__).parent`` would be looked up at app/app/app_pages/ and not be found.
    """
    monkeypatch.delenv(ENV_CHECKPOINT, raising=False)
    monkeypatch.delenv(ENV_RESULTS, raising=False)
    monkeypatch.setenv(ENV_REVIEWS, str(tmp_path / "r"))
    monkeypatch.chdir(APP_ENTRY.parents[1])
    scope = {"AppTest": AppTest, "TIMEOUT": TIMEOUT}
    exec(compile('at = AppTest.from_file("app/medxray_app.py", default_timeout=TIMEOUT)', "<stdin>", "exec"), scope)
    at = scope["at"].run()
    _ok(at)
    assert at.title and at.title[0].value == "Study"
    at.switch_page("app_pages/model_card.py").run()
    _ok(at)
    assert at.title and at.title[0].value == "Model card"


def test_missing_checkpoint_file_is_a_message_not_a_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_CHECKPOINT, str(tmp_path / "nope.pt"))
    monkeypatch.setenv(ENV_REVIEWS, str(tmp_path / "r"))
    at = _app()
    _ok(at)
    assert "does not exist" in _texts(at.error)


def test_study_dicom_predictions_thresholds_and_cam(env):
    at = _app()
    _ok(at)
    _upload(at, "RG1_UNCI.dcm", rg1_bytes())
    _ok(at)
    assert not at.error, _texts(at.error)
    table = _findings(at)
    assert sorted(table["finding"]) == sorted(CHESTXRAY14_FINDINGS)
    assert table["probability"].between(0, 1).all()
    # original + CAM overlay + probability chart
    assert len(at.image) == 3
    top = table.loc[0, "finding"]
    assert _cam_caption(at).startswith(f"CAM: {display_name(top)} (p = ") and _cam_finding(at) == top
    # window/level controls come from the file's default window
    wc = next(s for s in at.slider if s.key.startswith("wc_"))
    assert wc.value == pytest.approx(15000.0)
    before = at.image[0].value
    wc.set_value(12000.0).run()
    _ok(at)
    assert at.image[0].value != before  # the original is re-windowed from the raw values
    assert "center 12000" in at.image[0].captions[0]
    assert _findings(at)["probability"].tolist() == table["probability"].tolist()  # the model's view is unchanged
    # another finding's CAM, opacity, then switch the overlay off
    other = table.loc[3, "finding"]
    _by_prefix(at.selectbox, "cam_finding_").set_value(other).run()
    at.slider(key="cam_alpha").set_value(0.8).run()
    _ok(at)
    assert _cam_caption(at).startswith(f"CAM: {display_name(other)}")
    at.toggle(key="cam_on").set_value(False).run()
    _ok(at)
    assert len(at.image) == 2
    # thresholds in the sidebar change what is positive
    at.slider(key=f"thr_{top}").set_value(1.0).run()
    t2 = _findings(at)
    assert not bool(t2.set_index("finding").loc[top, "positive"])
    assert t2.set_index("finding").loc[top, "threshold"] == pytest.approx(1.0)
    for n in CHESTXRAY14_FINDINGS:
        if n != top:
            at.slider(key=f"thr_{n}").set_value(0.0)
    at.run()
    t3 = _findings(at).set_index("finding")
    assert t3["positive"].sum() == len(CHESTXRAY14_FINDINGS) - 1
    at.button(key="thresholds_reset").click().run()
    t4 = _findings(at).set_index("finding")
    assert (t4["threshold"] == 0.5).all()


def test_lateral_and_ap_views_warn(env, tmp_path):
    from app_helpers import dicom_copy

    p = dicom_copy(tmp_path / "lat.dcm", sop_uid="1.2.3.4.5", view="LL")
    at = _app()
    _upload(at, "lat.dcm", p.read_bytes())
    _ok(at)
    assert "lateral view" in _texts(at.warning)
    p = dicom_copy(tmp_path / "ap.dcm", sop_uid="1.2.3.4.6", view="AP", modality="MR")
    _upload(at, "ap.dcm", p.read_bytes())
    assert "AP view" in _texts(at.warning) and "unexpected modality MR" in _texts(at.warning)


def test_bad_uploads_show_a_message_and_the_app_keeps_working(env, monkeypatch):
    monkeypatch.setenv(ENV_MAX_UPLOAD_MB, "1")
    at = _app()
    _upload(at, "RG1_UNCI.dcm", rg1_bytes())  # 7 MB > 1 MB limit
    _ok(at)
    assert "upload limit" in _texts(at.error)
    _upload(at, "notes.txt", b"just some text\n" * 20, "text/plain")
    _ok(at)
    assert "not a DICOM, PNG or JPEG" in _texts(at.error)
    data = rg1_bytes()
    monkeypatch.setenv(ENV_MAX_UPLOAD_MB, "64")
    at = _app()  # a restarted app with a larger limit
    _upload(at, "cut.dcm", data[:5000])
    _ok(at)
    assert "Cannot open this image" in _texts(at.error)
    assert not any("Traceback" in e.value for e in at.error)
    _upload(at, "fine.png", png_bytes(), "image/png")
    _ok(at)
    assert not at.error and len(_findings(at)) == 14


def test_save_review_then_export(env):
    at = _app()
    _upload(at, "RG1_UNCI.dcm", rg1_bytes())
    table = _findings(at)
    top, second = table.loc[0, "finding"], table.loc[1, "finding"]
    # saving without a name is refused, nothing is stored
    at.radio(key=next(r.key for r in at.radio if r.key.endswith(f"_{top}"))).set_value("agree")
    at.button(key="save_review").click().run()
    _ok(at)
    assert "reviewer" in _texts(at.error)
    store = ReviewStore(env / "reviews")
    assert store.count() == 0
    at.text_input(key="reviewer_name").set_value("Dr Test")
    at.radio(key=next(r.key for r in at.radio if r.key.endswith(f"_{top}"))).set_value("agree")
    at.radio(key=next(r.key for r in at.radio if r.key.endswith(f"_{second}"))).set_value("disagree")
    at.text_area(key=next(t.key for t in at.text_area if t.key.startswith("note_"))).set_value("looks fine")
    at.button(key="save_review").click().run()
    _ok(at)
    assert "Review saved" in _texts(at.success)
    review = store.latest("/".join((*rg1_study_series(), "1.3.6.1.4.1.5962.1.1.9.1.3.20040826185059.5457")))
    assert review is not None and review.reviewer == "Dr Test" and review.note == "looks fine"
    assert review.verdicts == {top: "agree", second: "disagree"}
    assert review.model_version == "test-random-v1" and review.file_name == "RG1_UNCI.dcm"
    assert review.findings[top].probability == pytest.approx(float(table.loc[0, "probability"]), abs=1e-6)
    # the form shows the stored review on the next visit (a new session = restart of the browser tab)
    at2 = _app()
    _upload(at2, "RG1_UNCI.dcm", rg1_bytes())
    assert "Last reviewed by Dr Test" in _texts(at2.caption)
    assert next(r for r in at2.radio if r.key.endswith(f"_{top}")).value == "agree"
    # export: the download button serves the store's CSV
    labels = [b.label for b in at2.get("download_button")]
    assert "Export reviews (CSV)" in labels and "Export review history (CSV)" in labels
    rows = list(csv.DictReader(io.StringIO(store.export_csv())))
    assert {(r["finding"], r["verdict"], r["reviewer"]) for r in rows} == {
        (top, "agree", "Dr Test"),
        (second, "disagree", "Dr Test"),
    }


def test_worklist_filters_shows_review_state_and_opens_study(env, monkeypatch):
    out, uids = make_results(env / "scored")
    monkeypatch.setenv(ENV_RESULTS, str(out))
    ReviewStore(env / "reviews").save(
        ImageKey.from_uids(*rg1_study_series(), uids[1]), {"Mass": "agree"}, reviewer="Dr B"
    )
    at = _app()
    at.switch_page("app_pages/worklist.py").run()
    _ok(at)
    table = _worklist(at)
    assert list(table["file"]) == ["first.dcm", "second.dcm", "broken.dcm"]  # sorted by max probability
    assert list(table["reviewed"]) == [False, True, False]
    assert table.loc[0, "top_finding"] == "Effusion" and table.loc[2, "status"] == "error"
    _by_prefix(at.selectbox, "wl_reviewed_").set_value("not reviewed").run()
    table = _worklist(at)
    assert list(table["file"]) == ["first.dcm", "broken.dcm"]
    _by_prefix(at.selectbox, "wl_reviewed_").set_value("all")
    _by_prefix(at.selectbox, "wl_finding_").set_value("Mass")
    _by_prefix(at.selectbox, "wl_sort_").set_value("finding_probability").run()
    table = _worklist(at)
    assert list(table["file"][:2]) == ["second.dcm", "first.dcm"] and "p_Mass" in table.columns
    # choosing a row opens it on the Study page
    key = next(d.key for d in at.dataframe if str(d.key).startswith("worklist_table_"))
    at.session_state[key] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    _ok(at)
    assert at.radio(key="study_source").value == "From the results folder"
    assert at.selectbox(key="study_row").value == 1  # results.csv row of second.dcm
    assert len(_findings(at)) == 14
    assert "AP view" in _texts(at.warning)


def test_model_card_from_checkpoint_metadata(env):
    at = _app()
    at.switch_page("app_pages/model_card.py").run()
    _ok(at)
    assert "not for clinical use" in _texts(at.error)
    summary = _table(at, "field", "value")
    s = dict(zip(summary["field"], summary["value"]))
    assert s["architecture"] == "densenet121" and s["model version"] == "test-random-v1"
    per_finding = _table(at, "finding", "test_auroc", "val_auroc").set_index("finding")
    assert "Pleural thickening" in per_finding.index
    assert per_finding.loc["Effusion", "test_auroc"] == "0.710 (0.650-0.770)"
    assert per_finding.loc["Mass", "val_auroc"] == "0.604" and len(per_finding) == 14
    overall = _table(at, "metric", "value (95% CI)")
    assert dict(zip(overall["metric"], overall["value (95% CI)"])) == {"val_mean_auroc": "0.610"}
    thr = _table(at, "finding", "threshold", "how chosen")
    assert len(thr) == 14 and (thr["threshold"] == 0.5).all()
    assert "Intended use" in _texts(at.subheader) and "Limitations" in _texts(at.subheader)
    # no boxes were ever scored for this checkpoint: localisation says so in words, never a number
    loc = _table(at, "finding", "pointing game", "boxes", "data")
    assert len(loc) == 14 and (loc["pointing game"] == "not measured").all() and (loc["boxes"] == "0").all()


def test_worklist_on_a_real_score_dicom_folder_without_a_model(monkeypatch, tmp_path, checkpoint):
    """Integration with the batch scorer: its results.csv, run.json and stored CAM overlays."""
    from app_helpers import dicom_copy

    from medxray.scoring import ScoreConfig, score_directory

    inp = tmp_path / "input"
    dicom_copy(inp / "ward" / "one.dcm", sop_uid="1.2.826.0.1.3680043.8.498.2001")
    dicom_copy(inp / "two.dcm", sop_uid="1.2.826.0.1.3680043.8.498.2002", view="AP")
    (inp / "junk.dcm").write_bytes(b"not dicom at all")
    out = tmp_path / "out"
    summary = score_directory(
        ScoreConfig(
            input_dir=inp,
            checkpoint=checkpoint,
            out=out,
            workers=1,
            cams="all",
            progress=False,
            overlay_max_side=256,
            backend="torch",
            precision="fp32",
        )
    )
    assert (summary.ok, summary.error) == (2, 1)
    monkeypatch.delenv(ENV_CHECKPOINT, raising=False)  # reviewing stored results needs no model
    monkeypatch.setenv(ENV_RESULTS, str(out))
    monkeypatch.setenv(ENV_REVIEWS, str(tmp_path / "reviews"))
    at = _app()
    at.switch_page("app_pages/worklist.py").run()
    _ok(at)
    table = _worklist(at)
    assert sorted(table["file"]) == ["junk.dcm", "one.dcm", "two.dcm"]
    assert sorted(table["status"]) == ["error", "ok", "ok"] and not table["reviewed"].any()
    row = int(table.index[table["file"] == "two.dcm"][0])
    key = next(d.key for d in at.dataframe if str(d.key).startswith("worklist_table_"))
    at.session_state[key] = {"selection": {"rows": [row], "columns": [], "cells": []}}
    at.run()
    _ok(at)
    assert not at.error, _texts(at.error)
    findings = _findings(at)
    assert len(findings) == 14 and "stored results" in _texts(at.caption)
    assert any(c.startswith("CAM: ") for im in at.image for c in im.captions)  # score-dicom's overlay PNG
    assert "AP view" in _texts(at.warning)
    # AppTest keeps requesting the page last named in switch_page(); a browser follows st.switch_page
    # to the Study URL. Name the page we are on so the next runs stay here, as they would in a browser.
    at.switch_page("app_pages/study.py")
    # a review saved here shows up in the worklist
    at.text_input(key="reviewer_name").set_value("Dr W")
    top = findings.loc[0, "finding"]
    at.radio(key=next(r.key for r in at.radio if r.key.endswith(f"_{top}"))).set_value("unsure")
    at.button(key="save_review").click().run()
    assert "Review saved" in _texts(at.success)
    at.switch_page("app_pages/worklist.py").run()
    table = _worklist(at)
    assert (
        table.set_index("file").loc["two.dcm", "reviewed"]
        and table.set_index("file").loc["two.dcm", "reviewer"] == "Dr W"
    )
