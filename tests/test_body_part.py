"""The scorer's policy gate on real files (issue 16 item 8 and 'Also'), and an honest --overwrite (item 7).

RG1 (adult PA chest CR) and RG3 (leg, Body Part Examined EXTREMITY) from pydicom-data; variants of
RG1 are built here with pydicom (header edits, noise pixels); the OOD checkpoint is conftest's
``ood_checkpoint`` (statistics fitted on the real NIH sample PNGs).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medxray.dicom import read_dicom
from medxray.dicom.codes import BODY_PART_MISSING_WARNING, WARNING_PREFIXES, not_frontal_warning
from medxray.scoring import ScoreConfig, score_directory
from medxray.scoring.gate import accepted_body_parts, header_gate

FAST = dict(backend="torch", precision="fp32", batch_size=4, workers=1, progress=False)
RG1 = get_testdata_file("RG1_UNCI.dcm")


def rg1_variant(path: Path, edit=None, noise: int | None = None) -> Path:
    """RG1 with a fresh SOP Instance UID, optionally edited, or with its pixels replaced by uniform noise."""
    ds = pydicom.dcmread(RG1)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if noise is not None:
        rng = np.random.default_rng(noise)
        px = rng.integers(2000, 30000, (64, 64)).astype(np.uint16)  # at the model's size: resizing keeps it noise
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 64, 64, 16, 15, 14
        ds.PixelRepresentation = 0
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = px.tobytes()
    if edit is not None:
        edit(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def results(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def meta_of(path) -> dict:
    return read_dicom(path, allowed_modalities=None).meta


# -- the header gate, on real headers ------------------------------------------------------------


def test_header_gate_policy(tmp_path):
    chest = accepted_body_parts("CHEST")
    rg3 = sorted(get_testdata_files("RG3*"))
    assert len(rg3) == 4
    for f in rg3:
        skip, warns = header_gate(meta_of(f), chest)
        assert skip is not None and skip.startswith("not_chest: body part EXTREMITY") and warns == []
        assert header_gate(meta_of(f), accepted_body_parts("any")) == (None, [])
        assert header_gate(meta_of(f), accepted_body_parts("chest, Extremity"))[0] is None
    assert header_gate(meta_of(RG1), chest) == (None, [])

    def no_part(ds):
        del ds.BodyPartExamined

    missing = meta_of(rg1_variant(tmp_path / "a.dcm", no_part))
    assert header_gate(missing, chest) == (None, [BODY_PART_MISSING_WARNING])

    def region(code, meaning):
        def edit(ds):
            del ds.BodyPartExamined
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "SCT", meaning
            ds.AnatomicRegionSequence = Sequence([item])

        return edit

    assert header_gate(meta_of(rg1_variant(tmp_path / "b.dcm", region("51185008", "Chest"))), chest) == (None, [])
    knee = header_gate(meta_of(rg1_variant(tmp_path / "c.dcm", region("72696002", "Knee"))), chest)[0]
    assert knee is not None and knee.startswith("not_chest: body part KNEE (Anatomic Region Sequence)")

    def decubitus(ds):
        ds.ViewPosition = "LLD"

    got = header_gate(meta_of(rg1_variant(tmp_path / "d.dcm", decubitus)), chest)
    assert got == (None, [not_frontal_warning("LLD", "left lateral decubitus")])
    assert got[1][0].startswith(WARNING_PREFIXES)


def test_accept_body_parts_values():
    from medxray.errors import ConfigError

    assert accepted_body_parts(["chest", "THORAX", "chest"]) == ("CHEST", "THORAX")
    assert accepted_body_parts("ANY") is None and accepted_body_parts(None) is None
    with pytest.raises(ConfigError, match="at least one"):
        accepted_body_parts(" , ")


# -- the scorer, end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gate_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate_in")
    shutil.copy(RG1, root / "rg1.dcm")
    for name in ("RG3_UNCI.dcm", "RG3_J2KR.dcm"):
        shutil.copy(get_testdata_file(name), root / name)

    def no_part(ds):
        del ds.BodyPartExamined

    rg1_variant(root / "rg1_no_part.dcm", no_part)
    rg1_variant(root / "noise_chest.dcm", noise=5)  # says CHEST, holds noise: only the content check sees it
    return root


def test_scorer_skips_a_leg_and_flags_noise(gate_input, ood_checkpoint, tmp_path):
    from medxray.checkpoint import load_checkpoint
    from medxray.ood import stats_from_checkpoint

    threshold = stats_from_checkpoint(load_checkpoint(ood_checkpoint)).threshold
    out = tmp_path / "warn"
    s = score_directory(ScoreConfig(gate_input, ood_checkpoint, out, cams="positive", **FAST))
    rows = results(out)
    assert s.ok == 3 and s.not_scored == 2 and s.error == 0
    for name in ("RG3_UNCI.dcm", "RG3_J2KR.dcm"):
        r = rows[name]
        assert r["status"] == "skipped" and r["reason"].startswith("not_chest: body part EXTREMITY"), r
        assert r["p_Cardiomegaly"] == "" and r["cam_dir"] == "" and r["modality"] == "CR"
    assert rows["rg1.dcm"]["status"] == "ok" and rows["rg1.dcm"]["warnings"] == ""
    assert float(rows["rg1.dcm"]["ood_distance"]) <= threshold
    assert rows["rg1_no_part.dcm"]["warnings"] == BODY_PART_MISSING_WARNING
    noise = rows["noise_chest.dcm"]
    assert noise["status"] == "ok" and float(noise["ood_distance"]) > threshold
    assert noise["warnings"].startswith("out of distribution: this image is unlike the model's training images")
    assert "; " not in noise["warnings"]  # one warning: our texts never hold the column's separator

    out2 = tmp_path / "skip"
    s2 = score_directory(
        ScoreConfig(
            gate_input, ood_checkpoint, out2, cams="positive", ood_policy="skip", accept_body_parts="any", **FAST
        )
    )
    rows2 = results(out2)
    assert rows2["noise_chest.dcm"]["status"] == "skipped"
    assert rows2["noise_chest.dcm"]["reason"].startswith("out_of_distribution: out of distribution")
    assert rows2["noise_chest.dcm"]["p_Cardiomegaly"] == "" and rows2["noise_chest.dcm"]["cam_dir"] == ""
    # with the header check off the leg reaches the model, whose own features refuse it
    assert all(rows2[n]["reason"].startswith("out_of_distribution") for n in ("RG3_UNCI.dcm", "RG3_J2KR.dcm"))
    assert rows2["rg1.dcm"]["status"] == "ok" and s2.ok == 2 and s2.not_scored == 3


def test_cli_flags_and_bad_value(gate_input, scoring_checkpoint, tmp_path, capsys):
    from medxray.cli import main

    out = tmp_path / "o"
    base = [
        "score-dicom",
        str(gate_input),
        "--checkpoint",
        str(scoring_checkpoint),
        "--out",
        str(out),
        "--workers",
        "1",
        "--cams",
        "none",
        "--backend",
        "torch",
        "--precision",
        "fp32",
        "--no-progress",
    ]
    assert main([*base, "--accept-body-parts", " , "]) == 2
    assert "at least one body part" in capsys.readouterr().err
    assert main([*base, "--accept-body-parts", "chest,extremity"]) == 0
    rows = results(out)
    assert rows["RG3_UNCI.dcm"]["status"] == "ok" and rows["RG3_UNCI.dcm"]["ood_distance"] == ""  # no statistics


def test_app_shows_the_scorers_ood_text(ood_checkpoint, gate_input):
    from medxray.inference import Predictor
    from medxray.review.study import distribution_warnings, load_study_file, predict_study

    p = Predictor.from_checkpoint(ood_checkpoint, device="cpu", backend="torch", precision="fp32")
    study = load_study_file(gate_input / "noise_chest.dcm")
    pred = predict_study(p, study.pixels)
    assert len(pred.warnings) == 1 and pred.warnings[0].startswith("out of distribution")
    shown = distribution_warnings(study, prediction=pred)
    assert shown[0] == pred.warnings[0]  # on top of the study
    plain = predict_study(p, load_study_file(gate_input / "rg1.dcm").pixels)
    assert plain.warnings == []
    leg = distribution_warnings(load_study_file(gate_input / "RG3_UNCI.dcm"))
    assert any(w.startswith("body part EXTREMITY (Body Part Examined)") for w in leg)
    no_part = distribution_warnings(load_study_file(gate_input / "rg1_no_part.dcm"))
    assert BODY_PART_MISSING_WARNING in no_part


def test_worklist_filters_on_warnings():
    import pandas as pd

    from medxray.review.worklist import filter_worklist

    table = pd.DataFrame(
        {
            "file": ["a", "b", "c"],
            "status": ["ok"] * 3,
            "reviewed": [False] * 3,
            "max_probability": [0.1, 0.2, 0.3],
            "warnings": ["", BODY_PART_MISSING_WARNING, "lateral view: x; out of distribution: this image is unlike"],
        }
    )
    assert list(filter_worklist(table, warning="out of distribution")["file"]) == ["c"]
    assert list(filter_worklist(table, warning="body part not stated")["file"]) == ["b"]
    assert sorted(filter_worklist(table, warning="any")["file"]) == ["b", "c"]
    assert list(filter_worklist(table, warning="none")["file"]) == ["a"]


# -- --overwrite leaves nothing of the old run (issue 16 item 7) --------------------------------


def test_overwrite_leaves_nothing_of_the_old_run(scoring_checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rg1_variant(src / "keep.dcm")
    rg1_variant(src / "gone.dcm")
    out = tmp_path / "out"
    cfg = dict(cams="all", sr=True, **FAST)
    score_directory(ScoreConfig(src, scoring_checkpoint, out, **cfg))
    first = results(out)
    assert first["gone.dcm"]["cam_dir"] and first["gone.dcm"]["sr_file"]
    assert (out / first["gone.dcm"]["cam_dir"]).is_dir() and (out / first["gone.dcm"]["sr_file"]).is_file()
    stale_shard = out / "results.shard-1-of-2.csv"
    stale_shard.write_text("path,status\n")
    (out / "notes.txt").write_text("the user's own file")
    (out / "mine").mkdir()
    (out / "mine" / "keep.png").write_bytes(b"\x89PNG")
    (src / "gone.dcm").unlink()

    score_directory(ScoreConfig(src, scoring_checkpoint, out, overwrite=True, **cfg))
    second = results(out)
    assert list(second) == ["keep.dcm"]
    assert not (out / first["gone.dcm"]["cam_dir"]).exists() and not (out / first["gone.dcm"]["sr_file"]).exists()
    assert sorted(p.name for p in (out / "cams").iterdir()) == [Path(second["keep.dcm"]["cam_dir"]).name]
    assert [p.name for p in (out / "sr").iterdir()] == [Path(second["keep.dcm"]["sr_file"]).name]
    assert not stale_shard.exists()
    assert (out / "notes.txt").read_text() == "the user's own file" and (out / "mine" / "keep.png").is_file()


def test_sharded_overwrite_removes_only_its_own_outputs(scoring_checkpoint, tmp_path):
    from medxray.scoring import in_shard, output_stem

    src = tmp_path / "in"
    src.mkdir()
    candidates = [f"img{i}.dcm" for i in range(40)]
    mine = [n for n in candidates if in_shard(n, (1, 2))][:2]
    other = [n for n in candidates if not in_shard(n, (1, 2))][:2]
    assert len(mine) == len(other) == 2
    for n in mine + other:
        rg1_variant(src / n)
    out = tmp_path / "out"
    cfg = dict(cams="none", sr=True, **FAST)
    for k in (1, 2):
        score_directory(ScoreConfig(src, scoring_checkpoint, out, shard=f"{k}/2", **cfg))
    assert (out / "results.csv").is_file()
    gone = mine[0]
    (src / gone).unlink()
    score_directory(ScoreConfig(src, scoring_checkpoint, out, shard="1/2", overwrite=True, **cfg))
    srs = {p.stem for p in (out / "sr").iterdir()}
    assert output_stem(gone) not in srs
    assert {output_stem(n) for n in other} <= srs  # the other shard's SRs are untouched
    assert (out / "results.csv").is_file()  # merged again: both shards complete
    assert gone not in results(out)
