"""The reviewer's working day through AppTest (issue 12): state on screen, honesty, safe folders, the keyboard flow.

The keys themselves are pressed in tests/test_browser_app.py; here the same buttons are clicked.
"""

from __future__ import annotations

import csv
import io
import re

import pytest
from app_helpers import (
    APP_ENTRY,
    PHANTOM_PROVENANCE,
    make_checkpoint,
    make_results,
    make_review_folder,
    nih_pngs,
    rg1_bytes,
)
from streamlit.testing.v1 import AppTest

from medxray.labels import display_name
from medxray.review import ReviewStore
from medxray.review.settings import ENV_BACKEND, ENV_CHECKPOINT, ENV_LOGIN, ENV_MAX_UPLOAD_MB, ENV_RESULTS, ENV_REVIEWS

TIMEOUT = 120
PAGES = ("app_pages/study.py", "app_pages/worklist.py", "app_pages/model_card.py")


@pytest.fixture(scope="module")
def phantom_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "phantom.pt", provenance=PHANTOM_PROVENANCE)


@pytest.fixture
def env(monkeypatch, tmp_path, phantom_checkpoint):
    monkeypatch.setenv(ENV_CHECKPOINT, str(phantom_checkpoint))
    monkeypatch.setenv(ENV_REVIEWS, str(tmp_path / "reviews"))
    for name in (ENV_RESULTS, ENV_MAX_UPLOAD_MB, ENV_BACKEND, ENV_LOGIN):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _app() -> AppTest:
    return AppTest.from_file(str(APP_ENTRY), default_timeout=TIMEOUT).run()


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _texts(elements) -> str:
    """The texts as a reader sees them: md_escape's backslashes and word joiners (issue 19) removed."""
    return " | ".join(re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", str(e.value)).replace("\u2060", "") for e in elements)


def _key(widgets, prefix: str):
    return next(w for w in widgets if str(w.key).startswith(prefix))


def _cam_caption(at: AppTest) -> str:
    return next(c for im in at.image for c in im.captions if c.startswith("CAM: "))


def _findings(at: AppTest):
    return next(d.value for d in at.dataframe if {"finding", "probability", "name"} <= set(d.value.columns))


def _worklist(at: AppTest):
    return next(d for d in at.dataframe if str(d.key).startswith("worklist_table_")).value


def test_every_page_says_not_for_clinical_use_and_warns_of_a_phantom_model(env):
    at = _app()
    for page in PAGES:
        at.switch_page(page).run()
        _ok(at)
        assert "not for clinical use" in _texts(at.markdown)
        assert "synthetic phantom images" in _texts(at.warning), page
    card = next(
        d.value for d in at.dataframe if "field" in d.value.columns and "training images" in list(d.value["field"])
    )
    rows = dict(zip(card["field"], card["value"]))
    assert rows["training images"].startswith("SYNTHETIC") and rows["manifest hash"] == "f" * 64
    assert rows["images per split"] == "train 700, val 80, test 220"


def test_each_new_image_opens_on_its_own_top_finding(env):
    """Bug 1: after a second upload the control named one finding while the map showed another."""
    at = _app()
    at.file_uploader(key="upload").set_value(("RG1_UNCI.dcm", rg1_bytes(), "application/dicom")).run()
    first = _findings(at)
    other = first.loc[5, "finding"]
    _key(at.selectbox, "cam_finding_").set_value(other).run()  # the reviewer looks at a lower finding
    assert _cam_caption(at).startswith(f"CAM: {display_name(other)} (")
    png = nih_pngs(1)[0]
    at.file_uploader(key="upload").set_value((png.name, png.read_bytes(), "image/png")).run()
    _ok(at)
    second = _findings(at)
    top = second.loc[0, "finding"]
    control = _key(at.selectbox, "cam_finding_")
    assert control.value == top  # its own top finding, not the previous image's choice
    p = float(second.loc[0, "probability"])
    assert _cam_caption(at) == f"CAM: {display_name(top)} (p = {p:.3f}, threshold 0.50)"
    # readable names in the review labels, never snake_case
    labels = " ".join(r.label for r in at.radio if str(r.key).startswith("verdict_"))
    assert "Pleural thickening" in labels and "Pleural_Thickening" not in labels


def test_worklist_filters_reset_for_a_new_folder_and_match_the_rows(env, monkeypatch):
    """Bug 2: the Status filter kept the old folder's options and its chips disagreed with the rows."""
    root = env / "results"
    make_results(root / "night1")  # two ok rows + one error, inside night1/out
    make_review_folder(root / "night2", n_dicom=2, n_png=3)  # five ok + one error
    (root / "night2" / "results.csv").write_text(
        (root / "night2" / "results.csv").read_text().replace(",error,", ",ok,")
    )  # night2: every row ok
    monkeypatch.setenv(ENV_RESULTS, str(root))
    at = _app()
    at.switch_page("app_pages/worklist.py").run()
    _ok(at)
    choices = at.selectbox(key="results_choice").options
    n1 = next(c for c in choices if c.endswith("night1/out"))
    n2 = next(c for c in choices if c.endswith("night2"))
    at.selectbox(key="results_choice").set_value(n1).run()
    status = _key(at.multiselect, "wl_status_")
    assert status.options == ["error", "ok"] and status.value == ["error", "ok"] and len(_worklist(at)) == 3
    status.set_value(["error"]).run()
    assert list(_worklist(at)["status"]) == ["error"] and "1 of 3 images shown" in _texts(at.caption)
    assert _worklist(at).loc[0, "reason"] == "Not a DICOM file."  # a sentence, the code stays in the CSV
    at.selectbox(key="results_choice").set_value(n2).run()
    _ok(at)
    status = _key(at.multiselect, "wl_status_")
    table = _worklist(at)
    assert status.options == ["ok"] and status.value == ["ok"]  # the new folder's values, all chosen
    assert sorted(set(table["status"])) == status.value and len(table) == 6
    assert "6 of 6 images shown" in _texts(at.caption)


def test_results_folders_outside_the_roots_are_refused(env, monkeypatch):
    out, _ = make_results(env / "allowed")
    (env / "secret").mkdir()
    monkeypatch.setenv(ENV_RESULTS, str(out))
    at = _app()
    at.switch_page("app_pages/worklist.py").run()
    assert len(_worklist(at)) == 3
    at.text_input(key="results_typed").set_value(str(env / "secret")).run()
    _ok(at)
    assert "outside the results folders this app may open" in _texts(at.error)
    assert not any(str(d.key).startswith("worklist_table_") for d in at.dataframe)
    at.text_input(key="results_typed").set_value("/etc").run()
    assert "outside" in _texts(at.error)
    at.text_input(key="results_typed").set_value(str(out / "missing")).run()
    assert "does not exist" in _texts(at.error)


def test_keyboard_flow_buttons_verdicts_save_and_next_unreviewed(env, monkeypatch):
    out, rows = make_review_folder(env / "day", n_dicom=2, n_png=3)
    monkeypatch.setenv(ENV_RESULTS, str(out))
    at = _app()
    at.switch_page("app_pages/worklist.py").run()
    order = [int(r) for r, s in zip(_worklist(at)["row"], _worklist(at)["status"]) if s == "ok"]
    at.button(key="wl_start").click().run()  # N on the worklist: the first unreviewed study
    _ok(at)
    at.switch_page("app_pages/study.py")
    assert at.selectbox(key="study_row").value == order[0]
    assert at.query_params["study"] == rows[order[0]]["path"]  # the study's own URL
    at.button(key="nav_next").click().run()  # J
    assert at.selectbox(key="study_row").value == order[1]
    at.button(key="nav_prev").click().run()  # K
    assert at.selectbox(key="study_row").value == order[0]
    table = _findings(at)
    at.text_input(key="reviewer_name").set_value("Dr Keys").run()
    at.button(key="v_agree").click().run()  # A: the top finding, then the next becomes current
    assert _key(at.selectbox, "cam_finding_").value == table.loc[1, "finding"]
    assert _cam_caption(at).startswith(f"CAM: {display_name(table.loc[1, 'finding'])} (")
    at.button(key="v_disagree").click().run()  # D on the second
    at.button(key="f_next").click().run()  # Down: skip the third
    at.button(key="v_unsure").click().run()  # U on the fourth
    at.button(key="save_review").click().run()  # Ctrl+Enter
    _ok(at)
    assert "Opened the next unreviewed study" in _texts(at.success)
    assert at.selectbox(key="study_row").value == order[1]
    store = ReviewStore(env / "reviews")
    saved = list(store.latest_by_image().values())
    assert len(saved) == 1 and saved[0].reviewer == "Dr Keys"
    assert saved[0].verdicts == {
        table.loc[0, "finding"]: "agree",
        table.loc[1, "finding"]: "disagree",
        table.loc[3, "finding"]: "unsure",
    }
    assert saved[0].file_name == rows[order[0]]["path"].split("/")[-1]
    assert at.text_input(key="reviewer_name").value == "Dr Keys"  # kept for the next study
    export = list(csv.DictReader(io.StringIO(store.export_csv())))
    assert {r["file_name"] for r in export} == {saved[0].file_name}
    # N from here skips the reviewed study
    at.button(key="nav_unreviewed").click().run()
    assert at.selectbox(key="study_row").value == order[2]


def test_a_link_opens_its_study(env, monkeypatch):
    out, rows = make_review_folder(env / "day", n_dicom=1, n_png=2)
    monkeypatch.setenv(ENV_RESULTS, str(out))
    at = AppTest.from_file(str(APP_ENTRY), default_timeout=TIMEOUT)
    at.query_params["study"] = rows[2]["path"]
    at.run()
    _ok(at)
    assert at.radio(key="study_source").value == "From the results folder"
    assert at.selectbox(key="study_row").value == 2
    assert not at.error


def test_signed_in_reviewer_needs_no_name_box(env, monkeypatch):
    monkeypatch.setenv(ENV_LOGIN, "1")
    at = AppTest.from_file(str(APP_ENTRY), default_timeout=TIMEOUT)
    at.user = {"is_logged_in": True, "email": "rad@hospital.example", "name": "Dr Sign"}
    at.run()
    at.file_uploader(key="upload").set_value(("RG1_UNCI.dcm", rg1_bytes(), "application/dicom")).run()
    _ok(at)
    assert not any(t.key == "reviewer_name" for t in at.text_input)
    assert "Reviewer: **rad@hospital.example** (from the sign-in)" in _texts(at.caption)
    at.button(key="v_agree").click().run()
    at.button(key="save_review").click().run()
    rev = next(iter(ReviewStore(env / "reviews").latest_by_image().values()))
    assert (rev.reviewer, rev.identity_source) == ("rad@hospital.example", "sign-in")


def test_messages_carry_no_internal_codes(env):
    at = _app()
    at.file_uploader(key="upload").set_value(("cut.dcm", rg1_bytes()[:5000], "application/dicom")).run()
    _ok(at)
    text = _texts(at.error)
    assert "Cannot open this image" in text and not re.search(r"\b[a-z]+_[a-z_]+:", text), text
