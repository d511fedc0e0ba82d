"""pipelines/score_dicom.py: the YAML-configured entry runs the same engine as the CLI."""

from __future__ import annotations

import csv
import importlib.util
import shutil
from pathlib import Path

import pytest

from medxray.errors import ConfigError
from medxray.scoring import ScoreConfig, load_score_config

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "score_dicom.py"


def _pipeline():
    spec = importlib.util.spec_from_file_location("score_dicom_pipeline", PIPELINE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_config_covers_every_option():
    cfg = load_score_config(PIPELINE.with_suffix(".yaml"))
    assert isinstance(cfg, ScoreConfig)
    assert (cfg.cams, cfg.batch_size, list(cfg.allowed_modalities)) == ("positive", 16, ["CR", "DX"])


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown scoring option"):
        load_score_config(None, ["input_dir=a", "checkpoint=b", "out=c", "batchsize=3"])
    with pytest.raises(ConfigError, match="needs"):
        load_score_config(None, ["input_dir=a"])
    cfg = load_score_config(None, ["input_dir=a", "checkpoint=b", "out=c", "allowed_modalities=any", "sr=true"])
    assert cfg.allowed_modalities is None and cfg.sr is True


def test_pipeline_runs_end_to_end(dicom_corpus, scoring_checkpoint, tmp_path, capsys):
    root, _ = dicom_corpus
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(root / "ok/lateral.dcm", src / "lat.dcm")
    shutil.copy(root / "bad/multi_frame.dcm", src / "mf.dcm")
    out = tmp_path / "out"
    rc = _pipeline().main(
        [
            f"input_dir={src}",
            f"checkpoint={scoring_checkpoint}",
            f"out={out}",
            "workers=1",
            "backend=torch",
            "precision=fp32",
            "cams=all",
            "progress=false",
            "-q",
        ]
    )
    assert rc == 0
    assert "2 files: 1 ok, 1 error" in capsys.readouterr().out
    with open(out / "results.csv", newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert rows["mf.dcm"]["reason"].startswith("multi_frame") and rows["lat.dcm"]["is_lateral"] == "1"
    assert len(list((out / rows["lat.dcm"]["cam_dir"]).glob("*.png"))) == 14  # cams=all
    rc = _pipeline().main([f"input_dir={src}", f"checkpoint={tmp_path / 'missing.pt'}", f"out={out}", "-q"])
    assert rc == 2
