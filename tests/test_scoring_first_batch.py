"""Start-up: the first row comes before the model's first full batch. While the model loads only
the first batch is decoded (more decodes would take the cores the load needs), the first batch
holds at most FIRST_BATCH images, and the rest of the run uses full batches."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("pydicom.data")
from pydicom.data import get_testdata_file  # noqa: E402

from medxray.scoring import ScoreConfig, score_directory  # noqa: E402
from medxray.scoring.engine import FIRST_BATCH, ScoringEngine  # noqa: E402


def test_first_batch_is_small_and_decoded_alone_while_the_model_loads(scoring_checkpoint, tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    rg1 = Path(get_testdata_file("RG1_UNCR.dcm"))
    n = 3 * 8 + 2
    for i in range(n):
        shutil.copy(rg1, src / f"rg1_{i:02d}.dcm")
    batches: list[int] = []
    decoding_at_run: list[int] = []
    real_infer, real_run = ScoringEngine._infer, ScoringEngine.run

    def infer(self, batch):
        batches.append(len(batch))
        return real_infer(self, batch)

    def run(self, predictor):
        # what engine.start submitted while the model was being built
        decoding_at_run.append(self._n_decoding() + len(self.ready))
        return real_run(self, predictor)

    monkeypatch.setattr(ScoringEngine, "_infer", infer)
    monkeypatch.setattr(ScoringEngine, "run", run)
    cfg = ScoreConfig(src, scoring_checkpoint, tmp_path / "out", batch_size=8, workers=2, cams="none", progress=False)
    s = score_directory(cfg)
    assert s.ok == n and s.error == 0
    assert sum(batches) == n
    assert 1 <= batches[0] <= FIRST_BATCH < 8, batches
    assert decoding_at_run == [FIRST_BATCH], "only the first batch is decoded while the model loads"
    # after the first, batches are full but for the tail
    assert all(b == 8 for b in batches[1:-1]), batches
