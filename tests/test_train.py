"""Unit tests of the fine-tuning loop on a tiny in-memory dataset (no files, no data layer).

The fake dataset obeys the data contract (dict items with image/label/mask/name/orig_size) and
is learnable: finding c paints a bright square into quadrant c.
"""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import Dataset

from medxray.checkpoint import load_checkpoint, model_from_checkpoint
from medxray.errors import ConfigError
from medxray.hardware import autocast
from medxray.training.config import TrainConfig, make_config
from medxray.training.data import positive_weights
from medxray.training.loop import TrainingDivergedError, finetune
from medxray.training.steps import masked_bce_with_logits

LABELS = ["A", "B", "C"]
SMALL = dict(
    model="densenet_40_k12",
    pretrained="none",
    image_size=16,
    batch_size=8,
    lr=3e-3,
    precision="fp32",
    progress=False,
    num_workers=0,
)


class FakeXray(Dataset):
    """Finding c present -> bright square in quadrant c; a few labels unknown (mask 0)."""

    def __init__(
        self, n: int, size: int = 16, seed: int = 0, nan: bool = False, crash_after: int | None = None
    ) -> None:
        rng = np.random.default_rng(seed)
        self.labels = (rng.random((n, len(LABELS))) < 0.4).astype(np.float32)
        self.mask = np.ones_like(self.labels)
        self.mask[rng.random(self.labels.shape) < 0.05] = 0
        self.size, self.seed, self.n, self.nan = size, seed, n, nan
        self.crash_after, self.calls = crash_after, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise RuntimeError("simulated crash")
        g = torch.Generator().manual_seed(self.seed * 100_000 + i)
        s, h = self.size, self.size // 2
        img = torch.randn(3, s, s, generator=g) * 0.5
        for c in range(len(LABELS)):
            if self.labels[i, c]:
                y0, x0 = (c // 2) * h, (c % 2) * h
                img[:, y0 + 1 : y0 + h - 1, x0 + 1 : x0 + h - 1] += 2.0
        if self.nan:
            img[:] = float("nan")
        return {
            "image": img,
            "label": torch.from_numpy(self.labels[i]),
            "mask": torch.from_numpy(self.mask[i]),
            "name": f"img{self.seed}_{i:04d}.png",
            "orig_size": (64, 64),
        }


def fake_splits(
    n_train: int = 32, n_val: int = 24, nan: bool = False, crash_after: int | None = None
) -> SimpleNamespace:
    return SimpleNamespace(
        train=FakeXray(n_train, seed=1, nan=nan, crash_after=crash_after),
        val=FakeXray(n_val, seed=2),
        test=FakeXray(16, seed=3),
        label_names=list(LABELS),
        manifest_hash="fake-manifest",
        summary={"counts": {"train": n_train, "val": n_val}},
        boxes={},
    )


# ---- configuration -------------------------------------------------------------------------


def test_yaml_config_sets_options_and_rejects_unknown_keys(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"epochs": 3, "lr": 0.01, "image-size": 64, "scheduler": "cosine"}))
    cfg = make_config(good, batch_size=4)
    assert (cfg.epochs, cfg.lr, cfg.image_size, cfg.scheduler, cfg.batch_size) == (3, 0.01, 64, "cosine", 4)
    # command-line options win over the file
    assert make_config(good, epochs=5).epochs == 5

    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        make_config(bad)
    with pytest.raises(ConfigError, match="epochs"):
        make_config(epochs="three")
    with pytest.raises(ConfigError, match="unknown dataset"):
        make_config(dataset="mnist")
    with pytest.raises(ConfigError, match="fp16"):
        finetune(make_config(precision="fp16", device="cpu", data_root=str(tmp_path)))


def test_every_option_round_trips_through_yaml(tmp_path):
    cfg = TrainConfig(epochs=2, betas=[0.8, 0.99], dataset_options={"aug_seed": 3}, max_per_patient=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert make_config(path) == cfg


# ---- loss ---------------------------------------------------------------------------------


def test_masked_bce_ignores_unknown_labels():
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.randint(0, 2, (4, 3)).float()
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.float32)
    loss = masked_bce_with_logits(logits, labels, mask)
    loss.backward()
    assert torch.all(logits.grad[mask == 0] == 0)
    assert torch.all(logits.grad[mask == 1] != 0)
    known = mask == 1
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], labels[known])
    assert torch.allclose(loss, ref)
    # changing an unknown label changes nothing
    labels2 = labels.clone()
    labels2[0, 1] = 1 - labels2[0, 1]
    assert torch.allclose(masked_bce_with_logits(logits, labels2, mask), loss)
    # positive weighting raises the loss of positives only
    pw = torch.tensor([3.0, 1.0, 1.0])
    assert masked_bce_with_logits(logits, labels, mask, pw) >= loss - 1e-6


# ---- precision ------------------------------------------------------------------------------


def test_bf16_autocast_agrees_with_fp32(tmp_path):
    """bf16 autocast (the CPU default here) must give fp32's outputs, loss, head gradient and,
    above all, the same training result."""
    from medxray.models import create_model

    torch.manual_seed(0)
    model = create_model("densenet_40_k12", num_classes=3).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(8, 3) > 0.5).float()
    m = torch.ones_like(y)
    dev = torch.device("cpu")
    results = {}
    for prec in ("fp32", "bf16"):
        model.zero_grad()
        with autocast(dev, prec):
            logits = model(x)
        loss = masked_bce_with_logits(logits, y, m)
        loss.backward()
        results[prec] = (logits.float().detach(), loss.item(), model.classifier.weight.grad.flatten().clone())
    (l32, loss32, g32), (l16, loss16, g16) = results["fp32"], results["bf16"]
    assert l16.dtype == torch.float32
    assert (l16 - l32).abs().max() < 0.05 * max(1.0, l32.abs().max().item())
    assert abs(loss16 - loss32) < 0.01 * max(1.0, abs(loss32))
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0).item() > 0.99

    runs = {}
    for prec in ("fp32", "bf16"):
        runs[prec] = finetune(
            TrainConfig(**{**SMALL, "precision": prec}, epochs=2, out=str(tmp_path / prec)), splits=fake_splits()
        )
    a, b = runs["fp32"], runs["bf16"]
    assert a.best_val_auroc > 0.8 and b.best_val_auroc > 0.8, (a.history, b.history)
    assert abs(a.best_val_auroc - b.best_val_auroc) < 0.06
    for ra, rb in zip(a.history, b.history):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 0.1 * ra["train_loss"] + 0.02


# ---- the loop -------------------------------------------------------------------------------


def test_finetune_learns_and_writes_a_complete_run(tmp_path):
    run = tmp_path / "run"
    state_before = torch.get_rng_state().clone()
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    res = finetune(TrainConfig(**SMALL, epochs=3, out=str(run)), splits=fake_splits())
    # the caller's global RNG state is given back untouched
    assert torch.equal(torch.get_rng_state(), state_before)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before

    for f in ("config.yaml", "run.json", "metrics.jsonl", "last.pt", "best.pt", "val_predictions.csv"):
        assert (run / f).is_file(), f
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["val_images_scored"] == r["val_images"] == 24 for r in rows)
    assert res.best_val_auroc == max(r["val_mean_auroc"] for r in rows)
    assert res.best_val_auroc > 0.8, rows  # the squares are easy to learn
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]

    ckpt = load_checkpoint(res.best_checkpoint)
    meta = ckpt.metadata
    for key in (
        "architecture",
        "num_classes",
        "in_chans",
        "label_names",
        "preprocessing",
        "thresholds",
        "metrics",
        "versions",
        "git_commit",
        "data_manifest_hash",
        "model_version",
    ):
        assert key in meta, key
    assert meta["label_names"] == LABELS and meta["architecture"] == "densenet_40_k12"
    assert meta["preprocessing"]["image_size"] == 16 and meta["data_manifest_hash"] == "fake-manifest"
    assert meta["metrics"]["val_mean_auroc"] == pytest.approx(res.best_val_auroc)
    assert meta["epoch"] == res.best_epoch
    model = model_from_checkpoint(res.best_checkpoint)
    assert not model.training
    last = load_checkpoint(res.last_checkpoint)
    st = last.extra["training_state"]
    assert st["epoch"] == 3 and {"optimizer", "scheduler", "scaler", "rng", "history"} <= set(st)
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 3
    # a second run into the same folder is refused instead of overwriting it
    with pytest.raises(ConfigError, match="--resume"):
        finetune(TrainConfig(**SMALL, epochs=1, out=str(run)), splits=fake_splits())


def test_resume_continues_to_identical_weights(tmp_path):
    """In-process version of the kill test: a run that crashes in epoch 2 and is resumed ends
    with the weights of an uninterrupted run (augmentation, data order, RNG, optimizer and
    cosine schedule all restored)."""
    base = dict(SMALL, scheduler="cosine", epochs=2)
    straight = finetune(TrainConfig(**base, out=str(tmp_path / "a")), splits=fake_splits())
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(TrainConfig(**base, out=str(tmp_path / "b")), splits=fake_splits(crash_after=32 + 5))
    assert load_checkpoint(tmp_path / "b" / "last.pt").extra["training_state"]["epoch"] == 1
    resumed = finetune(TrainConfig(resume=str(tmp_path / "b"), progress=False), splits=fake_splits())
    assert resumed.epochs_completed == 2
    a = load_checkpoint(straight.last_checkpoint)
    b = load_checkpoint(resumed.last_checkpoint)
    for k, v in a.state_dict.items():
        assert torch.equal(v, b.state_dict[k]), k
    assert [r["train_loss"] for r in a.extra["training_state"]["history"]] == [
        r["train_loss"] for r in b.extra["training_state"]["history"]
    ]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    # a finished run resumes to a no-op
    again = finetune(TrainConfig(resume=str(tmp_path / "b"), progress=False), splits=fake_splits())
    assert again.epochs_completed == 2
    # changing what the run was trained with is refused
    with pytest.raises(ConfigError, match="model"):
        finetune(TrainConfig(resume=str(tmp_path / "b"), model="densenet_bc_100_k12"), splits=fake_splits())


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    finetune(TrainConfig(**SMALL, epochs=1, out=str(run)), splits=fake_splits())
    before = load_checkpoint(run / "last.pt")
    with pytest.raises(TrainingDivergedError, match=r"non-finite.*epoch 2.*last good checkpoint"):
        finetune(TrainConfig(resume=str(run), epochs=3, progress=False), splits=fake_splits(nan=True))
    after = load_checkpoint(run / "last.pt")
    assert after.extra["training_state"]["epoch"] == 1
    for k, v in before.state_dict.items():
        assert torch.equal(v, after.state_dict[k])
    assert all(torch.isfinite(v.float()).all() for v in after.state_dict.values())


def test_batch_larger_than_training_set_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="batch size 64 is larger than the training set"):
        finetune(TrainConfig(**{**SMALL, "batch_size": 64}, out=str(tmp_path / "r")), splits=fake_splits())


def test_positive_weights_are_negatives_over_positives_of_known_labels():
    ds = FakeXray(40, seed=5)
    w = positive_weights(ds)
    for c in range(len(LABELS)):
        k = ds.mask[:, c] == 1
        pos, neg = ds.labels[k, c].sum(), (1 - ds.labels[k, c]).sum()
        assert w[c] == pytest.approx(max(1.0, neg / pos))


def test_early_stopping_and_balanced_weights(tmp_path):
    """A validation set without any known label gives a constant score: patience 1 stops after epoch 2."""
    splits = fake_splits()
    splits.val.mask[:] = 0
    res = finetune(
        TrainConfig(
            **SMALL,
            epochs=5,
            early_stopping_patience=1,
            pos_weight="balanced",
            scheduler="plateau",
            tensorboard=True,
            out=str(tmp_path / "r"),
        ),
        splits=splits,
    )
    assert res.epochs_completed == 2 and res.stopped_reason.startswith("early stopping")
    assert res.best_epoch == 1 and (tmp_path / "r" / "best.pt").is_file()
    assert math.isnan(res.history[0]["val_mean_auroc"])
    # TensorBoard is optional: logs when installed, a warning (not a failure) when not
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert not (tmp_path / "r" / "tensorboard").exists()
    else:
        assert (tmp_path / "r" / "tensorboard").is_dir()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_mixed_precision_training(tmp_path, precision):
    """fp16 uses a GradScaler whose state is saved for --resume; bf16 needs none."""
    res = finetune(
        TrainConfig(**{**SMALL, "precision": precision}, device="cuda", epochs=2, out=str(tmp_path / "r")),
        splits=fake_splits(),
    )
    assert res.best_val_auroc > 0.8
    st = load_checkpoint(res.last_checkpoint).extra["training_state"]
    assert bool(st["scaler"]) == (precision == "fp16")


def test_medxray_train_stays_the_stable_entry_point():
    """`medxray.train` re-exports the training package's objects (not copies of them)."""
    import medxray.train as compat
    from medxray.training import config, loop, steps

    assert compat.finetune is loop.finetune
    assert compat.TrainConfig is config.TrainConfig
    assert compat.make_config is config.make_config
    assert compat.load_config_file is config.load_config_file
    assert compat.train_step is steps.train_step
    assert all(hasattr(compat, name) for name in compat.__all__)
