"""evaluate() as named stages: the Python API leaves the checkpoint file alone unless write_back=True,
write_thresholds= is a deprecated alias of it, the stages hand typed records to each other, and
phantom data are recognised by one function (data.manifest.is_phantom_root) everywhere."""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings

import pytest
import torch

from medxray.data.manifest import PHANTOM_MARKER, is_phantom_root
from medxray.errors import ConfigError
from medxray.evaluation.stages import PHANTOM_NOTE

OLD_MTIME_NS = 1_000_000_000 * 1_000_000_000  # 2001-09-09: any rewrite of the file moves the mtime off it


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from medxray.data.synthetic import synthesize

    return synthesize(tmp_path_factory.mktemp("phantom") / "root", n_images=60, seed=1, image_size=64, workers=1)


@pytest.fixture()
def checkpoint(tmp_path):
    """An untrained densenet121 at 32 px on the 14 ChestX-ray14 findings, mtime set far in the past."""
    from medxray.checkpoint import save_checkpoint
    from medxray.data.transforms import preprocessing_config
    from medxray.labels import CHESTXRAY14_FINDINGS
    from medxray.models import create_model

    torch.manual_seed(0)
    path = tmp_path / "ckpt" / "best.pt"
    path.parent.mkdir()
    save_checkpoint(
        path,
        create_model("densenet121", num_classes=14).state_dict(),
        {
            "architecture": "densenet121",
            "num_classes": 14,
            "in_chans": 3,
            "label_names": list(CHESTXRAY14_FINDINGS),
            "preprocessing": preprocessing_config(32),
            "thresholds": {n: 0.5 for n in CHESTXRAY14_FINDINGS},
            "metrics": {"val_mean_auroc": 0.5},
            "dataset": "chestxray14",
            "model_version": "test",
        },
    )
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    return path


def _evaluate(ckpt, root, out, **kw):
    from medxray.evaluation.run import evaluate

    torch.set_num_threads(1)
    opts = dict(data_root=root, split="test", out_dir=out, n_bootstrap=20, batch_size=16, num_workers=0)
    return evaluate(ckpt, **{**opts, **kw})


def res_metrics(res):
    import json

    return json.loads((res.out_dir / "metrics.json").read_text())["auroc"]


def _snapshot(path):
    return path.read_bytes(), path.stat().st_mtime_ns


def test_api_leaves_the_checkpoint_untouched_and_write_back_rewrites_it(phantom_root, checkpoint, tmp_path):
    from medxray.checkpoint import load_checkpoint

    before = _snapshot(checkpoint)
    res = _evaluate(checkpoint, phantom_root, tmp_path / "plain", localisation=False)
    assert _snapshot(checkpoint) == before  # bytes and mtime
    assert (tmp_path / "plain" / "report.md").is_file() and res.threshold_split == "val"
    assert "threshold_split" not in load_checkpoint(checkpoint).metadata

    res = _evaluate(checkpoint, phantom_root, tmp_path / "wb", write_back=True, localisation=False)
    data, mtime = _snapshot(checkpoint)
    assert data != before[0] and mtime != OLD_MTIME_NS
    meta = load_checkpoint(checkpoint).metadata
    assert meta["threshold_split"] == "val"
    assert meta["thresholds"] == pytest.approx(res.thresholds)
    assert meta["metrics"]["test_mean_auroc"] == pytest.approx(res.mean_auroc)
    assert meta["metrics"]["val_mean_auroc"] == 0.5  # training's figures kept
    assert meta["localisation"]["source"] == "phantom" and meta["cam_method"]


def test_write_thresholds_is_a_deprecated_alias_of_write_back(phantom_root, checkpoint, tmp_path):
    before = _snapshot(checkpoint)
    with pytest.warns(DeprecationWarning, match="write_back"):
        _evaluate(checkpoint, phantom_root, tmp_path / "off", write_thresholds=False, localisation=False)
    assert _snapshot(checkpoint) == before
    with pytest.raises(ConfigError, match="write_back"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _evaluate(checkpoint, phantom_root, tmp_path / "x", write_back=True, write_thresholds=False)
    assert _snapshot(checkpoint) == before and not (tmp_path / "x").exists()
    with pytest.warns(DeprecationWarning, match="write_back"):
        _evaluate(checkpoint, phantom_root, tmp_path / "on", write_thresholds=True, localisation=False)
    assert _snapshot(checkpoint)[0] != before[0]


def test_stages_hand_typed_records_and_compose_to_evaluate(phantom_root, checkpoint, tmp_path):
    from medxray.evaluation import stages

    with pytest.raises(ConfigError, match="split must be one of"):
        stages.EvalSettings(split="holdout")
    with pytest.raises(ConfigError, match="threshold split"):
        stages.EvalSettings(threshold_split="holdout")
    settings = stages.EvalSettings(
        data_root=phantom_root, out_dir=tmp_path / "s", n_bootstrap=20, batch_size=16, num_workers=0
    )
    loaded = stages.load_stage(checkpoint, settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.precision = "bf16"  # type: ignore[misc]
    assert loaded.synthetic and loaded.precision == "fp32" and len(loaded.label_names) == 14
    scored = stages.score_stage(loaded, settings)
    n = len(loaded.splits.test)
    assert scored.probs.shape == scored.labels.shape == (n, 14) and len(scored.names) == n
    assert scored.localisation_records  # the phantom test split has boxes
    th = stages.threshold_stage(loaded, settings)
    assert th.split == "val" and th.scored is not None and th.scored.probs.shape == (len(loaded.splits.val), 14)
    same = stages.threshold_stage(loaded, dataclasses.replace(settings, threshold_split=None))
    assert same.split == "test" and same.scored is None and same.arrays() is None
    assessed = stages.assess_stage(loaded, scored, th, settings)
    res = _evaluate(checkpoint, phantom_root, tmp_path / "e")  # localisation on, as in the stages above
    assert assessed.result.mean_auroc == pytest.approx(res.mean_auroc)
    assert assessed.result.thresholds == pytest.approx(res.thresholds)
    assert assessed.result.n_images == res.n_images == n and assessed.metrics["auroc"] == res_metrics(res)


def test_is_phantom_root(tmp_path):
    assert not is_phantom_root(None) and not is_phantom_root("") and not is_phantom_root(tmp_path / "missing")
    assert not is_phantom_root(tmp_path)
    (tmp_path / PHANTOM_MARKER).mkdir()  # a folder of that name is not the marker
    assert not is_phantom_root(tmp_path)
    (tmp_path / PHANTOM_MARKER).rmdir()
    (tmp_path / PHANTOM_MARKER).write_text("{}")
    assert is_phantom_root(tmp_path) and is_phantom_root(str(tmp_path))


def test_phantom_marker_alone_decides_loader_report_and_write_back(phantom_root, checkpoint, tmp_path):
    """The same images with and without the marker: the loader's summary, the report's note and the
    localisation source written into the checkpoint all follow is_phantom_root."""
    from medxray.checkpoint import load_checkpoint
    from medxray.data import build_datasets

    plain = tmp_path / "no-marker"
    shutil.copytree(phantom_root, plain, ignore=shutil.ignore_patterns(PHANTOM_MARKER))
    assert not is_phantom_root(plain) and is_phantom_root(phantom_root)
    for root, synthetic in ((phantom_root, True), (plain, False)):
        summary = build_datasets(dataset="chestxray14", data_root=root, image_size=32, augment=False).summary
        assert summary["synthetic"] is synthetic
        out = tmp_path / f"eval-{synthetic}"
        _evaluate(checkpoint, root, out, write_back=True, threshold_split=None, localisation=False)
        assert (PHANTOM_NOTE[:40] in (out / "report.md").read_text()) is synthetic
        assert load_checkpoint(checkpoint).metadata["localisation"]["source"] == ("phantom" if synthetic else "real")


def test_cli_still_writes_back_by_default_and_not_with_no_write_thresholds(phantom_root, checkpoint, tmp_path, capsys):
    from medxray.checkpoint import load_checkpoint
    from medxray.cli import main

    args = ["evaluate", "--checkpoint", str(checkpoint), "--data-root", str(phantom_root), "--split", "test"]
    args += ["--bootstrap", "10", "--num-workers", "0", "--no-localisation", "--batch-size", "16"]
    before = _snapshot(checkpoint)
    assert main([*args, "--out", str(tmp_path / "off"), "--no-write-thresholds"]) == 0
    assert _snapshot(checkpoint) == before
    assert main([*args, "--out", str(tmp_path / "on")]) == 0
    assert _snapshot(checkpoint)[0] != before[0]
    assert load_checkpoint(checkpoint).metadata["threshold_split"] == "val"
    assert "report:" in capsys.readouterr().out
