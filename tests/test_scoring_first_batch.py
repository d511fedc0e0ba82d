"""Rows early: the first row comes before the model's first full batch (while the model loads only
the first batch is decoded, more decodes would take the cores the load needs; the first batch holds
at most FIRST_BATCH images; the rest of the run uses full batches), and with maps a row whose
overlays are drawn is written while the next batch's maps compute, not after them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("pydicom.data")
from pydicom.data import get_testdata_file  # noqa: E402

from medxray.inference import Predictor  # noqa: E402
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


def test_rows_are_written_while_the_next_batch_maps_compute(scoring_checkpoint, tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    rg1 = Path(get_testdata_file("RG1_UNCR.dcm"))
    for i in range(10):
        shutil.copy(rg1, src / f"rg1_{i:02d}.dcm")
    real_maps, real_write, real_tensor = ScoringEngine._maps, ScoringEngine._write, Predictor.maps_tensor
    mapping = [False]
    during_maps: list[bool] = []

    def maps(self, x, per_image):
        mapping[0] = True
        try:
            return real_maps(self, x, per_image)
        finally:
            mapping[0] = False

    def slow_maps_tensor(self, *a, **k):
        import time

        time.sleep(0.8)  # a real 224 px batch's maps take seconds; the overlay jobs finish meanwhile
        return real_tensor(self, *a, **k)

    def write(self, row):
        during_maps.append(mapping[0])
        return real_write(self, row)

    monkeypatch.setattr(ScoringEngine, "_maps", maps)
    monkeypatch.setattr(ScoringEngine, "_write", write)
    monkeypatch.setattr(Predictor, "maps_tensor", slow_maps_tensor)
    cfg = ScoreConfig(
        src,
        scoring_checkpoint,
        tmp_path / "out",
        batch_size=4,
        workers=1,
        cams="all",
        max_maps=1,
        backend="torch",
        precision="fp32",
        progress=False,
    )
    s = score_directory(cfg)
    assert s.ok == 10 and len(during_maps) == 10
    assert any(during_maps), "a finished overlay job's row waited for the next batch's maps"
    assert len(list((tmp_path / "out").glob("cams/*/*.png"))) == 10
