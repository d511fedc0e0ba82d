"""Issue 10 items 4-6: full disks and read-only folders under `medxray score-dicom`.

4. A read-only OUT: one line saying the folder is not writable, exit 2.
5. OUT fills up while rows are appended: one line "no space left on OUT: free space and re-run the
   same command", exit 2, only whole rows in results.csv; the same command finishes the job later.
6. CAM overlays / SRs that cannot be written: a failure of the run (exit 1, a warning per file),
   and the same command later writes every missing output, not only missing rows.

How the faults are made (say which, per test): as root with ``unshare`` (this machine), each run
happens in a private mount namespace with a real read-only bind mount or a small tmpfs over the
folder, so nothing leaks into the host's mounts even if the test dies. Without that (a CI runner
that is not root) the same checks run with the nearest portable fault: a monkeypatched write that
fails with EROFS / ENOSPC, or a file standing where the cams/ and sr/ folders must go.
"""

from __future__ import annotations

import csv
import errno
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dicom_rg1 import rg1_dataset, save

from medxray.errors import OutputError
from medxray.scoring.journal import ResultsJournal, read_results, result_columns

REPO = Path(__file__).resolve().parents[1]
N_FILES = 24


def _can_mount() -> bool:
    if os.environ.get("MEDXRAY_TEST_NO_MOUNT"):  # to run the portable path where mounting works too
        return False
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"], capture_output=True
    )
    return probe.returncode == 0


CAN_MOUNT = _can_mount()


@pytest.fixture(scope="module")
def small_crs(tmp_path_factory) -> Path:
    """N_FILES copies of the downsampled real RG1 chest CR, each with its own SOP Instance UID."""
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("crs")
    for i in range(N_FILES):
        ds = rg1_dataset()
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"faults-disk-{i}"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        save(ds, root / f"cr{i:02d}.dcm")
    return root


def score_argv(inp: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        "score-dicom",
        str(inp),
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
        "--workers",
        "1",
        "--backend",
        "torch",
        "--precision",
        "fp32",
        "--no-progress",
        "--batch-size",
        "4",
        *extra,
    ]


def run_in_namespace(script: str, tmp_path: Path) -> None:
    """Run a shell script in a private mount namespace (mounts vanish with it)."""
    path = tmp_path / "faults.sh"
    path.write_text("set -u\n" + script)
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def cli_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, "-m", "medxray.cli", *argv])


def whole_rows(path: Path) -> list[dict[str, str]]:
    """The rows of results.csv, asserting the file holds only whole rows (no half line)."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), "results.csv ends in the middle of a row"
    rows = list(csv.reader(text.splitlines()))
    header = rows[0]
    assert all(len(r) == len(header) for r in rows[1:]), "a row with missing cells"
    return [dict(zip(header, r)) for r in rows[1:]]


def error_lines(stderr: str) -> list[str]:
    """Lines that report an error (the run's INFO lines, such as the predictor in use, are not)."""
    return [ln for ln in stderr.splitlines() if "error" in ln.lower() or "Traceback" in ln]


# ---- 4. read-only OUT ----------------------------------------------------------------------


@pytest.mark.slow
def test_read_only_out_is_one_line_and_exit_2(small_crs, scoring_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    argv = score_argv(small_crs, scoring_checkpoint, out, "--cams", "none")
    if CAN_MOUNT:  # a real read-only bind mount of OUT
        keep = tmp_path / "keep"
        keep.mkdir()
        run_in_namespace(
            f"mount --bind {out} {out} && mount -o remount,bind,ro {out} || exit 1\n"
            f"{cli_line(argv)} >{keep}/stdout 2>{keep}/stderr; echo $? >{keep}/rc\n",
            tmp_path,
        )
        rc, stderr = int((keep / "rc").read_text()), (keep / "stderr").read_text()
    else:  # portable: every open/mkdir under OUT fails with EROFS, as on a read-only mount
        _fail_under(monkeypatch, out, errno.EROFS)
        from medxray.cli import main

        rc, stderr = main(argv), capsys.readouterr().err
    assert rc == 2, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert f"output folder {out} is not writable" in lines[0], lines[0]
    assert not any(out.iterdir()), "nothing was written"


def _fail_under(monkeypatch, folder: Path, code: int) -> None:
    import builtins

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def inside(p) -> bool:
        try:
            return Path(os.fspath(p)).resolve().is_relative_to(folder.resolve())
        except TypeError:  # a file descriptor
            return False

    def fake_open(file, mode="r", *a, **k):
        if inside(file) and any(c in mode for c in "wax+"):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code), str(path))
        return real_os_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):
        if inside(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


# ---- 5. OUT fills up while rows are appended -----------------------------------------------


def test_journal_append_is_all_or_nothing(tmp_path, monkeypatch):
    """A write that gets half a row out and then hits a full disk is cut back to the previous length."""
    cols = result_columns(["A", "B"])
    path = tmp_path / "results.csv"
    j = ResultsJournal(path, cols)
    j.write({"path": "a.dcm", "status": "ok", "p_A": 0.5})
    before = path.read_bytes()
    real_write, calls = os.write, []

    def full_after_half(fd, data):  # the kernel's short write, then ENOSPC on the rest
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_after_half)
    with pytest.raises(OutputError, match=f"no space left on {tmp_path}: free space and re-run the same command"):
        j.write({"path": "b.dcm", "status": "ok", "p_A": 0.25, "reason": "x" * 200})
    monkeypatch.undo()
    assert len(calls) == 2 and path.read_bytes() == before, "the half row was removed"
    assert "b.dcm" not in j.done
    j.write({"path": "c.dcm", "status": "error", "reason": "r"})
    j.close()
    header, rows, dropped = read_results(path, cols)
    assert [r[0] for r in rows] == ["a.dcm", "c.dcm"] and dropped == 0


@pytest.mark.slow
def test_disk_full_while_appending_results(small_crs, scoring_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    argv = score_argv(small_crs, scoring_checkpoint, out, "--cams", "none")
    if CAN_MOUNT:  # a 12 KiB tmpfs: run.json and a few rows fit, then ENOSPC; then it grows and we re-run
        keep = tmp_path / "keep"
        keep.mkdir()
        run_in_namespace(
            f"mount -t tmpfs -o size=12k tmpfs {out} || exit 1\n"
            f"{cli_line(argv)} >{keep}/stdout1 2>{keep}/stderr1; echo $? >{keep}/rc1\n"
            f"cp {out}/results.csv {keep}/results1.csv\n"
            f"mount -o remount,size=16m {out} || exit 1\n"
            f"{cli_line(argv)} >{keep}/stdout2 2>{keep}/stderr2; echo $? >{keep}/rc2\n"
            f"cp {out}/results.csv {keep}/results2.csv\n",
            tmp_path,
        )
        rc1, err1 = int((keep / "rc1").read_text()), (keep / "stderr1").read_text()
        rc2, err2 = int((keep / "rc2").read_text()), (keep / "stderr2").read_text()
        first, final = keep / "results1.csv", keep / "results2.csv"
    else:  # portable: results.csv takes 5 rows, then a short write and ENOSPC (as on a full disk)
        from medxray.cli import main

        _full_after(monkeypatch, "results.csv", rows=5)
        rc1, err1 = main(argv), capsys.readouterr().err
        first = tmp_path / "results1.csv"
        shutil.copy(out / "results.csv", first)
        monkeypatch.undo()
        rc2, err2 = main(argv), capsys.readouterr().err
        final = out / "results.csv"
    assert rc1 == 2, err1
    lines = error_lines(err1)
    assert len(lines) == 1 and "Traceback" not in err1, err1
    assert f"no space left on {out}: free space and re-run the same command" in lines[0], lines[0]
    partial = whole_rows(first)
    assert 0 < len(partial) < N_FILES, "the disk filled up mid-run"
    assert rc2 == 0, err2
    rows = whole_rows(final)
    assert sorted(r["path"] for r in rows) == sorted(p.name for p in small_crs.iterdir())
    assert all(r["status"] == "ok" for r in rows)
    by_path = {r["path"]: r for r in rows}
    for r in partial:  # rows of the first run were kept, not redone differently
        assert by_path[r["path"]]["p_Atelectasis"] == r["p_Atelectasis"]


def _full_after(monkeypatch, name: str, rows: int) -> None:
    real_write, seen = os.write, {"n": 0}

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.endswith(name) and len(data) < 4096:
            seen["n"] += 1
            if seen["n"] == rows + 1:
                return real_write(fd, bytes(data[: len(data) // 2]))
            if seen["n"] > rows + 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


# ---- 6. CAM overlays and SRs that cannot be written ----------------------------------------


@pytest.mark.slow
def test_unwritten_cams_and_srs_fail_the_run_and_are_redone(small_crs, scoring_checkpoint, tmp_path):
    out = tmp_path / "out"
    (out / "cams").mkdir(parents=True)
    (out / "sr").mkdir()
    argv = score_argv(small_crs, scoring_checkpoint, out, "--cams", "all", "--overlay-max-side", "96", "--sr")
    keep = tmp_path / "keep"
    keep.mkdir()
    if CAN_MOUNT:  # cams/ and sr/ on a 4 KiB tmpfs each: full after (at most) the first file
        run_in_namespace(
            f"mount -t tmpfs -o size=4k tmpfs {out}/cams && mount -t tmpfs -o size=4k tmpfs {out}/sr || exit 1\n"
            f"{cli_line(argv)} >{keep}/stdout1 2>{keep}/stderr1; echo $? >{keep}/rc1\n"
            f"cp {out}/results.csv {keep}/results1.csv\n"
            f"umount {out}/cams {out}/sr || exit 1\n"
            f"{cli_line(argv)} >{keep}/stdout2 2>{keep}/stderr2; echo $? >{keep}/rc2\n",
            tmp_path,
        )
    else:  # portable: files stand where the cams/ and sr/ folders go, so every output write fails
        (out / "cams").rmdir()
        (out / "sr").rmdir()
        (out / "cams").write_text("in the way")
        (out / "sr").write_text("in the way")
        run = subprocess.run([sys.executable, "-m", "medxray.cli", *argv], cwd=REPO, capture_output=True, text=True)
        (keep / "rc1").write_text(str(run.returncode))
        (keep / "stderr1").write_text(run.stderr)
        shutil.copy(out / "results.csv", keep / "results1.csv")
        (out / "cams").unlink()
        (out / "sr").unlink()
        run = subprocess.run([sys.executable, "-m", "medxray.cli", *argv], cwd=REPO, capture_output=True, text=True)
        (keep / "rc2").write_text(str(run.returncode))
        (keep / "stderr2").write_text(run.stderr)
        (keep / "stdout2").write_text(run.stdout)
    rc1, err1 = int((keep / "rc1").read_text()), (keep / "stderr1").read_text()
    first = whole_rows(keep / "results1.csv")
    failed = [r for r in first if "cam overlays failed" in r["reason"] or "SR failed" in r["reason"]]
    assert rc1 == 1, err1
    assert len(failed) >= N_FILES - 1, [r["reason"] for r in first]
    for r in failed:  # a warning per file, naming it
        assert any(r["path"] in ln and "re-run the same command" in ln for ln in err1.splitlines()), (r["path"], err1)
    assert f"could not be written to {out}" in err1 and "Traceback" not in err1

    rc2, err2 = int((keep / "rc2").read_text()), (keep / "stderr2").read_text()
    assert rc2 == 0, err2
    assert f"{len(failed)} redone for missing CAM/SR outputs" in (keep / "stdout2").read_text()
    rows = whole_rows(out / "results.csv")
    assert len(rows) == N_FILES and len({r["path"] for r in rows}) == N_FILES
    for r in rows:
        assert r["status"] == "ok" and r["reason"] == "", r
        names = [c[2:] for c in r if c.startswith("p_")]
        assert r["cam_dir"] and all((out / r["cam_dir"] / f"{n}.png").is_file() for n in names), r["path"]
        assert r["sr_file"] and (out / r["sr_file"]).is_file(), r["path"]
