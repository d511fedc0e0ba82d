"""App logic without Streamlit: loading uploads, tables, warnings, worklist, model card, launch command."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medxray.errors import CheckpointError, DataError, MedxrayError
from medxray.labels import CHESTXRAY14_FINDINGS
from medxray.review import ImageKey, ReviewStore
from medxray.review.model_card import metrics_overview, metrics_table, model_card
from medxray.review.settings import (
    DEFAULT_MAX_UPLOAD_MB,
    ENV_CHECKPOINT,
    ENV_MAX_UPLOAD_MB,
    ENV_RESULTS,
    AppSettings,
    check_app_settings,
    streamlit_command,
    user_message,
)
from medxray.review.study import (
    DISPLAY_MAX_SIDE,
    StudyImage,
    display_image,
    distribution_warnings,
    findings_table,
    load_study_bytes,
    load_study_file,
    probability_figure,
    safe_metadata_table,
    sniff_kind,
    window_range,
)
from medxray.review.worklist import (
    filter_worklist,
    load_results,
    resolve_result_path,
    result_label_names,
    results_input_root,
    stored_cam_path,
    worklist_table,
)


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _chest_like(h: int = 300, w: int = 280, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.5 + 0.3 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + rng.normal(0, 0.05, (h, w))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


# -- settings and launch -------------------------------------------------------------------------


def test_settings_roundtrip_through_environment(tmp_path):
    cfg = AppSettings(
        checkpoint=tmp_path / "c.pt",
        results=(tmp_path / "out", tmp_path / "b"),
        reviews=tmp_path / "rev",
        max_upload_mb=5,
        identity_header="X-Forwarded-User",
    )
    again = AppSettings.from_env(cfg.to_env())
    assert again == cfg and again.max_upload_bytes == 5 * 2**20 and again.results == (tmp_path / "out", tmp_path / "b")
    empty = AppSettings.from_env({ENV_MAX_UPLOAD_MB: "lots"})
    assert empty.checkpoint is None and empty.results == ()
    assert empty.max_upload_mb == DEFAULT_MAX_UPLOAD_MB
    assert AppSettings(max_upload_mb=1.2).max_upload_mb == 2  # whole MB, as the uploader states it


def test_streamlit_command_binds_localhost_and_passes_settings(tmp_path):
    cfg = AppSettings(checkpoint=tmp_path / "c.pt", reviews=tmp_path / "rev", max_upload_mb=10)
    argv, env = streamlit_command(cfg, port=8765)
    assert argv[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert argv[4].endswith("app/medxray_app.py")
    opts = dict(zip(argv[5::2], argv[6::2]))
    assert opts["--server.address"] == "127.0.0.1" and opts["--server.port"] == "8765"
    assert opts["--browser.gatherUsageStats"] == "false" and opts["--client.toolbarMode"] == "minimal"
    assert int(opts["--server.maxUploadSize"]) == 10  # one limit: the uploader states the app's own
    assert env[ENV_CHECKPOINT] == str(tmp_path / "c.pt") and ENV_RESULTS not in env


def test_check_app_settings_fails_fast_with_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="make demo"):
        check_app_settings(AppSettings(checkpoint=tmp_path / "none.pt", reviews=tmp_path / "r"))
    with pytest.raises(DataError, match="score-dicom"):
        check_app_settings(AppSettings(results=tmp_path / "nope", reviews=tmp_path / "r"))
    check_app_settings(AppSettings(reviews=tmp_path / "r"))
    assert (tmp_path / "r" / "reviews.sqlite3").is_file()


def test_cli_app_refuses_missing_checkpoint_without_traceback(tmp_path, capsys):
    from medxray.cli import main

    rc = main(["app", "--checkpoint", str(tmp_path / "missing.pt"), "--reviews", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and "Traceback" not in err


# -- loading -------------------------------------------------------------------------------------


def test_png_8bit_and_16bit_scale_by_bit_depth():
    arr8 = _chest_like()
    s8 = load_study_bytes(_png(arr8), "x.png")
    assert s8.kind == "png" and s8.pixels.dtype == np.float32 and s8.shape == arr8.shape
    np.testing.assert_allclose(s8.pixels, arr8 / 255.0, atol=1e-6)
    assert s8.key.kind == "sha256" and s8.key.value == s8.sha256 and not s8.warnings
    arr16 = arr8.astype(np.uint16) * 257
    s16 = load_study_bytes(_png(arr16), "x16.png")
    np.testing.assert_allclose(s16.pixels, arr16 / 65535.0, atol=1e-6)


def test_jpeg_and_colour_images_become_grayscale_with_a_warning():
    g = _chest_like()
    sj = load_study_bytes(_jpeg(g), "x.jpg")
    assert sj.kind == "jpeg" and sj.pixels.ndim == 2
    assert np.abs(sj.pixels - g / 255.0).mean() < 0.02
    rgb = np.stack([g, g // 2, 255 - g], axis=-1)
    sc = load_study_bytes(_png(rgb), "colour.png")
    assert sc.pixels.ndim == 2 and any("colour" in w for w in sc.warnings)


@pytest.mark.parametrize(
    "data, name, match",
    [
        (b"hello, not an image" * 10, "notes.txt", "not a DICOM, PNG or JPEG"),
        (b"", "empty.png", "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "broken.png", "cannot be decoded"),
        (b"\xff\xd8\xff\xe0" + b"\x13" * 40, "broken.jpg", "cannot be decoded"),
    ],
)
def test_bad_uploads_raise_one_clear_error(data, name, match):
    with pytest.raises(DataError, match=match):
        load_study_bytes(data, name)


def test_oversized_upload_is_refused_before_decoding():
    data = _png(_chest_like())
    with pytest.raises(DataError, match="upload limit"):
        load_study_bytes(data, "big.png", max_bytes=len(data) - 1)


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr("medxray.review.study.MAX_PIXELS", 1000)
    with pytest.raises(DataError, match="megapixels"):
        load_study_bytes(_png(_chest_like(50, 40)), "bomb.png")


def test_load_study_file_missing_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no longer exists"):
        load_study_file(tmp_path / "gone.dcm")


def test_sniffing_uses_content_not_extension():
    assert sniff_kind(b"\x00" * 128 + b"DICM" + b"\x00" * 10, "noext") == "dicom"
    assert sniff_kind(_png(_chest_like(8, 8)), "looks.dcm") == "png"
    assert sniff_kind(b"random", "scan.DCM") == "dicom"  # preamble-less DICOM: read_dicom decides
    assert sniff_kind(b"random", "scan.bin") is None


# -- windowing and display -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rg1_bytes() -> bytes:
    from pydicom.data import get_testdata_file

    return open(get_testdata_file("RG1_UNCI.dcm"), "rb").read()


def test_real_dicom_is_keyed_by_uid_and_shows_no_phi(rg1_bytes):
    s = load_study_bytes(rg1_bytes, "RG1_UNCI.dcm")
    assert s.kind == "dicom" and s.shape == (1955, 1841) and s.pixels.dtype == np.float32
    assert s.key.kind == "study_series_sop" and s.key.value.startswith("1.3.6.1.4.1.5962")
    assert s.key.value.endswith("/" + s.meta["sop_instance_uid"])
    assert s.window is not None and s.raw is not None and s.raw.shape == s.shape
    table = safe_metadata_table(s)
    text = table.to_string()
    assert "CompressedSamples" not in text and "RG1" not in text  # the patient name of the test file
    assert dict(zip(table["field"], table["value"]))["modality"] == "CR"
    assert distribution_warnings(s, image_size=224) == []  # an adult PA chest CR: nothing to warn about


def test_dicom_display_rewindows_from_raw_values(rg1_bytes):
    s = load_study_bytes(rg1_bytes, "RG1_UNCI.dcm")
    default = display_image(s, None)
    assert max(default.shape) == DISPLAY_MAX_SIDE
    same = display_image(s, s.window)
    assert np.abs(same - default).mean() < 0.01  # the default window reproduces the decoder's image
    lo, hi = window_range(s)
    narrow = display_image(s, ((lo + hi) / 2, (hi - lo) / 20))
    assert np.abs(narrow - default).mean() > 0.05
    # MONOCHROME1: higher raw values are darker on screen, so a window above everything is all white
    assert display_image(s, (hi + 10 * (hi - lo), 1.0)).min() == pytest.approx(1.0)


def test_broken_dicom_is_a_clear_dicom_error(rg1_bytes):
    from medxray.errors import DicomError

    with pytest.raises(DicomError):
        load_study_bytes(rg1_bytes[: len(rg1_bytes) // 2], "cut.dcm")
    with pytest.raises(MedxrayError):
        load_study_bytes(b"\x00" * 128 + b"DICM" + b"garbage" * 20, "junk.dcm")


# -- findings ------------------------------------------------------------------------------------


def test_findings_table_follows_thresholds_and_sorts():
    labels = ["A", "B", "C"]
    t = findings_table(labels, [0.2, 0.9, 0.5], {"A": 0.1, "B": 0.95, "C": 0.5})
    assert list(t["finding"]) == ["B", "C", "A"]
    assert dict(zip(t["finding"], t["positive"])) == {"A": True, "B": False, "C": True}
    with pytest.raises(ValueError):
        findings_table(labels, [0.1], {})


def test_probability_figure_marks_every_threshold():
    t = findings_table(list(CHESTXRAY14_FINDINGS), np.linspace(0, 1, 14), {})
    fig = probability_figure(t)
    ax = fig.axes[0]
    assert len(ax.patches) == 14 and len(ax.lines) == 14
    assert all(line.get_xdata()[0] == pytest.approx(0.5) for line in ax.lines)


# -- warnings ------------------------------------------------------------------------------------


def _study(pixels, **meta):
    return StudyImage(
        pixels=pixels.astype(np.float32),
        kind="dicom",
        key=ImageKey("1", "sop_instance_uid"),
        sha256="0" * 64,
        meta=meta,
    )


def test_distribution_warnings():
    rng = np.random.default_rng(0)
    good = rng.uniform(0.2, 0.8, (1024, 1024))
    assert (
        distribution_warnings(_study(good, modality="CR", view_position="PA", body_part="CHEST"), image_size=224) == []
    )
    w = distribution_warnings(_study(good, modality="MR", view_position="LL", body_part="KNEE"))
    assert any(x.startswith("lateral view") for x in w)
    assert any("modality MR" in x for x in w) and any("body part KNEE" in x for x in w)
    assert any(x.startswith("AP view") for x in distribution_warnings(_study(good, view_position="AP")))
    small = distribution_warnings(_study(rng.uniform(0.2, 0.8, (120, 400))))
    assert any("small image" in x for x in small) and any("unusual shape" in x for x in small)
    dark = distribution_warnings(_study(np.full((512, 512), 0.02)))
    assert any("brightness" in x for x in dark) and any("low contrast" in x for x in dark)


# -- worklist ------------------------------------------------------------------------------------


def _results(tmp_path, labels=("Effusion", "Mass", "Nodule")):
    imgs = tmp_path / "in"
    imgs.mkdir()
    (imgs / "a.dcm").write_bytes(b"a")
    (imgs / "b.dcm").write_bytes(b"b")
    (imgs / "c.png").write_bytes(b"png-bytes")
    out = tmp_path / "out"
    out.mkdir()
    rows = [
        {
            "path": str(imgs / "a.dcm"),
            "status": "ok",
            "reason": "",
            "sop_instance_uid": "1.2.3",
            "study_instance_uid": "1.2",
            "series_instance_uid": "1.2.1",
            "modality": "CR",
            "view_position": "PA",
            **{f"p_{n}": p for n, p in zip(labels, (0.9, 0.1, 0.3))},
        },
        {
            "path": str(imgs / "b.dcm"),
            "status": "error",
            "reason": "not a DICOM file",
            "sop_instance_uid": "",
            "modality": "",
            "view_position": "",
            **{f"p_{n}": "" for n in labels},
        },
        {
            "path": "c.png",
            "status": "ok",
            "reason": "",
            "sop_instance_uid": "",
            "modality": "",
            "view_position": "AP",
            **{f"p_{n}": p for n, p in zip(labels, (0.2, 0.7, 0.6))},
        },
    ]
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    (out / "run.json").write_text(f'{{"input": "{imgs}"}}')  # rows name files under the run's INPUT_DIR (or OUT)
    return out


def test_worklist_table_review_state_and_filters(tmp_path):
    out = _results(tmp_path)
    res = load_results(out)
    assert result_label_names(res) == ["Effusion", "Mass", "Nodule"]
    store = ReviewStore(tmp_path / "rev")
    store.save(ImageKey.from_uids("1.2", "1.2.1", "1.2.3"), {"Effusion": "agree"}, reviewer="Dr A")
    thr = {"Effusion": 0.5, "Mass": 0.5, "Nodule": 0.5}
    t = worklist_table(res, out, thr, store.latest_by_image())
    assert list(t["file"]) == ["a.dcm", "b.dcm", "c.png"]
    assert list(t["reviewed"]) == [True, False, False] and t.loc[0, "reviewer"] == "Dr A"
    assert list(t["top_finding"]) == ["Effusion", "", "Mass"]
    assert (
        t.loc[2, "positive_findings"] == "Mass; Nodule"
        and t.loc[2, "image_key"] == ImageKey.from_bytes(b"png-bytes").value
    )  # no UID: keyed by file hash, found under the run's INPUT_DIR
    assert t.loc[0, "review_summary"] == "Effusion: agree"
    # thresholds in use change what is positive
    t2 = worklist_table(res, out, {**thr, "Nodule": 0.65}, {})
    assert t2.loc[2, "positive_findings"] == "Mass"

    f = filter_worklist(t, statuses=["ok"], reviewed="not reviewed")
    assert list(f["file"]) == ["c.png"]
    f = filter_worklist(t, finding="Nodule", sort_by="finding_probability")
    assert list(f["file"][:2]) == ["c.png", "a.dcm"]
    f = filter_worklist(t, finding="Effusion", positive_only=True)
    assert list(f["file"]) == ["a.dcm"]
    assert list(filter_worklist(t, search="C.P")["file"]) == ["c.png"]
    assert list(filter_worklist(t, sort_by="file", descending=True)["file"]) == ["c.png", "b.dcm", "a.dcm"]


def test_load_results_errors(tmp_path):
    with pytest.raises(DataError, match="score-dicom"):
        load_results(tmp_path)
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="path/status"):
        load_results(tmp_path)


# -- model card ----------------------------------------------------------------------------------


def test_metrics_table_reads_several_layouts():
    m = metrics_table(
        {
            "test": {
                "auroc": {"Mass": 0.8, "Edema": 0.9},
                "auroc_ci": {"Mass": [0.7, 0.88]},
                "mean_auroc": 0.85,
                "mean_auroc_ci": [0.8, 0.9],
            },
            "val": {"auprc": {"Mass": {"value": 0.4, "ci_low": 0.3, "ci_high": 0.5}}},
        }
    )
    rows = {(r.scope, r.finding, r.metric): (r.value, r.ci_low, r.ci_high) for r in m.itertuples()}
    assert rows[("test", "Mass", "auroc")] == (0.8, 0.7, 0.88)
    assert rows[("test", "Edema", "auroc")][0] == 0.9 and np.isnan(rows[("test", "Edema", "auroc")][1])
    assert rows[("test", "(overall)", "mean_auroc")] == (0.85, 0.8, 0.9)
    assert rows[("val", "Mass", "auprc")] == (0.4, 0.3, 0.5)
    overall, per = metrics_overview(m)
    assert dict(zip(overall["metric"], overall["value (95% CI)"])) == {"test/mean_auroc": "0.850 (0.800-0.900)"}
    per = per.set_index("finding")
    assert per.loc["Mass", "test/auroc"] == "0.800 (0.700-0.880)" and per.loc["Edema", "test/auroc"] == "0.900"
    assert per.loc["Mass", "val/auprc"] == "0.400 (0.300-0.500)"


def test_model_card_from_metadata():
    from medxray.data.transforms import preprocessing_config

    meta = {
        "architecture": "densenet121",
        "label_names": ["Mass", "Edema"],
        "pretrained": "imagenet",
        "preprocessing": preprocessing_config(224),
        "thresholds": {"Mass": 0.3},
        "dataset": "chestxray14",
        "metrics": {"test": {"auroc": {"Mass": 0.8}}},
        "model_version": "v1",
        "versions": {"torch": "2.x"},
    }
    card = model_card(meta, checkpoint_path="/x/c.pt")
    s = dict(zip(card.summary["field"], card.summary["value"]))
    assert s["architecture"] == "densenet121" and s["initialisation"] == "imagenet"
    assert dict(zip(card.training["field"], card.training["value"]))["dataset"] == "chestxray14"
    assert dict(zip(card.thresholds["finding"], card.thresholds["threshold"])) == {"Mass": 0.3, "Edema": 0.5}
    assert len(card.metrics) == 1 and "not for clinical use" in card.not_for_clinical_use
    bare = model_card({"architecture": "x", "label_names": []})
    assert any("records no evaluation metrics" in x for x in bare.limitations)
    names = model_card({"architecture": "x", "label_names": ["Pleural_Thickening"]}).thresholds["finding"]
    assert list(names) == ["Pleural thickening"]


def test_model_card_localisation_per_finding_or_not_measured():
    from medxray.review.model_card import NOT_MEASURED, localisation_table

    meta = {
        "label_names": ["Mass", "Edema", "Pleural_Thickening"],
        "metrics": {"test_auroc": {"Mass": 0.91, "Edema": 0.8}},
        "localisation": {
            "method": "gradcam-denseblock3",
            "split": "test",
            "source": "real",
            "per_finding": {
                "Mass": {
                    "n_boxes": 85,
                    "pointing_game": 0.42,
                    "mean_iobb": 0.3,
                    "iobb_accuracy": {"0.1": 0.7, "0.25": 0.5, "0.5": 0.2},
                }
            },
        },
    }
    table, note = localisation_table(meta)
    rows = table.set_index("finding")
    assert rows.loc["Mass"].to_dict() == {
        "AUROC": "0.910",
        "pointing game": "0.42",
        "IoBB>0.1": "0.70",
        "IoBB>0.25": "0.50",
        "IoBB>0.5": "0.20",
        "boxes": "85",
        "data": "real",
    }
    assert rows.loc["Edema", "AUROC"] == "0.800" and rows.loc["Edema", "pointing game"] == NOT_MEASURED
    assert rows.loc["Pleural thickening", "AUROC"] == "not evaluated"
    assert "gradcam-denseblock3" in note and "test" in note
    _, none_note = localisation_table({"label_names": ["Mass"]})
    assert "not measured" in none_note.lower()
    phantom = {**meta, "localisation": {**meta["localisation"], "source": "phantom"}}
    assert "phantom" in localisation_table(phantom)[1] and localisation_table(phantom)[0]["data"][0] == "phantom"


def test_user_message_never_dumps_a_traceback():
    assert user_message(DataError("bad file; try another")) == "bad file; try another"
    msg = user_message(RuntimeError("x\nline two"))
    assert "RuntimeError" in msg and "line two" not in msg
    assert issubclass(DataError, MedxrayError)


def test_results_paths_resolve_against_the_runs_input_folder(tmp_path):
    import json

    out, inp = tmp_path / "out", tmp_path / "elsewhere" / "input"
    (inp / "ward").mkdir(parents=True)
    (inp / "ward" / "x.dcm").write_bytes(b"x")
    out.mkdir()
    assert results_input_root(out) is None
    (out / "run.json").write_text(json.dumps({"input": str(inp), "complete": True}))
    assert results_input_root(out) == inp
    assert resolve_result_path(out, "ward/x.dcm") == (inp / "ward" / "x.dcm").resolve()
    with pytest.raises(DataError, match="outside"):  # issue 19 item 7: paths from results.csv stay under their roots
        resolve_result_path(out, "/abs/y.dcm")
    assert (
        stored_cam_path(out, {"cam_dir": "cams/ward__x", "path": "ward/x.dcm"}, "Mass")
        == (out / "cams" / "ward__x" / "Mass.png").resolve()
    )
    from medxray.scoring import output_stem

    assert (
        stored_cam_path(out, {"cam_dir": "", "path": "ward/x.dcm"}, "Mass")
        == (out / "cams" / output_stem("ward/x.dcm") / "Mass.png").resolve()
    )


# -- issue 12: results roots, identity, messages, names, viewing, checkpoint refusal -------------


def test_results_folders_only_inside_the_configured_roots(tmp_path):
    from medxray.review.settings import allowed_results_folder

    root, other = tmp_path / "results", tmp_path / "private"
    (root / "night1").mkdir(parents=True)
    other.mkdir()
    (root / "escape").symlink_to(other, target_is_directory=True)
    assert allowed_results_folder("", [root]) == root.resolve()
    assert allowed_results_folder("night1", [root]) == (root / "night1").resolve()
    assert allowed_results_folder(str(root / "night1"), [root]) == (root / "night1").resolve()
    for outside in (str(other), "/etc", str(root / ".." / "private"), str(root / "escape")):
        with pytest.raises(DataError, match="outside the results folders"):
            allowed_results_folder(outside, [root])
    with pytest.raises(DataError, match="does not exist"):
        allowed_results_folder("night2", [root])
    with pytest.raises(DataError, match="started without a results folder"):
        allowed_results_folder(str(root), [])


def test_reviewer_identity_from_the_deployment():
    from medxray.review.settings import IDENTITY_HEADER, IDENTITY_LOGIN, reviewer_identity

    assert reviewer_identity(AppSettings(), headers={"X-Forwarded-User": "mallory"}) is None  # not trusted by default
    proxy = AppSettings(identity_header="X-Forwarded-User")
    secret = (
        "s" * 32
    )  # issue 19 item 6: the header is believed only with the proxy's secret (tests/test_app_security.py)
    ok = reviewer_identity(
        proxy, headers={"x-forwarded-user": " dr.a ", "X-Medxray-Proxy-Secret": secret}, proxy_secret=secret
    )
    assert (ok.name, ok.source, ok.problem) == ("dr.a", IDENTITY_HEADER, "")
    missing = reviewer_identity(proxy, headers={"X-Medxray-Proxy-Secret": secret}, proxy_secret=secret)
    assert (missing.name, missing.source) == ("", IDENTITY_HEADER) and missing.problem  # nobody, never a guess
    login = AppSettings(login=True)
    assert reviewer_identity(login, user={"is_logged_in": True, "email": "b@x.org"}).name == "b@x.org"
    out = reviewer_identity(login, user={"is_logged_in": False, "email": "b@x.org"})
    assert (out.name, out.source) == ("", IDENTITY_LOGIN)


def test_refusal_codes_become_sentences():
    from medxray.dicom import REASON_CODES
    from medxray.review.settings import REASON_SENTENCES, reason_sentence

    assert set(REASON_SENTENCES) == set(REASON_CODES)  # one sentence per code, kept in step
    assert reason_sentence("not_dicom: no DICM marker at byte 128") == "Not a DICOM file: no DICM marker at byte 128."
    assert reason_sentence("") == ""
    from medxray.dicom import refusal

    assert user_message(refusal("truncated", "ends at byte 10")) == "The file is cut short: ends at byte 10."


def test_worklist_shows_names_and_sentences_and_steps(tmp_path):
    from medxray.review.worklist import next_unreviewed, step_row

    labels = ["Pleural_Thickening", "Mass"]
    df = pd.DataFrame(
        [
            {
                "path": "a.png",
                "status": "ok",
                "reason": "",
                "sop_instance_uid": "1.2.1",
                "p_Pleural_Thickening": 0.9,
                "p_Mass": 0.1,
            },
            {
                "path": "b.dcm",
                "status": "error",
                "reason": "not_dicom: no DICM marker",
                "sop_instance_uid": "",
                "p_Pleural_Thickening": "",
                "p_Mass": "",
            },
        ]
    )
    t = worklist_table(df, tmp_path, {n: 0.5 for n in labels}, {})
    assert t.loc[0, "top_finding"] == "Pleural thickening" and t.loc[0, "positive_findings"] == "Pleural thickening"
    assert t.loc[1, "reason"] == "Not a DICOM file: no DICM marker." and t.loc[1, "reason_code"] == "not_dicom"
    assert len(filter_worklist(t, finding="Pleural_Thickening", positive_only=True)) == 1
    order = [4, 2, 7, 1]
    assert step_row(order, 2, 1) == 7 and step_row(order, 2, -1) == 4 and step_row(order, 1, 1) is None
    assert step_row(order, 99, 1) == 4
    assert next_unreviewed(order, 2, {7}) == 1 and next_unreviewed(order, 1, {4, 7}) == 2
    assert next_unreviewed(order, 4, {2, 7, 1}) is None


def test_findings_table_names_and_bar_columns():
    t = findings_table(["Pleural_Thickening", "Mass"], [0.7, 0.2], {"Pleural_Thickening": 0.5, "Mass": 0.5})
    assert list(t["name"]) == ["Pleural thickening", "Mass"]
    assert t.loc[0, "above"] == pytest.approx(0.7) and pd.isna(t.loc[0, "below"])
    assert t.loc[1, "below"] == pytest.approx(0.2) and pd.isna(t.loc[1, "above"])


def test_window_presets_invert_zoom_and_spacing(rg1_bytes):
    from medxray.review.viewing import (
        PRESETS,
        ViewState,
        apply_view,
        cam_view,
        crop_box,
        preset_window,
        spacing_text,
        window_text,
    )

    study = load_study_bytes(rg1_bytes, "RG1_UNCI.dcm")
    assert PRESETS == ("File default", "Lung", "Mediastinum", "Bone")
    assert preset_window(study, "File default") is None
    lung, bone = preset_window(study, "Lung"), preset_window(study, "Bone")
    # RG1 is MONOCHROME1: bright on screen = low stored values, so bone sits below lung in stored units
    assert bone[0] < lung[0]
    img = display_image(study, lung)
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.1
    assert "stored values" in window_text(study, lung)
    png = load_study_bytes(_png(_chest_like()), "x.png")
    c, w = preset_window(png, "Lung")
    assert 0 < c < 1 and "% of the grey range" in window_text(png, (c, w))
    assert not np.allclose(display_image(png, (c, w)), display_image(png))
    d = display_image(study)
    inv = apply_view(d, ViewState(invert=True))
    assert np.allclose(inv, 1.0 - d)
    z = apply_view(d, ViewState(zoom=2.0, center_x=0.0, center_y=1.0))
    assert z.shape == (round(d.shape[0] / 2), round(d.shape[1] / 2))
    _top, bottom, left, _right = crop_box(d.shape, 2.0, 0.0, 1.0)
    assert left == 0 and bottom == d.shape[0]  # pan is clamped inside the image
    cam = np.zeros((4, 4), np.float32)
    cam[3, 0] = 1.0  # evidence bottom-left: still inside the zoomed bottom-left crop
    rgb = cam_view(d, cam, ViewState(zoom=2.0, center_x=0.0, center_y=1.0), finding="Mass")
    assert rgb.shape[0] == z.shape[0] and rgb.shape[1] > z.shape[1]  # image plus its colour bar
    assert spacing_text([0.0, 0.0]) == "unknown" and spacing_text(None) == "unknown"
    assert spacing_text([0.139, 0.139]) == "0.139 x 0.139 mm"
    meta = dict(zip(safe_metadata_table(study)["field"], safe_metadata_table(study)["value"]))
    assert meta["pixel spacing"] == "unknown"  # RG1 says 0, 0


def test_evaluate_on_a_text_file_says_not_a_checkpoint(capsys):
    from medxray.cli import main

    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert main(["evaluate", "--checkpoint", str(readme)]) == 2
    err = capsys.readouterr().err
    assert "not a medxray checkpoint" in err and "weights_only" not in err and "Traceback" not in err
