"""medxray.scoring / `medxray score-dicom`: one row per file, resumable, PHI-free outputs."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from dicom_corpus import PHI_STRINGS

from medxray.errors import ConfigError, DataError
from medxray.labels import CHESTXRAY14_FINDINGS
from medxray.scoring import (
    RESULT_COLUMNS,
    ScoreConfig,
    in_shard,
    iter_input_files,
    output_stem,
    parse_shard,
    read_results,
    result_columns,
    score_directory,
)

REPO = Path(__file__).resolve().parents[1]
# fp32 torch: no bf16 kernel JIT at tiny sizes (the fast paths are tested in test_inference.py).
FAST = dict(backend="torch", precision="fp32", batch_size=4, workers=1, progress=False)


def rows_of(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "duplicate rows"
    return {r["path"]: r for r in rows}


@pytest.fixture(scope="module")
def corpus_run(dicom_corpus, scoring_checkpoint, tmp_path_factory):
    """One full run over the corpus with CAMs for positives and an SR per scored image."""
    root, expect = dicom_corpus
    out = tmp_path_factory.mktemp("score_out")
    summary = score_directory(ScoreConfig(root, scoring_checkpoint, out, cams="positive", sr=True, **FAST))
    return root, expect, out, summary


def test_result_columns_contract():
    assert RESULT_COLUMNS[:8] == [
        "path",
        "status",
        "reason",
        "sop_instance_uid",
        "study_instance_uid",
        "series_instance_uid",
        "modality",
        "view_position",
    ]
    ps = [c for c in RESULT_COLUMNS if c.startswith("p_")]
    assert ps == [f"p_{n}" for n in CHESTXRAY14_FINDINGS]
    i = RESULT_COLUMNS.index("positive_findings")
    assert RESULT_COLUMNS[i : i + 3] == ["positive_findings", "model", "model_version"]
    assert RESULT_COLUMNS.index(ps[-1]) + 1 == i
    assert result_columns(["A", "B"])[8:10] == ["p_A", "p_B"]


def test_one_row_per_file_with_the_right_status(corpus_run):
    root, expect, out, summary = corpus_run
    rows = rows_of(out / "results.csv")
    assert set(rows) == set(expect), "exactly one row per input file, nothing else"
    assert list(rows) == sorted(rows), "final file is sorted by path"
    for rel, e in expect.items():
        r = rows[rel]
        assert r["status"] == e.status, (rel, r["reason"])
        if e.status == "error":
            code = r["reason"].split(":", 1)[0]
            assert e.accepts(code), (rel, r["reason"])
            assert all(r[f"p_{n}"] == "" for n in CHESTXRAY14_FINDINGS)
        else:
            probs = np.array([float(r[f"p_{n}"]) for n in CHESTXRAY14_FINDINGS])
            assert np.all((0 <= probs) & (probs <= 1))
            pos = [n for n, p in zip(CHESTXRAY14_FINDINGS, probs) if p >= 0.5]
            got = r["positive_findings"].split(";") if r["positive_findings"] else []
            assert got == pos
            assert r["sop_instance_uid"] and r["study_instance_uid"] and r["modality"] in ("CR", "DX")
            assert (r["is_lateral"] == "1") == e.lateral and ("lateral" in r["warnings"]) == e.lateral
        assert (r["model"], r["model_version"]) == ("densenet121", "test")
    n_ok = sum(e.status == "ok" for e in expect.values())
    assert (summary.ok, summary.error, summary.total) == (n_ok, len(expect) - n_ok, len(expect))


def test_identical_images_score_identically(corpus_run):
    root, expect, out, _ = corpus_run
    rows = rows_of(out / "results.csv")
    ps = [f"p_{n}" for n in CHESTXRAY14_FINDINGS]
    for rel, e in expect.items():
        if e.same_as:  # RLE, JPEG 2000, implicit VR, raw, masked high bits ... == the plain file
            assert [rows[rel][c] for c in ps] == [rows[e.same_as][c] for c in ps], rel


def test_cam_overlays_for_positive_findings(corpus_run):
    from PIL import Image

    root, expect, out, _ = corpus_run
    rows = rows_of(out / "results.csv")
    n_png = 0
    for rel, r in rows.items():
        pos = [p for p in r["positive_findings"].split(";") if p]
        if r["status"] != "ok" or not pos:
            assert r["cam_dir"] == ""
            continue
        d = out / r["cam_dir"]
        assert d.parent == out / "cams" and d.name == output_stem(rel)
        assert sorted(p.stem for p in d.glob("*.png")) == sorted(pos)
        with Image.open(d / f"{pos[0]}.png") as im:
            assert im.mode == "RGB" and im.size[1] == int(r["rows"]) and im.size[0] > int(r["columns"])
        n_png += len(pos)
    assert n_png > 0


def test_sr_per_scored_image(corpus_run):
    import pydicom

    root, expect, out, _ = corpus_run
    rows = rows_of(out / "results.csv")
    oks = [r for r in rows.values() if r["status"] == "ok"]
    assert oks and all(r["sr_file"] for r in oks)
    r = oks[0]
    sr = pydicom.dcmread(out / r["sr_file"])
    assert sr.Modality == "SR" and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.StudyInstanceUID == r["study_instance_uid"]
    assert sr.ContentQualification == "RESEARCH"
    assert "NOT FOR CLINICAL USE" in sr.SeriesDescription.upper()
    assert not str(sr.get("PatientName", "")) and not sr.get("PatientID") and not sr.get("PatientBirthDate")
    refs = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in sr.ContentSequence if i.ValueType == "IMAGE"]
    assert refs == [r["sop_instance_uid"]]
    nums = {
        i.ConceptNameCodeSequence[0].CodeMeaning: float(i.MeasuredValueSequence[0].NumericValue)
        for i in sr.ContentSequence
        if i.ValueType == "NUM"
    }
    for n in CHESTXRAY14_FINDINGS:
        assert abs(nums[f"Probability of {n}"] - float(r[f"p_{n}"])) < 1e-4
    texts = " ".join(str(i.TextValue) for i in sr.ContentSequence if i.ValueType == "TEXT")
    assert "NOT FOR CLINICAL USE" in texts and "densenet121" in texts


def test_no_patient_identifiers_anywhere_in_out(corpus_run):
    root, expect, out, _ = corpus_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > len(expect)
    needles = [s.encode() for s in PHI_STRINGS] + [s.upper().encode() for s in PHI_STRINGS]
    for p in files:
        data = p.read_bytes()
        for n in needles:
            assert n not in data, f"PHI {n!r} found in {p.relative_to(out)}"
    # the inputs really do carry them (the test could fail)
    assert any(PHI_STRINGS[3].encode() in (root / rel).read_bytes() for rel in expect)


def test_rerun_skips_everything_and_changes_nothing(corpus_run, scoring_checkpoint):
    root, expect, out, _ = corpus_run
    before = (out / "results.csv").read_bytes()
    s = score_directory(ScoreConfig(root, scoring_checkpoint, out, cams="positive", sr=True, **FAST))
    assert (s.scored, s.skipped) == (0, len(expect))
    assert (out / "results.csv").read_bytes() == before


def test_resume_after_damage_in_process(dicom_corpus, scoring_checkpoint, tmp_path):
    """Rows lost to a kill (and a half-written last line) are redone; nothing is duplicated."""
    root, expect = dicom_corpus
    full = tmp_path / "full"
    score_directory(ScoreConfig(root, scoring_checkpoint, full, cams="none", **FAST))
    ref = (full / "results.csv").read_text()
    lines = ref.splitlines(keepends=True)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    keep = lines[:1] + lines[1::3]  # about a third of the rows survived ...
    half = lines[2][: len(lines[2]) // 2]  # ... and the kill hit mid-line
    (part / "results.csv").write_text("".join(keep) + half)
    s = score_directory(ScoreConfig(root, scoring_checkpoint, part, cams="none", **FAST))
    assert s.skipped == len(keep) - 1 and s.scored == len(expect) - s.skipped
    assert (part / "results.csv").read_text() == ref


def test_changed_arguments_refuse_to_mix(corpus_run, scoring_checkpoint, tmp_path):
    root, expect, out, _ = corpus_run
    with pytest.raises(ConfigError, match="different run"):
        score_directory(ScoreConfig(root, scoring_checkpoint, out, cams="all", sr=True, **FAST))
    with pytest.raises(DataError):
        score_directory(ScoreConfig(tmp_path / "nope", scoring_checkpoint, tmp_path / "o", **FAST))
    with pytest.raises(ConfigError):
        score_directory(ScoreConfig(root, scoring_checkpoint, tmp_path / "o", cams="some", **FAST))


def test_shards_partition_and_merge(dicom_corpus, scoring_checkpoint, corpus_run, tmp_path):
    root, expect, full_out, _ = corpus_run
    out = tmp_path / "sharded"
    s1 = score_directory(ScoreConfig(root, scoring_checkpoint, out, shard="1/2", cams="none", **FAST))
    assert s1.merged is None and not (out / "results.csv").exists()
    s2 = score_directory(ScoreConfig(root, scoring_checkpoint, out, shard="2/2", cams="none", **FAST))
    a = rows_of(out / "results.shard-1-of-2.csv")
    b = rows_of(out / "results.shard-2-of-2.csv")
    assert a and b and not set(a) & set(b) and set(a) | set(b) == set(expect)
    assert all(in_shard(r, (1, 2)) for r in a)
    assert s2.merged == str(out / "results.csv")
    merged = rows_of(out / "results.csv")
    full = rows_of(full_out / "results.csv")
    assert list(merged) == list(full)
    for k in merged:
        assert merged[k]["status"] == full[k]["status"] and merged[k]["p_Effusion"] == full[k]["p_Effusion"]


def test_parse_shard():
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None
    for bad in ("0/4", "5/4", "1-4", "a/b", "1/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


def test_walk_survives_symlink_loops_and_fifos(tmp_path):
    d = tmp_path / "in"
    (d / "a" / "b").mkdir(parents=True)
    (d / "a" / "b" / "x.dcm").write_bytes(b"1")
    (d / "y").write_bytes(b"2")
    os.symlink(d, d / "a" / "b" / "loop")  # back to the root
    os.symlink(d / "a", d / "alias")  # a second name for a real directory
    os.symlink(d / "missing", d / "broken")
    os.mkfifo(d / "pipe")
    out = d / "out"
    out.mkdir()
    (out / "results.csv").write_text("x")
    got = [r for r, _ in iter_input_files(d, exclude=[out])]
    assert sorted(got) == got
    assert "y" in got and "broken" in got and "pipe" not in got
    assert sum(g.endswith("x.dcm") for g in got) == 1 and not any(g.startswith("out/") for g in got)


def test_worker_crash_is_isolated_to_its_file(dicom_corpus, scoring_checkpoint, tmp_path):
    """A decoder that kills its process on one file: that file gets an error row, all others finish."""
    root, expect = dicom_corpus
    src = tmp_path / "in"
    for rel in [
        "ok/mono2_12bit.dcm",
        "ok/rle_lossless.dcm",
        "ok/signed16.dcm",
        "bad/zero_bytes.dcm",
        "nested/IM000001",
        "ok/no_window.dcm",
    ]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, src / rel)
    (src / "ok/CRASH_ME.dcm").write_bytes((root / "ok/mono2_12bit.dcm").read_bytes())
    out = tmp_path / "out"
    cfg = ScoreConfig(src, scoring_checkpoint, out, cams="none", decode_fn=crashing_decode, **FAST)
    cfg.workers = 2  # several jobs in flight when the worker dies: the innocent ones must survive
    s = score_directory(cfg)
    rows = rows_of(out / "results.csv")
    assert len(rows) == 7 and s.scored == 7
    assert rows["ok/CRASH_ME.dcm"]["status"] == "error"
    assert "crashed" in rows["ok/CRASH_ME.dcm"]["reason"]
    assert rows["bad/zero_bytes.dcm"]["reason"].startswith("not_dicom")
    assert sum(r["status"] == "ok" for r in rows.values()) == 5


def crashing_decode(path, *args, **kwargs):  # runs in a spawned worker (imported from this module)
    from medxray.scoring import decode_job

    if "CRASH_ME" in path:
        os._exit(3)  # like a segfault in a codec: the process is gone
    return decode_job(path, *args, **kwargs)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medxray.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=600, **kw
    )


def test_cli_exit_codes(dicom_corpus, scoring_checkpoint, tmp_path, capsys):
    from medxray.cli import main

    root, expect = dicom_corpus
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"not a checkpoint")
    base = ["score-dicom", str(root), "--out", str(tmp_path / "o1"), "--no-progress"]
    assert main([*base, "--checkpoint", str(bad_ckpt)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "checkpoint" in err and err.count("\n") == 1
    assert main([*base, "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(scoring_checkpoint), "--shard", "3/2"]) == 2
    assert "shard" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse usage error: --checkpoint missing
        main(["score-dicom", str(root), "--out", str(tmp_path / "o1")])
    assert e.value.code == 2
    # A completed run with error rows exits 0 and prints the summary.
    small = tmp_path / "small"
    small.mkdir()
    shutil.copy(root / "ok/mono2_12bit.dcm", small / "a.dcm")
    shutil.copy(root / "bad/zero_bytes.dcm", small / "b.dcm")
    assert (
        main(
            [
                "score-dicom",
                str(small),
                "--checkpoint",
                str(scoring_checkpoint),
                "--out",
                str(tmp_path / "o2"),
                "--backend",
                "torch",
                "--precision",
                "fp32",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "2 files: 1 ok, 1 error" in capsys.readouterr().out


def _data_rows(p: Path) -> int:
    try:
        return max(0, p.read_text(encoding="utf-8", errors="replace").count("\n") - 1)
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_kill_and_rerun_subprocess(dicom_corpus, scoring_checkpoint, tmp_path):
    """SIGKILL the whole scorer (and its workers) mid-run, re-run: same rows as an uninterrupted run."""
    root, expect = dicom_corpus
    src = tmp_path / "in"
    shutil.copytree(root, src)
    (src / "extra").mkdir()
    for i in range(24):  # more work, so the kill lands mid-run
        shutil.copy(root / "ok/mono2_12bit.dcm", src / f"extra/copy_{i:02d}.dcm")
    n_files = len(expect) + 24
    # fp32: batches are composed differently after a resume, and fp32 keeps rows batch-independent.
    args = [
        str(src),
        "--checkpoint",
        str(scoring_checkpoint),
        "--backend",
        "torch",
        "--precision",
        "fp32",
        "--batch-size",
        "2",
        "--workers",
        "1",
        "--cams",
        "positive",
        "--no-progress",
    ]
    full = tmp_path / "full"
    r = _cli("score-dicom", *args, "--out", str(full))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "killed"
    kills = 0
    for target in (3, 20):  # kill twice at different points
        proc = subprocess.Popen(
            [sys.executable, "-m", "medxray.cli", "score-dicom", *args, "--out", str(out)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and _data_rows(out / "results.csv") < target:
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the scorer and its decode workers, mid-write
            kills += 1
        proc.wait(timeout=60)
        assert _data_rows(out / "results.csv") < n_files or proc.returncode == 0
    assert kills >= 1
    r = _cli("score-dicom", *args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    a, b = rows_of(full / "results.csv"), rows_of(out / "results.csv")
    assert list(a) == list(b) and len(a) == n_files
    for k in a:
        ra, rb = a[k], b[k]
        pa = np.array([float(ra[f"p_{n}"] or "nan") for n in CHESTXRAY14_FINDINGS])
        pb = np.array([float(rb[f"p_{n}"] or "nan") for n in CHESTXRAY14_FINDINGS])
        np.testing.assert_allclose(pa, pb, atol=1.5e-4, equal_nan=True)  # at most the 4th decimal's rounding
        for c in ra:
            if not c.startswith("p_"):
                assert ra[c] == rb[c], (k, c)
    _, rows, dropped = read_results(out / "results.csv")
    assert dropped == 0 and len(rows) == n_files


def test_one_writer_per_out_and_overwrite(dicom_corpus, scoring_checkpoint, tmp_path):
    from medxray.scoring.run import lock_out

    root, _ = dicom_corpus
    src = tmp_path / "in"
    src.mkdir()
    for name in ("ok/mono2_12bit.dcm", "ok/lateral.dcm", "bad/colour_rgb.dcm"):
        shutil.copy(root / name, src / Path(name).name)
    out = tmp_path / "out"
    score_directory(ScoreConfig(src, scoring_checkpoint, out, cams="all", **FAST))
    assert len(list((out / "cams").glob("*/*.png"))) == 2 * 14
    held = lock_out(out / ".results.csv.lock")  # a scorer already running on this OUT
    try:
        with pytest.raises(ConfigError, match="another scorer"):
            score_directory(ScoreConfig(src, scoring_checkpoint, out, cams="all", **FAST))
    finally:
        held.close()
    s = score_directory(ScoreConfig(src, scoring_checkpoint, out, cams="none", overwrite=True, **FAST))
    assert (s.scored, s.skipped, s.ok, s.error) == (3, 0, 2, 1)
    assert not list((out / "cams").glob("*/*.png")), "overlays of the discarded run are removed"
    assert all(r["cam_dir"] == "" for r in rows_of(out / "results.csv").values())
