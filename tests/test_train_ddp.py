"""torchrun DDP on CPU (gloo): 2 processes, one short epoch; every validation image is scored
exactly once and the gathered metrics equal a single-process evaluation of the same weights."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from medxray.data.synthetic import synthesize

    return synthesize(tmp_path_factory.mktemp("phantom") / "root", n_images=90, seed=1, image_size=64, workers=1)


def test_two_process_gloo_epoch_scores_each_val_image_once(phantom_root, tmp_path):
    from medxray.data import build_datasets
    from medxray.evaluation.run import evaluate

    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "medxray.cli",
        "-q",
        "finetune",
        "--data-root",
        str(phantom_root),
        "--model",
        "densenet121",
        "--pretrained",
        "none",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--precision",
        "fp32",
        "--out",
        str(out),
        "--no-progress",
        "--num-workers",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    splits = build_datasets("chestxray14", phantom_root, image_size=32, val_fraction=0.1, split_seed=0, augment=False)
    n_val = len(splits.val)

    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["world_size"] == 2
    assert row["val_images"] == row["val_images_scored"] == row["val_images_unique"] == n_val

    with open(out / "val_predictions.csv", newline="") as fh:
        names = [r["name"] for r in csv.DictReader(fh)]
    assert len(names) == len(set(names)) == n_val
    assert sorted(names) == sorted(splits.val.names)

    # The gathered validation AUROC equals one process scoring the saved weights itself.
    ev = evaluate(
        out / "best.pt",
        data_root=phantom_root,
        split="val",
        out_dir=tmp_path / "ev",
        n_bootstrap=0,
        precision="fp32",
        num_workers=0,
        localisation=False,
        threshold_split=None,
    )
    assert ev.n_images == n_val
    assert ev.mean_auroc == pytest.approx(row["val_mean_auroc"], abs=2e-3)
    # only rank 0 wrote: one line per epoch, no duplicate files from rank 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
