"""The node's result thread (medxray.pacs.queuer.ResultQueuer): a scored row becomes SR / SC objects
in the outbox while the scoring run is still going, a stop leaves nothing half done, and a pass
that fails does not end the thread."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("pydicom.data")

from test_pacs_result_workers import _inbox_with_rg1  # noqa: E402

from medxray.pacs import queuer as queuer_mod  # noqa: E402
from medxray.pacs.queuer import ResultQueuer  # noqa: E402
from medxray.pacs.results import ResultPolicy, result_rows, score_inbox  # noqa: E402
from medxray.pacs.spool import Spool  # noqa: E402


@pytest.fixture(scope="module")
def scored_work(tmp_path_factory, scoring_checkpoint) -> tuple[Path, list[str]]:
    """A node work folder whose inbox the engine has scored (4 RG1 copies + one with an invalid
    Study UID), nothing queued yet; and its results.csv lines (header first)."""
    work = tmp_path_factory.mktemp("queuer") / "work"
    policy = ResultPolicy(scoring={"workers": 1, "batch_size": 8})
    _inbox_with_rg1(work, 4)
    score_inbox(Spool(work), str(scoring_checkpoint), policy)
    lines = (work / "scored" / "results.csv").read_text().splitlines(keepends=True)
    assert len(lines) == 6
    # the unreferenceable file's row last: every earlier row gives objects
    bad = [
        str(p.relative_to(work / "inbox"))
        for p in (work / "inbox").rglob("*.dcm")
        if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == "1.2.840.not-a-uid"
    ]
    assert len(bad) == 1
    rows = sorted(lines[1:], key=lambda ln: ln.startswith(bad[0] + ","))
    assert rows[-1].startswith(bad[0] + ",")
    return work, [lines[0], *rows]


def _copy_with_rows(scored_work, dest: Path, n_rows: int) -> Spool:
    """A copy of the scored work folder whose results.csv holds only its first ``n_rows`` rows, as
    the journal holds them part-way through the run."""
    work, lines = scored_work
    shutil.copytree(work, dest)
    (dest / "scored" / "results.csv").write_text("".join(lines[: 1 + n_rows]))
    return Spool(dest)


def _wait(cond, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _outbox_modalities(spool: Spool) -> list[str]:
    return sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in spool.outbox.glob("*.dcm"))


def test_rows_become_objects_while_the_run_is_scoring(scored_work, tmp_path):
    spool = _copy_with_rows(scored_work, tmp_path / "w", 0)
    woken = threading.Event()
    q = ResultQueuer(spool, ResultPolicy(), None, woken.set, period_s=0.05, max_rows=1).start()
    try:
        assert q.wait_idle(30)  # the first pass: nothing scored yet
        assert not list(spool.outbox.glob("*.dcm")) and not woken.is_set()
        with q.scoring():
            # the engine writes the first row: its objects reach the outbox before the run ends
            _, lines = scored_work
            with open(spool.scored / "results.csv", "a") as fh:
                fh.write(lines[1])
            assert _wait(lambda: bool(list(spool.outbox.glob("*.dcm"))))
            assert woken.is_set()
            first = result_rows(spool)[0]["path"]
            assert _wait(lambda: first in spool.queued)
            assert not q.wait_idle(0.2)  # a run in progress is never idle
            # a half-written row (no newline yet) is not taken
            with open(spool.scored / "results.csv", "a") as fh:
                fh.write(lines[2][:40])
            time.sleep(0.3)
            assert spool.queued.items == {first}
            with open(spool.scored / "results.csv", "a") as fh:
                fh.write(lines[2][40:] + "".join(lines[3:]))
        assert q.wait_idle(60)
    finally:
        q.stop()
    rows = result_rows(spool)
    assert len(rows) == 5 and all(r["path"] in spool.queued for r in rows)
    mods = _outbox_modalities(spool)
    assert mods.count("SR") == 4  # one per referenceable image; the invalid-UID file gets none
    assert (spool.work / "node.csv").read_text().count("no_result") == 1
    assert q.queued == len(mods) and q.passes >= 2


def test_same_objects_as_queuing_after_the_run(scored_work, tmp_path):
    """Queued in passes of one row while the run goes on, or all at once after it: the same objects."""
    from medxray.pacs.results import queue_results

    after = _copy_with_rows(scored_work, tmp_path / "after", 5)
    queue_results(after, ResultPolicy())
    streamed = _copy_with_rows(scored_work, tmp_path / "streamed", 5)
    q = ResultQueuer(streamed, ResultPolicy(), None, lambda: None, max_rows=1).start()
    try:
        assert q.wait_idle(60)
    finally:
        q.stop()
    names = sorted(p.name for p in after.outbox.glob("*.dcm"))
    assert names and names == sorted(p.name for p in streamed.outbox.glob("*.dcm"))
    assert q.passes == 4  # one object-writing pass per referenceable row


def test_a_stop_leaves_the_rest_for_the_next_start(scored_work, tmp_path, monkeypatch):
    spool = _copy_with_rows(scored_work, tmp_path / "w", 5)
    real = queuer_mod.queue_some
    gate = threading.Event()

    def slow(*args, **kwargs):
        out = real(*args, **kwargs)
        gate.set()
        time.sleep(0.3)
        return out

    monkeypatch.setattr(queuer_mod, "queue_some", slow)
    q = ResultQueuer(spool, ResultPolicy(), None, lambda: None, max_rows=1).start()
    assert gate.wait(60)
    q.stop()  # after the pass in progress, not after the backlog
    done = [r["path"] for r in result_rows(spool) if r["path"] in spool.queued]
    assert 1 <= len(done) < 5
    monkeypatch.setattr(queuer_mod, "queue_some", real)
    again = Spool(spool.work)  # a restarted node
    q2 = ResultQueuer(again, ResultPolicy(), None, lambda: None).start()
    try:
        assert q2.wait_idle(60)
    finally:
        q2.stop()
    assert all(r["path"] in again.queued for r in result_rows(again))
    assert _outbox_modalities(again).count("SR") == 4  # nothing twice, nothing lost


def test_a_failing_pass_does_not_end_the_thread(scored_work, tmp_path, monkeypatch, caplog):
    spool = _copy_with_rows(scored_work, tmp_path / "w", 5)
    real = queuer_mod.queue_some
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("results.csv changed under us")
        return real(*args, **kwargs)

    monkeypatch.setattr(queuer_mod, "queue_some", flaky)
    q = ResultQueuer(spool, ResultPolicy(), None, lambda: None, period_s=0.05).start()
    try:
        assert q.wait_idle(60)
    finally:
        q.stop()
    assert len(calls) >= 2 and "writing result objects failed (ValueError" in caplog.text
    assert all(r["path"] in spool.queued for r in result_rows(spool))
