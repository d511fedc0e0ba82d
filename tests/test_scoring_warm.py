"""A WarmEngine (medxray.scoring.warm) keeps the decode workers, the checkpoint and the Predictor from
one scoring run to the next, as the DICOM node uses it: same rows as cold runs, a changed checkpoint
is read again, and workers a crash broke are replaced."""

from __future__ import annotations

import csv
import os
import shutil
from concurrent.futures import BrokenExecutor
from pathlib import Path

import pytest

pytest.importorskip("pydicom.data")
from conftest import make_test_checkpoint  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from medxray.scoring import ScoreConfig, score_directory  # noqa: E402
from medxray.scoring.warm import WarmEngine  # noqa: E402

FAST = dict(backend="torch", precision="fp32", batch_size=4, workers=1, progress=False, cams="positive")


def _probs(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        return {r["path"]: {k: v for k, v in r.items() if k.startswith("p_")} for r in csv.DictReader(fh)}


def _folder(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(get_testdata_file("RG1_UNCI.dcm"), root / f"{n}.dcm")
    return root


def test_runs_share_workers_checkpoint_and_model_and_give_the_cold_rows(tmp_path, scoring_checkpoint):
    warm = WarmEngine()
    try:
        first = score_directory(
            ScoreConfig(_folder(tmp_path / "a", ["a1", "a2"]), scoring_checkpoint, tmp_path / "oa", **FAST), warm
        )
        pool, predictor = warm.pool, warm.predictor
        assert pool is not None and predictor is not None and first.ok == 2
        second = score_directory(
            ScoreConfig(_folder(tmp_path / "b", ["b1"]), scoring_checkpoint, tmp_path / "ob", **FAST), warm
        )
        assert second.ok == 1
        assert warm.pool is pool and warm.predictor is predictor  # nothing started or loaded again
        assert warm.reused == {"pool": 1, "checkpoint": 1, "predictor": 1}
        assert list((tmp_path / "ob" / "cams").iterdir())  # maps drawn by the kept workers

        # a replaced checkpoint file (another model at the same path) is read again
        other = make_test_checkpoint(tmp_path / "other.pt", seed=7)
        moved = tmp_path / "same-path.pt"
        shutil.copy(scoring_checkpoint, moved)
        score_directory(ScoreConfig(tmp_path / "b", moved, tmp_path / "oc", **FAST), warm)
        kept_model = warm.predictor
        shutil.copy(other, moved)
        score_directory(ScoreConfig(tmp_path / "b", moved, tmp_path / "od", **FAST), warm)
        assert warm.predictor is not kept_model
        assert _probs(tmp_path / "oc") != _probs(tmp_path / "od")
    finally:
        warm.close()
    assert warm.pool is None and warm.predictor is None
    # the same rows as runs without a WarmEngine
    score_directory(ScoreConfig(tmp_path / "b", scoring_checkpoint, tmp_path / "cold-b", **FAST))
    assert _probs(tmp_path / "cold-b") == _probs(tmp_path / "ob")
    score_directory(ScoreConfig(tmp_path / "b", other, tmp_path / "cold-d", **FAST))
    assert _probs(tmp_path / "cold-d") == _probs(tmp_path / "od")


def test_workers_a_crash_broke_are_replaced(tmp_path, scoring_checkpoint):
    warm = WarmEngine()
    try:
        score_directory(ScoreConfig(_folder(tmp_path / "a", ["a1"]), scoring_checkpoint, tmp_path / "oa", **FAST), warm)
        broken = warm.pool
        assert broken is not None
        with pytest.raises(BrokenExecutor):  # a worker killed between runs (e.g. by the OOM killer)
            broken.submit(os._exit, 1).result(timeout=60)
        s = score_directory(
            ScoreConfig(_folder(tmp_path / "b", ["b1"]), scoring_checkpoint, tmp_path / "ob", **FAST), warm
        )
        assert s.ok == 1 and warm.pool is not None and warm.pool is not broken
        assert warm.reused["pool"] == 0 and warm.reused["predictor"] == 1
    finally:
        warm.close()


def test_a_failed_run_keeps_no_workers(tmp_path, scoring_checkpoint, monkeypatch):
    from medxray.scoring import engine as engine_mod

    warm = WarmEngine()
    try:
        score_directory(ScoreConfig(_folder(tmp_path / "a", ["a1"]), scoring_checkpoint, tmp_path / "oa", **FAST), warm)
        kept = warm.pool

        def boom(self, predictor):
            raise RuntimeError("inference failed")

        monkeypatch.setattr(engine_mod.ScoringEngine, "run", boom)
        with pytest.raises(RuntimeError, match="inference failed"):
            score_directory(
                ScoreConfig(_folder(tmp_path / "b", ["b1"]), scoring_checkpoint, tmp_path / "ob", **FAST), warm
            )
        assert warm.pool is None  # its jobs may still be running: not handed to the next run
        with pytest.raises(RuntimeError):
            kept.submit(int)  # shut down
        monkeypatch.undo()
        s = score_directory(ScoreConfig(tmp_path / "b", scoring_checkpoint, tmp_path / "ob", **FAST), warm)
        assert s.ok == 1 and warm.pool is not None
    finally:
        warm.close()


def test_a_pool_the_engine_replaced_is_kept_for_the_next_run():
    """A run whose workers broke ends with the engine's replacement pool: that one is reused."""
    from medxray.scoring.workers import new_decode_pool

    warm = WarmEngine()
    started: list[int] = []

    def new_pool(n):
        started.append(n)
        return new_decode_pool(n)

    try:
        first = warm.decode_pool(1, new_pool)
        replacement = new_decode_pool(1)  # as ScoringEngine._pool_broke starts one
        warm.keep_pool(replacement, 1)
        with pytest.raises(RuntimeError):
            first.submit(int)  # the one it replaced is shut down
        assert warm.decode_pool(1, new_pool) is replacement and started == [1]
        assert warm.decode_pool(2, new_pool) is not replacement and started == [1, 2]  # another size: new
    finally:
        warm.close()
