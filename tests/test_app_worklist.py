"""The worklist from a score-dicom results folder, without Streamlit: review state, filters,
readable names and refusal sentences, study stepping, and paths kept under the run's roots."""

from __future__ import annotations

import pandas as pd
import pytest

from medxray.errors import DataError
from medxray.review import ImageKey, ReviewStore
from medxray.review.worklist import (
    filter_worklist,
    load_results,
    resolve_result_path,
    result_label_names,
    results_input_root,
    stored_cam_path,
    worklist_table,
)


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
    with pytest.raises(DataError, match="outside"):  # paths read from results.csv stay under their roots
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
