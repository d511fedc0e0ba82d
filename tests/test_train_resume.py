"""Never lose a run: SIGKILL a real `medxray finetune` process after its first epoch's checkpoint,
resume it, and get exactly the weights of an uninterrupted run (CPU, fp32, same seed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from medxray.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from medxray.data.synthetic import synthesize

    return synthesize(tmp_path_factory.mktemp("phantom") / "root", n_images=80, seed=0, image_size=64, workers=1)


def finetune_argv(root, out, epochs=3):
    return [
        "finetune",
        "--data-root",
        str(root),
        "--model",
        "densenet121",
        "--pretrained",
        "none",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--epochs",
        str(epochs),
        "--precision",
        "fp32",
        "--out",
        str(out),
        "--no-progress",
        "--early-stopping-patience",
        "0",
        "--seed",
        "3",
        "--num-workers",
        "0",
    ]


def cli(argv, env):
    proc = subprocess.run(
        [sys.executable, "-m", "medxray.cli", "-q", *argv], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_sigkill_after_first_epoch_then_resume_gives_identical_weights(phantom_root, tmp_path):
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medxray.cli", "-q", *finetune_argv(phantom_root, killed)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and metrics.read_text().count("\n") >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0].decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # a real, uncatchable kill in the middle of epoch 2
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(killed / "last.pt").extra["training_state"]
    assert state["epoch"] == 1, "the kill must land after epoch 1 and before epoch 2 finished"

    # Resume and the reference run in fresh processes too: the same thread count as the killed
    # run, whatever earlier tests did to this process's torch settings.
    cli(["finetune", "--resume", str(killed), "--no-progress"], env)
    straight = tmp_path / "straight"
    cli(finetune_argv(phantom_root, straight), env)

    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(straight / name), load_checkpoint(killed / name)
        assert a.state_dict.keys() == b.state_dict.keys()
        for k in a.state_dict:
            assert torch.equal(a.state_dict[k], b.state_dict[k]), (name, k)
        assert a.metadata["epoch"] == b.metadata["epoch"]
    rows_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows_b] == [1, 2, 3]
    assert [r["train_loss"] for r in rows_a] == [r["train_loss"] for r in rows_b]
    assert [r["val_mean_auroc"] for r in rows_a] == [r["val_mean_auroc"] for r in rows_b]
