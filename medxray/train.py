"""Fine-tuning: ``finetune(config) -> FinetuneResult``.

Defaults follow CheXNet (Rajpurkar et al. 2017): DenseNet-121 from ImageNet with a new
14-way head, 224 px, batch 16, Adam(0.9, 0.999) at 1e-3 divided by 10 when the validation loss
plateaus, best checkpoint by validation mean AUROC. The loss is BCE-with-logits over the known
labels only (the dataset's mask), optionally with per-class positive weights.

A run never gets lost: every epoch writes ``last.pt`` (model + optimizer + scheduler + scaler +
RNG states + history) atomically, improvements write ``best.pt`` (model + metadata for
inference), and ``--resume RUN_DIR`` continues after the last completed epoch. Each epoch's
data order and augmentation are derived from ``(seed, epoch)`` alone, so an interrupted and
resumed run ends with the same weights as an uninterrupted one.

The same code runs under ``torchrun`` (DDP; gloo on CPU, NCCL on CUDA): rank 0 writes files,
and validation is sharded by index and gathered so each image is scored exactly once.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import datetime
import difflib
import functools
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import Dataset

from medxray import __version__
from medxray import distributed as mdist
from medxray.checkpoint import load_checkpoint, save_checkpoint
from medxray.errors import CheckpointError, ConfigError, DataError, MedxrayError
from medxray.data import DATASETS
from medxray.data.loading import IndexedDataset, make_loader, plain_tensor
from medxray.fileio import atomic_output, atomic_write_text, json_line, load_yaml_mapping, to_jsonable
from medxray.hardware import PRECISIONS, autocast, default_num_workers, resolve_device, resolve_precision

log = logging.getLogger(__name__)

SCHEDULERS: tuple[str, ...] = ("plateau", "cosine", "none")
POS_WEIGHTS: tuple[str, ...] = ("none", "balanced")
VIEWS: tuple[str, ...] = ("all", "PA", "AP")
# Options a resumed run may change; everything else must match the stored config.
RESUME_OVERRIDABLE: frozenset[str] = frozenset(
    {"epochs", "device", "num_workers", "progress", "tensorboard", "early_stopping_patience", "eval_batch_size",
     "resume", "out", "max_steps_per_epoch"}
)
RUN_FILES = {"config": "config.yaml", "run": "run.json", "metrics": "metrics.jsonl", "last": "last.pt",
             "best": "best.pt", "val_predictions": "val_predictions.csv"}


class TrainingDivergedError(MedxrayError):
    """The loss became NaN/inf: the run stops, and the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Every option of a fine-tuning run; a YAML file may set any of them by name."""

    # data
    dataset: str = "chestxray14"
    data_root: str | None = None
    image_size: int = 224
    val_fraction: float = 0.1
    split_seed: int = 0
    view: str = "all"
    max_per_patient: int | None = None
    allow_missing: bool = False
    use_cache: bool = True
    augment: bool = True
    dataset_options: dict = field(default_factory=dict)
    # model
    model: str = "densenet121"
    pretrained: str = "imagenet"  # "imagenet" | "none" | path to a torchvision-format state dict
    drop_rate: float = 0.0
    memory_efficient: bool = False
    # optimisation
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    pos_weight: str = "none"  # "balanced": negatives / positives per class from the training labels
    scheduler: str = "plateau"  # plateau (on val loss, CheXNet) | cosine | none
    plateau_factor: float = 0.1
    plateau_patience: int = 1
    min_lr: float = 1e-6
    early_stopping_patience: int = 3  # epochs without a better val mean AUROC; 0 = never stop early
    grad_clip_norm: float | None = None
    # run
    out: str | None = None  # run directory; default runs/<dataset>-<model>-<timestamp>
    resume: str | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto: bf16 on CUDA and on CPUs with bf16 support, else fp32; fp16 = CUDA + GradScaler
    channels_last: bool = True
    compile: bool = False
    num_workers: int | None = None  # None: 0 on small CPU machines, more with CUDA
    eval_batch_size: int | None = None  # None: 2 x batch_size
    max_steps_per_epoch: int | None = None  # cap on training batches per epoch (smoke runs, benchmarks)
    deterministic: bool = False  # torch.use_deterministic_algorithms for the run (slower)
    progress: bool = True
    tensorboard: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check one option's type (YAML and CLI give plain values); ints are fine where floats are."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"option {name!r} cannot be empty")
    origin = typing.get_origin(base) or base
    ok = True
    if origin is bool:
        ok = isinstance(value, bool)
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif origin is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        ok = isinstance(value, str)
    elif origin is dict:
        ok = isinstance(value, Mapping)
        value = dict(value) if ok else value
    elif origin is list:
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    if not ok:
        want = getattr(origin, "__name__", str(origin))
        raise ConfigError(f"option {name!r} must be a {want}{' or null' if optional else ''}, got {value!r}")
    return value


def make_config(config_file: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the YAML file, then ``overrides``; unknown keys are errors, not ignored."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_config_file(config_file))
    values.update(_check_keys(overrides, source="options"))
    return _build_config(values)


# Names other trainers use for our options, for the "did you mean" hint.
_ALIASES = {"learning_rate": "lr", "num_epochs": "epochs", "max_epochs": "epochs", "bs": "batch_size",
            "arch": "model", "architecture": "model", "root": "data_root", "workers": "num_workers",
            "lr_scheduler": "scheduler", "patience": "early_stopping_patience", "amp": "precision",
            "img_size": "image_size", "input_size": "image_size", "output_dir": "out", "resume_from": "resume"}


def _check_keys(mapping: Mapping[str, Any], source: str) -> dict[str, Any]:
    known = set(config_fields())
    out = {}
    for key, value in mapping.items():
        k = str(key).replace("-", "_")
        if k not in known:
            close = [_ALIASES[k]] if k in _ALIASES else difflib.get_close_matches(k, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}; valid keys: {', '.join(sorted(known))}")
        out[k] = value
    return out


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config; every key must be a :class:`TrainConfig` field."""
    return _check_keys(load_yaml_mapping(path), source=str(path))


def _build_config(values: Mapping[str, Any]) -> TrainConfig:
    hints = _hints()
    cfg = TrainConfig(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """Reject values that cannot work, each with a message naming the option."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.dataset in DATASETS, f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    need(cfg.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    need(cfg.scheduler in SCHEDULERS, f"scheduler must be one of {', '.join(SCHEDULERS)}, got {cfg.scheduler!r}")
    need(cfg.pos_weight in POS_WEIGHTS, f"pos_weight must be one of {', '.join(POS_WEIGHTS)}, got {cfg.pos_weight!r}")
    need(cfg.view in VIEWS, f"view must be one of {', '.join(VIEWS)}, got {cfg.view!r}")
    need(cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"batch size must be >= 1, got {cfg.batch_size}")
    need(cfg.image_size >= 16, f"image size must be >= 16 pixels, got {cfg.image_size}")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"learning rate must be a positive number, got {cfg.lr}")
    need(0.0 < cfg.val_fraction < 1.0, f"val_fraction must be between 0 and 1, got {cfg.val_fraction}")
    need(len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), f"betas must be two numbers in [0, 1), got {cfg.betas}")
    need(0 < cfg.plateau_factor < 1, f"plateau_factor must be in (0, 1), got {cfg.plateau_factor}")
    need(cfg.early_stopping_patience >= 0, "early_stopping_patience must be >= 0 (0 = off)")
    need(cfg.num_workers is None or cfg.num_workers >= 0, "num_workers must be >= 0")
    need(cfg.max_steps_per_epoch is None or cfg.max_steps_per_epoch >= 1, "max_steps_per_epoch must be >= 1")
    dev = cfg.device
    need(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
         f"device must be auto, cpu, cuda or cuda:N, got {dev!r}")


def save_config(cfg: TrainConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------------------------
# data plumbing


def epoch_dataset(dataset: Dataset, seed: int) -> Dataset:
    """The training set with its augmentation seeded for this epoch.

    medxray's XrayDataset seeds its lazily built random pipeline from ``aug_seed`` in the main
    process (workers seed from the loader). A fresh shallow copy per epoch (its pickled state drops
    the built pipeline) with ``aug_seed`` set from ``(seed, epoch)`` makes epoch e's augmentation
    the same whether or not the run was interrupted before it. Other datasets are seeded by the
    MONAI DataLoader (``set_random_state`` on their transforms).
    """
    if hasattr(dataset, "aug_seed"):
        ds = copy.copy(dataset)
        ds.aug_seed = int(seed) % (2**31)
        return ds
    return dataset


def masked_bce_with_logits(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, pos_weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """BCE over known labels only (mask 1); unknown labels contribute neither loss nor gradient."""
    per = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none", pos_weight=pos_weight)
    total = (per * mask).sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp_min(1.0)


def train_step(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, *, device: torch.device, precision: str, channels_last: bool = True,
    pos_weight: torch.Tensor | None = None, grad_clip_norm: float | None = None,
    check: Any = None,
) -> float:
    """One optimisation step (the training loop's and ``bench/train_step.py``'s); returns the loss.

    ``check(loss_value)`` runs before the backward pass, so a non-finite loss can stop the run
    before it touches the weights.
    """
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = y.to(device, non_blocking=True)
    m = m.to(device, non_blocking=True)
    with autocast(device, precision):
        logits = net(x)
    loss = masked_bce_with_logits(logits, y, m, pos_weight)
    value = float(loss.detach())
    if check is not None:
        check(value)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip_norm:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return value


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam as CheXNet used it; the fused kernel on CPU and CUDA (one pass over all parameters)."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                            fused=device.type in ("cpu", "cuda"))


@torch.no_grad()
def predict_dataset(
    model: torch.nn.Module, dataset: Dataset, *, device: torch.device, precision: str, batch_size: int,
    channels_last: bool = True, num_workers: int = 0, info: mdist.DistInfo | None = None,
) -> dict[str, Any]:
    """Score every item of ``dataset`` once (sharded by index across ranks, gathered back in order).

    Returns ``probs``, ``labels``, ``masks`` (N, C) arrays, ``names``, and the masked mean BCE ``loss``.
    """
    info = info or mdist.DistInfo()
    n = len(dataset)  # type: ignore[arg-type]
    shard = IndexedDataset(dataset, mdist.shard_indices(n, info))
    loader = make_loader(shard, batch_size=batch_size, seed=0, num_workers=num_workers,
                         pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    idx, probs, labels, masks, names, losses = [], [], [], [], [], []
    try:
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                logits = model(x)
            logits = logits.float().cpu()
            y, m = batch["label"], batch["mask"]
            losses.append(F.binary_cross_entropy_with_logits(logits, y, reduction="none") * m)
            idx.append(batch["index"].numpy())
            probs.append(torch.sigmoid(logits).numpy())
            labels.append(y.numpy())
            masks.append(m.numpy())
            names.extend(batch["name"])
    finally:
        model.train(was_training)
    c = len(probs[0][0]) if probs else 0
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros((0, c), dtype=np.float32))  # noqa: E731
    loss_rows = torch.cat(losses).numpy() if losses else np.zeros((0, c), dtype=np.float32)
    order, (p, y, m, lr, nm) = mdist.gather_by_index(
        np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64),
        [cat(probs), cat(labels), cat(masks), loss_rows, np.asarray(names, dtype=object)], info, n,
    )
    loss = float(lr.sum() / max(1.0, float(m.sum())))
    return {"index": order, "probs": p, "labels": y, "masks": m, "names": list(nm), "loss": loss}


# --------------------------------------------------------------------------------------------
# run bookkeeping


@dataclass
class FinetuneResult:
    """What a run produced; ``best_checkpoint`` is the file inference and evaluation use."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_val_auroc: float
    epochs_completed: int
    stopped_reason: str
    history: list[dict[str, Any]]
    label_names: list[str]
    data_summary: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, str]:
    """Library versions stored with every run and checkpoint."""
    out = {"medxray": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    for mod in ("torchvision", "monai"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # optional at inference time
            pass
    return out


def git_commit() -> str | None:
    """The source tree's commit (None outside a git checkout)."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return res.stdout.strip() or None if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def scoped_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed Python, NumPy and torch for the run, and give the caller's RNG states back afterwards."""
    saved_py, saved_np, saved_torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
    saved_cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved_py)
        np.random.set_state(saved_np)
        torch.set_rng_state(saved_torch)
        if saved_cuda is not None:
            torch.cuda.set_rng_state_all(saved_cuda)


def rng_states(device: torch.device) -> dict[str, Any]:
    st = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [st[0], torch.from_numpy(np.asarray(st[1], dtype=np.int64)), int(st[2]), int(st[3]), float(st[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def set_rng_states(states: Mapping[str, Any], device: torch.device) -> None:
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = states["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state_all(states["cuda"])


# --------------------------------------------------------------------------------------------
# the run


def finetune(config: TrainConfig | Mapping[str, Any], *, splits: Any = None) -> FinetuneResult:
    """Fine-tune a DenseNet on a chest X-ray dataset and return where the checkpoints are.

    ``splits`` lets programmatic callers pass an object shaped like
    :func:`medxray.data.build_datasets`' result instead of building one from the config.
    """
    cfg = config if isinstance(config, TrainConfig) else make_config(**dict(config))
    validate_config(cfg)
    resume_state: dict[str, Any] | None = None
    if cfg.resume:
        cfg, resume_state = _prepare_resume(cfg)
    info = mdist.env_dist_info()
    device = resolve_device(cfg.device, info.local_rank)
    precision = resolve_precision(cfg.precision, device)
    info = mdist.init_distributed(device.type)
    try:
        with scoped_rng(cfg.seed, device), _deterministic(cfg.deterministic):
            run = _Run(cfg, device, precision, info, splits, resume_state)
            return run.fit()
    finally:
        mdist.shutdown(info)


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _prepare_resume(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """Stored config + allowed overrides, and the training state of the last completed epoch."""
    run_dir = Path(cfg.resume).expanduser()  # type: ignore[arg-type]
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such run directory")
    cfg_path, last = run_dir / RUN_FILES["config"], run_dir / RUN_FILES["last"]
    if not cfg_path.is_file():
        raise ConfigError(f"--resume {run_dir}: not a medxray run directory (no {RUN_FILES['config']})")
    if not last.is_file():
        raise CheckpointError(
            f"--resume {run_dir}: no completed epoch to resume from ({RUN_FILES['last']} missing); start the run again"
        )
    stored = make_config(cfg_path)
    defaults = TrainConfig()
    merged = stored.to_dict()
    for f in dataclasses.fields(TrainConfig):
        given, default, old = getattr(cfg, f.name), getattr(defaults, f.name), getattr(stored, f.name)
        if given == default or given == old:
            continue
        if f.name not in RESUME_OVERRIDABLE:
            raise ConfigError(
                f"--resume {run_dir}: the run was started with {f.name}={old!r}, not {given!r}; a resumed run "
                f"keeps its config (only {', '.join(sorted(RESUME_OVERRIDABLE - {'resume', 'out'}))} may change). "
                f"Start a new run with --out to change it"
            )
        merged[f.name] = given
    merged["resume"] = str(run_dir)
    merged["out"] = str(run_dir)
    ckpt = load_checkpoint(last)
    state = ckpt.extra.get("training_state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{last} has no training state; it cannot be resumed")
    if ckpt.metadata.get("architecture") != stored.model:
        raise CheckpointError(
            f"{last} holds a {ckpt.metadata.get('architecture')} but the run config says {stored.model}"
        )
    state = dict(state, model_state=ckpt.state_dict, metadata=ckpt.metadata)
    return _build_config(merged), state


class _Run:
    """State of one fine-tuning run (model, optimiser, data, bookkeeping)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, precision: str, info: mdist.DistInfo,
                 splits: Any, resume_state: dict[str, Any] | None) -> None:
        self.cfg, self.device, self.precision, self.info = cfg, device, precision, info
        self.resume_state = resume_state
        self.run_dir = self._run_dir()
        self.splits = splits if splits is not None else self._build_splits()
        self.label_names = list(self.splits.label_names)
        self.manifest_hash = str(getattr(self.splits, "manifest_hash", "") or "")
        self._check_data()
        self.num_workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(device)
        self._build_model()
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.best_score = -math.inf
        self.best_epoch = 0
        self.best_auroc = float("nan")
        self.bad_epochs = 0
        self.stopped: str | None = None
        if resume_state is not None:
            self._restore(resume_state)
        self.tb = self._tensorboard()

    # ---- setup ----------------------------------------------------------------------------

    def _run_dir(self) -> Path:
        cfg = self.cfg
        if cfg.out:
            path = str(Path(cfg.out).expanduser())
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = str(Path("runs") / f"{cfg.dataset}-{cfg.model}-{stamp}")
        path = mdist.all_gather_objects(path, self.info)[0]  # rank 0's choice
        run_dir = Path(path)
        # Checked on every rank (same answer on a shared file system), so none waits for a
        # rank that has already given up.
        if self.resume_state is None and (run_dir / RUN_FILES["last"]).exists():
            raise ConfigError(
                f"{run_dir} already holds a run (last.pt); continue it with --resume {run_dir} or choose another --out"
            )
        if self.info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir

    def _build_splits(self) -> Any:
        cfg = self.cfg
        if not cfg.data_root:
            raise ConfigError("--data-root is required: the folder holding the dataset's images and label file")
        root = Path(cfg.data_root).expanduser()
        if not root.exists():
            raise DataError(f"data root {root} does not exist; pass the folder that holds the {cfg.dataset} data")
        if not root.is_dir():
            raise DataError(f"data root {root} is not a folder")
        from medxray.data import build_datasets

        kwargs = dict(image_size=cfg.image_size, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                      view=cfg.view, max_per_patient=cfg.max_per_patient, allow_missing=cfg.allow_missing,
                      use_cache=cfg.use_cache, augment=cfg.augment, **cfg.dataset_options)

        def build() -> Any:
            return build_datasets(dataset=cfg.dataset, data_root=root, **kwargs)

        if not self.info.enabled:
            return build()
        # Rank 0 builds first (it may write the preprocessing cache); the others follow, or
        # re-raise rank 0's error instead of waiting forever.
        splits, err = None, None
        if self.info.is_main:
            try:
                splits = build()
            except MedxrayError as exc:
                err = exc
        status = mdist.all_gather_objects(None if err is None else (type(err).__name__, str(err)), self.info)[0]
        if err is not None:
            raise err
        if status is not None:
            raise DataError(status[1])
        return splits if splits is not None else build()

    def _check_data(self) -> None:
        cfg, s = self.cfg, self.splits
        if s.train is None or len(s.train) == 0:
            raise DataError("the training split is empty; check the data root and the split options")
        if s.val is None or len(s.val) == 0:
            raise DataError("the validation split is empty; raise val_fraction or add images")
        per_rank = len(s.train) // self.info.world_size
        if cfg.batch_size > per_rank:
            raise ConfigError(
                f"batch size {cfg.batch_size} is larger than the training set ({len(s.train)} images"
                f"{f' over {self.info.world_size} processes' if self.info.enabled else ''}); use --batch-size "
                f"{max(1, min(per_rank, 16))} or fewer"
            )
        if self.resume_state is not None:
            old = self.resume_state["metadata"].get("data_manifest_hash")
            if old and self.manifest_hash and old != self.manifest_hash:
                raise DataError(
                    f"the data changed since the run started (manifest hash {old[:12]} -> {self.manifest_hash[:12]}); "
                    f"resume with the same data or start a new run"
                )
            if list(self.resume_state["metadata"].get("label_names", [])) != self.label_names:
                raise DataError("the dataset's label names differ from the run's; resume with the same data")

    def _build_model(self) -> None:
        from medxray.models import create_model

        cfg = self.cfg
        pretrained = None if (self.resume_state is not None or cfg.pretrained.lower() in ("none", "")) else cfg.pretrained
        self.model = create_model(cfg.model, num_classes=len(self.label_names), pretrained=pretrained,
                                  memory_efficient=cfg.memory_efficient, drop_rate=cfg.drop_rate)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        net: torch.nn.Module = self.model
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            net = torch.compile(net)  # type: ignore[assignment]
        self.net = net
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        if cfg.scheduler == "plateau":
            self.scheduler: Any = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr)
        elif cfg.scheduler == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.epochs, eta_min=cfg.min_lr)
        else:
            self.scheduler = None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.pos_weight = self._pos_weight()

    def _pos_weight(self) -> torch.Tensor | None:
        if self.cfg.pos_weight == "none":
            return None
        w = positive_weights(self.splits.train)
        log.info("positive weights: %s", ", ".join(f"{n}={v:.1f}" for n, v in zip(self.label_names, w)))
        return torch.tensor(w, dtype=torch.float32, device=self.device)

    def _restore(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model_state"])
        self.optimizer.load_state_dict(st["optimizer"])
        if self.scheduler is not None and st.get("scheduler") is not None:
            self.scheduler.load_state_dict(st["scheduler"])
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        set_rng_states(st["rng"], self.device)
        self.start_epoch = int(st["epoch"])
        self.history = list(st.get("history", []))
        self.best_score = float(st.get("best_score", -math.inf))
        self.best_epoch = int(st.get("best_epoch", 0))
        self.best_auroc = float(st.get("best_auroc", float("nan")))
        self.bad_epochs = int(st.get("bad_epochs", 0))
        self.stopped = st.get("stopped")
        if self.info.is_main:
            # metrics.jsonl may hold a line for an epoch whose last.pt never landed: rewrite it from
            # the history that the checkpoint vouches for.
            atomic_write_text(self.run_dir / RUN_FILES["metrics"], "".join(json_line(r) + "\n" for r in self.history))
        log.info("resuming %s after epoch %d", self.run_dir, self.start_epoch)

    def _tensorboard(self) -> Any:
        if not (self.cfg.tensorboard and self.info.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("TensorBoard is not installed (pip install tensorboard); continuing without it")
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    # ---- bookkeeping --------------------------------------------------------------------

    def metadata(self, epoch: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        from medxray.data.transforms import preprocessing_config

        cfg = self.cfg
        return to_jsonable({
            "architecture": cfg.model,
            "num_classes": len(self.label_names),
            "in_chans": 3,
            "label_names": self.label_names,
            "preprocessing": preprocessing_config(cfg.image_size),
            "thresholds": {n: 0.5 for n in self.label_names},
            "metrics": dict(metrics),
            "versions": versions(),
            "git_commit": git_commit(),
            "data_manifest_hash": self.manifest_hash,
            "dataset": cfg.dataset,
            "pretrained": cfg.pretrained,
            "model_version": f"{cfg.model}-{self.run_dir.name}-e{epoch:03d}",
            "epoch": epoch,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": cfg.to_dict(),
        })

    def _write_run_info(self) -> None:
        if not self.info.is_main:
            return
        save_config(self.cfg, self.run_dir / RUN_FILES["config"])
        summary = getattr(self.splits, "summary", {}) or {}
        info = {"versions": versions(), "git_commit": git_commit(), "data_manifest_hash": self.manifest_hash,
                "data_summary": summary, "device": str(self.device), "precision": self.precision,
                "world_size": self.info.world_size, "num_workers": self.num_workers,
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": sys.argv}
        atomic_write_text(self.run_dir / RUN_FILES["run"], json.dumps(to_jsonable(info), indent=2, default=str))

    # ---- training ------------------------------------------------------------------------

    def fit(self) -> FinetuneResult:
        cfg = self.cfg
        if self.resume_state is None:
            self._write_run_info()
        elif self.info.is_main:
            save_config(cfg, self.run_dir / RUN_FILES["config"])
        if self.stopped or self.start_epoch >= cfg.epochs:
            log.info("run %s already finished (%s); nothing to do", self.run_dir, self.stopped or "all epochs done")
        else:
            log.info("training %s (%s) on %s, %s, %d train / %d val images, %d epochs, batch %d, %d px -> %s",
                     cfg.model, f"pretrained={cfg.pretrained}", self.device, self.precision, len(self.splits.train),
                     len(self.splits.val), cfg.epochs, cfg.batch_size, cfg.image_size, self.run_dir)
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                if self.stopped:
                    break
                self._epoch(epoch)
            if not self.stopped:
                self.stopped = "completed"
        finally:
            if self.tb is not None:
                self.tb.close()
        mdist.barrier(self.info)
        return FinetuneResult(
            run_dir=self.run_dir, best_checkpoint=self.run_dir / RUN_FILES["best"],
            last_checkpoint=self.run_dir / RUN_FILES["last"], best_epoch=self.best_epoch,
            best_val_auroc=self.best_auroc, epochs_completed=len(self.history), stopped_reason=self.stopped or "",
            history=self.history, label_names=self.label_names,
            data_summary=dict(getattr(self.splits, "summary", {}) or {}),
        )

    def _train_loader(self, epoch: int) -> torch.utils.data.DataLoader:
        from torch.utils.data import DistributedSampler

        cfg = self.cfg
        sampler = DistributedSampler(self.splits.train, num_replicas=self.info.world_size, rank=self.info.rank,
                                     shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        seed = cfg.seed * 1_000_003 + epoch
        return make_loader(epoch_dataset(self.splits.train, seed), batch_size=cfg.batch_size, sampler=sampler,
                           drop_last=True, seed=seed, num_workers=self.num_workers,
                           pin_memory=self.device.type == "cuda")

    def _epoch(self, epoch: int) -> None:
        from medxray.evaluation.metrics import auroc_per_class

        cfg = self.cfg
        t0 = time.perf_counter()
        train = self._train_epoch(epoch)
        t_train = time.perf_counter() - t0
        # Validate with the plain module: DDP's forward may run collectives, and shards differ in size.
        mdist.broadcast_buffers(self.model, self.info)
        val = predict_dataset(self.model, self.splits.val, device=self.device,
                              precision=self.precision, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                              channels_last=cfg.channels_last, num_workers=self.num_workers, info=self.info)
        aurocs = auroc_per_class(val["probs"], val["labels"], val["masks"])
        finite = [a for a in aurocs if math.isfinite(a)]
        mean_auroc = float(np.mean(finite)) if finite else float("nan")
        score = mean_auroc if finite else -val["loss"]
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.best_auroc, self.bad_epochs = score, epoch + 1, mean_auroc, 0
        else:
            self.bad_epochs += 1
        lr = self.optimizer.param_groups[0]["lr"]
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val["loss"])
        elif self.scheduler is not None:
            self.scheduler.step()
        row = {
            "epoch": epoch + 1, "train_loss": train["loss"], "val_loss": val["loss"], "val_mean_auroc": mean_auroc,
            "val_auroc": dict(zip(self.label_names, aurocs)), "lr": lr, "train_images": train["images"],
            "train_images_per_s": train["images"] / max(t_train, 1e-9), "epoch_time_s": time.perf_counter() - t0,
            "val_images": len(self.splits.val), "val_images_scored": len(val["names"]),
            "val_images_unique": len(set(val["index"].tolist())), "best": improved,
            "world_size": self.info.world_size,
        }
        self.history.append(to_jsonable(row))
        if cfg.early_stopping_patience and self.bad_epochs >= cfg.early_stopping_patience and epoch + 1 < cfg.epochs:
            self.stopped = f"early stopping: no better val mean AUROC for {self.bad_epochs} epochs"
        if self.info.is_main:
            metrics = {"val_mean_auroc": mean_auroc, "val_auroc": row["val_auroc"], "val_loss": val["loss"],
                       "epoch": epoch + 1, "selected_by": "val_mean_auroc" if finite else "val_loss"}
            if improved:
                save_checkpoint(self.run_dir / RUN_FILES["best"], self.model.state_dict(),
                                self.metadata(epoch + 1, metrics))
                self._write_val_predictions(val)
            best_meta = {"val_mean_auroc": self.best_auroc, "best_epoch": self.best_epoch}
            save_checkpoint(self.run_dir / RUN_FILES["last"], self.model.state_dict(),
                            self.metadata(epoch + 1, {**metrics, **best_meta}),
                            training_state=self._training_state(epoch + 1))
            with open(self.run_dir / RUN_FILES["metrics"], "a") as fh:
                fh.write(json_line(row) + "\n")
            if self.tb is not None:
                for k in ("train_loss", "val_loss", "val_mean_auroc", "lr", "train_images_per_s"):
                    self.tb.add_scalar(k, row[k], epoch + 1)
        log.info("epoch %d/%d  train loss %.4f  val loss %.4f  val mean AUROC %.4f%s  lr %.2g  %.1f img/s  %.0fs",
                 epoch + 1, cfg.epochs, train["loss"], val["loss"], mean_auroc, " (best)" if improved else "",
                 lr, row["train_images_per_s"], row["epoch_time_s"])
        if self.stopped:
            log.info("%s (best epoch %d)", self.stopped, self.best_epoch)
        mdist.barrier(self.info)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        loader = self._train_loader(epoch)
        steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        self.net.train()
        bar = _progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", enabled=cfg.progress and self.info.is_main)
        loss_sum, n_images, t_start = 0.0, 0, time.perf_counter()
        try:
            for step, batch in enumerate(loader):
                if step >= steps:
                    break
                x = batch["image"]
                value = train_step(
                    self.net, x, batch["label"], batch["mask"], self.optimizer, self.scaler, device=self.device,
                    precision=self.precision, channels_last=cfg.channels_last, pos_weight=self.pos_weight,
                    grad_clip_norm=cfg.grad_clip_norm,
                    check=functools.partial(self._check_loss, epoch, step),
                )
                loss_sum += value * x.shape[0]
                n_images += x.shape[0]
                if bar is not None:
                    rate = n_images * self.info.world_size / max(time.perf_counter() - t_start, 1e-9)
                    bar.set_postfix(loss=f"{loss_sum / n_images:.4f}", img_s=f"{rate:.1f}", refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        # Mean training loss over all ranks' images.
        parts = mdist.all_gather_objects((loss_sum, n_images), self.info)
        total_loss, total_n = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return {"loss": total_loss / max(1, total_n), "images": float(total_n)}

    def _check_loss(self, epoch: int, step: int, value: float) -> None:
        # Every rank takes the same branch, so none is left waiting in a collective.
        if not mdist.all_true(math.isfinite(value), self.info):
            self._diverged(epoch, step, value)

    def _diverged(self, epoch: int, step: int, value: float) -> None:
        last = self.run_dir / RUN_FILES["last"]
        kept = (f"the last good checkpoint {last} (epoch {self.start_epoch if not self.history else self.history[-1]['epoch']}) "
                f"is kept; lower --lr (or use --precision fp32) and resume with --resume {self.run_dir}"
                if last.exists() else "no epoch had completed, so there is no checkpoint; lower --lr and start again")
        raise TrainingDivergedError(
            f"training loss became non-finite ({value}) at epoch {epoch + 1}, batch {step + 1}; the run stopped and {kept}"
        )

    def _training_state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": to_jsonable(self.scheduler.state_dict()) if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "rng": rng_states(self.device),
            "history": self.history,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_auroc": self.best_auroc,
            "bad_epochs": self.bad_epochs,
            "stopped": self.stopped,
            "config": self.cfg.to_dict(),
        }

    def _write_val_predictions(self, val: Mapping[str, Any]) -> None:
        with atomic_output(self.run_dir / RUN_FILES["val_predictions"], "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["index", "name"] + [f"p_{n}" for n in self.label_names] + [f"y_{n}" for n in self.label_names])
            for i, name, p, y, m in zip(val["index"], val["names"], val["probs"], val["labels"], val["masks"]):
                ys = ["" if mk == 0 else int(v) for v, mk in zip(y, m)]
                w.writerow([int(i), name] + [f"{v:.6f}" for v in p] + ys)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr)


def positive_weights(dataset: Dataset, max_weight: float = 1000.0) -> np.ndarray:
    """Per-class negatives / positives among known training labels (BCE ``pos_weight``), clipped to [1, max]."""
    labels, masks = _label_matrix(dataset)
    pos = ((labels > 0.5) * masks).sum(0)
    neg = ((labels <= 0.5) * masks).sum(0)
    return np.clip(neg / np.maximum(pos, 1.0), 1.0, max_weight).astype(np.float32)


def _label_matrix(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(labels, masks) of a training set, read from the dataset's tables when it exposes them."""
    for attr in ("label_matrix", "labels"):
        val = getattr(dataset, attr, None)
        if callable(val):
            val = val()
        if val is not None and np.ndim(val) == 2:
            labels = np.asarray(val, dtype=np.float32)
            masks = getattr(dataset, "masks", getattr(dataset, "mask", None))
            masks = np.asarray(masks() if callable(masks) else masks, dtype=np.float32) if masks is not None else None
            return labels, masks if masks is not None and masks.shape == labels.shape else np.ones_like(labels)
    log.info("reading the training labels item by item to compute positive weights")
    ys, ms = [], []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        it = dataset[i]
        ys.append(np.asarray(plain_tensor(it["label"])))
        ms.append(np.asarray(plain_tensor(it["mask"])) if "mask" in it else np.ones_like(ys[-1]))
    return np.stack(ys).astype(np.float32), np.stack(ms).astype(np.float32)
