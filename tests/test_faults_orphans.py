"""Issue 10 item 3: worker processes die with their parent.

A ``kill -9`` of ``medxray score-dicom`` used to leave its decode workers and multiprocessing's
resource tracker re-parented to PID 1, blocked forever. Each test starts the parent in its own
session, kills only the parent with SIGKILL and walks /proc for anything of that session still
alive 5 s later (zombies count as dead: they hold no memory, and PID 1 here may not reap them).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GRACE_S = 5.0

pytestmark = [
    pytest.mark.slow,  # each waits out its 5 s grace period
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find processes"),
]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[1]), int(fields[3])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def session_members(sid: int) -> dict[int, str]:
    """Live (non-zombie) processes of session ``sid`` -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st and st[2] == sid and st[0] != "Z":
            found[int(entry.name)] = _cmdline(int(entry.name))
    return found


def kill_parent_and_watch(
    proc: subprocess.Popen, ready, timeout: float = 240.0
) -> tuple[dict[int, str], dict[int, str]]:
    """Wait until ``ready(children)`` holds, SIGKILL the parent only; return (children before, survivors)."""
    deadline = time.monotonic() + timeout
    children: dict[int, str] = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the parent ended early (rc {proc.returncode})"
        children = {p: c for p, c in session_members(proc.pid).items() if p != proc.pid}
        if ready(children):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"workers never appeared: {children}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    survivors = session_members(proc.pid)
    while survivors and time.monotonic() - t0 < GRACE_S:
        time.sleep(0.2)
        survivors = session_members(proc.pid)
    for pid in survivors:  # never leave them behind, whatever the verdict
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return children, survivors


def _spawned(cmd: str) -> bool:
    return "multiprocessing" in cmd and ("spawn_main" in cmd or "resource_tracker" in cmd)


def test_score_dicom_workers_and_resource_tracker_die_with_a_killed_scorer(scoring_checkpoint, tmp_path):
    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("RG1_UNCI.dcm"))
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(40):  # enough real CRs that the scorer is still busy when it is killed
        shutil.copy(src, inp / f"cr{i:02d}.dcm")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medxray.cli",
            "score-dicom",
            str(inp),
            "--checkpoint",
            str(scoring_checkpoint),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "2",
            "--cams",
            "none",
            "--backend",
            "torch",
            "--precision",
            "fp32",
            "--no-progress",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def ready(ch: dict[int, str]) -> bool:  # two decode workers and the resource tracker
            return sum("spawn_main" in c for c in ch.values()) >= 2 and any(
                "resource_tracker" in c for c in ch.values()
            )

        children, survivors = kill_parent_and_watch(proc, ready)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sum(_spawned(c) for c in children.values()) >= 3
    assert not survivors, f"still alive {GRACE_S:g} s after kill -9 of the scorer: {survivors}"


CHILD = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time

    def work(how):
        from medxray import procutil
        if how == "auto":
            how = procutil.exit_with_parent()
        elif how == "watchdog":
            procutil.start_watchdog(poll_s=0.2)
        print("armed", how, flush=True)
        time.sleep(600)

    if __name__ == "__main__":
        ctx = mp.get_context(sys.argv[2])
        p = ctx.Process(target=work, args=(sys.argv[1],))
        p.start()
        time.sleep(600)
""")


def _run_child(tmp_path: Path, how: str, start: str) -> tuple[str, dict[int, str], dict[int, str]]:
    script = tmp_path / "parent.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), how, start],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        armed = proc.stdout.readline().split()  # the child has armed its mechanism
        children, survivors = kill_parent_and_watch(proc, bool)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return " ".join(armed), children, survivors


@pytest.mark.parametrize("how,start", [("auto", "spawn"), ("auto", "fork"), ("watchdog", "spawn")])
def test_exit_with_parent(how, start, tmp_path):
    armed, children, survivors = _run_child(tmp_path, how, start)
    assert armed == ("armed pdeathsig" if how == "auto" else "armed watchdog")  # Linux: the kernel's signal
    assert children
    assert not survivors, f"orphans survived ({how}, {start}): {survivors}"


def test_without_it_a_worker_outlives_its_killed_parent(tmp_path):
    """The control: the same child without exit_with_parent is orphaned (what issue 10 measured)."""
    armed, children, survivors = _run_child(tmp_path, "none", "spawn")
    assert armed == "armed none"
    assert survivors and set(survivors) <= set(children)


POOLS = textwrap.dedent("""
    import sys, time
    import torch

    class Slow(torch.utils.data.Dataset):  # a decode that takes long: the worker is busy, not polling its parent
        def __len__(self):
            return 64
        def __getitem__(self, i):
            time.sleep(600)

    if __name__ == "__main__":
        if sys.argv[1] == "dataloader":
            from medxray.data.loading import make_loader
            for _ in make_loader(Slow(), batch_size=2, seed=0, num_workers=2):
                pass
        else:
            from medxray.data import prepare
            from medxray.data.synthetic import synthesize
            root = synthesize(sys.argv[2], n_images=70, seed=0, image_size=64, workers=1)  # 3 chunks of 32: a pool
            prepare.decode_resize_u8 = lambda path, transform: time.sleep(600)  # inherited by the forked pool
            prepare.prepare_cache("chestxray14", root, 32, workers=2, progress=False)
""")


@pytest.mark.parametrize("kind", ["dataloader", "prepare"])
def test_training_loader_and_cache_pool_workers_die_with_their_parent(kind, tmp_path):
    """Training/evaluation DataLoader workers (worker_init_fn) and the cache builder's pool."""
    script = tmp_path / "pools.py"
    script.write_text(POOLS)
    proc = subprocess.Popen(
        [sys.executable, str(script), kind, str(tmp_path / "root")],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        # forked workers share the parent's command line: wait for two, then give them a moment to arm
        children, survivors = kill_parent_and_watch(proc, lambda ch: len(ch) >= 2 and not time.sleep(2.0))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(children) >= 2
    assert not survivors, f"{kind} workers survived kill -9 of their parent: {survivors}"
