"""Training configuration: :class:`TrainConfig`, its variant tables, and reading, coercing and checking it.

A run's options come from defaults, then a YAML file, then overrides (CLI or keyword arguments);
unknown keys are errors with a "did you mean" hint, and every value is type-checked and
range-checked with a message naming the option (:class:`medxray.errors.ConfigError`).

Must not import the training loop, checkpoints, models or evaluation: the CLI reads configs
through this module before anything heavy is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from medxray.data import DATASETS
from medxray.errors import ConfigError
from medxray.fileio import atomic_write_text, load_yaml_mapping
from medxray.precision import PRECISIONS

SCHEDULERS: tuple[str, ...] = ("plateau", "cosine", "none")
POS_WEIGHTS: tuple[str, ...] = ("none", "balanced")
VIEWS: tuple[str, ...] = ("all", "PA", "AP")
# Options a resumed run may change; everything else must match the stored config.
RESUME_OVERRIDABLE: frozenset[str] = frozenset(
    {
        "epochs",
        "device",
        "num_workers",
        "progress",
        "tensorboard",
        "early_stopping_patience",
        "eval_batch_size",
        "resume",
        "out",
        "max_steps_per_epoch",
    }
)


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
    init_from: str | None = None  # start from this medxray checkpoint (site fine-tuning): its architecture and weights
    freeze_blocks: int = 0  # keep the stem and the first N dense blocks (with their transitions) fixed, 0-4
    freeze_bn: bool = False  # keep every BatchNorm layer's running statistics and affine parameters fixed
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
    """The names of every :class:`TrainConfig` option."""
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
    return build_config(values)


# Names other trainers use for our options, for the "did you mean" hint.
_ALIASES = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "max_epochs": "epochs",
    "bs": "batch_size",
    "arch": "model",
    "architecture": "model",
    "root": "data_root",
    "workers": "num_workers",
    "lr_scheduler": "scheduler",
    "patience": "early_stopping_patience",
    "amp": "precision",
    "img_size": "image_size",
    "input_size": "image_size",
    "output_dir": "out",
    "resume_from": "resume",
}


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


def build_config(values: Mapping[str, Any]) -> TrainConfig:
    """A checked :class:`TrainConfig` from already-named values (types coerced, then validated)."""
    hints = _hints()
    cfg = TrainConfig(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})
    validate_config(cfg)
    return absolute_paths(cfg)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The data root (and a CSV manifest) as absolute paths, so the checkpoint that stores this config can be
    evaluated from any folder; the working directory the run was started in means nothing later."""

    def absolute(p: str) -> str:
        return str(Path(p).expanduser().resolve())

    changes: dict[str, Any] = {}
    if cfg.data_root:
        changes["data_root"] = absolute(cfg.data_root)
    if cfg.init_from:
        changes["init_from"] = absolute(cfg.init_from)
    csv_path = cfg.dataset_options.get("csv_path")
    if csv_path and Path(str(csv_path)).expanduser().is_file():  # else it is relative to the (absolute) data root
        changes["dataset_options"] = {**cfg.dataset_options, "csv_path": absolute(str(csv_path))}
    return dataclasses.replace(cfg, **changes) if changes else cfg


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
    need(
        len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas),
        f"betas must be two numbers in [0, 1), got {cfg.betas}",
    )
    need(0 < cfg.plateau_factor < 1, f"plateau_factor must be in (0, 1), got {cfg.plateau_factor}")
    need(cfg.early_stopping_patience >= 0, "early_stopping_patience must be >= 0 (0 = off)")
    need(0 <= cfg.freeze_blocks <= 4, "freeze_blocks must be 0-4 (dense blocks kept fixed, counted from the stem)")
    need(cfg.num_workers is None or cfg.num_workers >= 0, "num_workers must be >= 0")
    need(cfg.max_steps_per_epoch is None or cfg.max_steps_per_epoch >= 1, "max_steps_per_epoch must be >= 1")
    dev = cfg.device
    need(
        dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
        f"device must be auto, cpu, cuda or cuda:N, got {dev!r}",
    )


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write ``cfg`` as YAML (atomically) in the form :func:`make_config` reads back."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
