"""What a scoring run is asked to do: :class:`ScoreConfig`, its YAML loader and validation,
the run's :class:`ScoreSummary`, and the default split of CPU cores between decoding and inference.

Must not import the engine, the workers or the journal (they import this); torch is imported
only lazily, to ask whether CUDA is present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

from medxray.dicom import DEFAULT_ALLOWED_MODALITIES
from medxray.errors import ConfigError
from medxray.fileio import load_yaml_mapping
from medxray.limits import pixel_limit
from medxray.scoreoptions import CAM_METHODS, CAM_MODES  # the tables, re-exported
from medxray.scoring.gate import DEFAULT_ACCEPT_BODY_PARTS, accepted_body_parts, check_ood_policy
from medxray.scoring.messages import DecodeResult
from medxray.scoring.scheduler import resolve_shard


@dataclass
class ScoreConfig:
    """Everything one scoring run depends on (``pipelines/score_dicom.yaml`` mirrors it)."""

    input_dir: str | os.PathLike
    checkpoint: str | os.PathLike
    out: str | os.PathLike
    workers: int | None = None  # decode processes; None = one per core on CPU, all but one with CUDA
    batch_size: int = 16
    cams: str = "positive"  # positive | all | none
    max_maps: int | None = None  # at most this many maps per image, the most probable findings first; None = no cap
    cam_method: str = "checkpoint"  # a CAM_METHODS entry
    sr: bool = False
    shard: str | tuple[int, int] | None = None  # "k/n", 1-based, or "auto" (from SLURM / Kubernetes: scheduler.py)
    shard_count: int | None = None  # with shard="auto" under a Kubernetes Indexed Job: its completions
    lock_wait: float = 0.0  # seconds to wait for another scorer holding this OUT / shard (0 = refuse at once)
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"
    threads: int | None = None  # CPU inference threads; None = every core (decoders yield)
    allowed_modalities: Sequence[str] | None = DEFAULT_ALLOWED_MODALITIES
    max_pixels: int | None = None  # None: medxray.limits.pixel_limit() ($MEDXRAY_MAX_PIXELS or 60 MP)
    overlay_max_side: int | None = 1024  # overlays' long side (medxray.display.DISPLAY_LONG_SIDE); None = original size
    overwrite: bool = False
    progress: bool = True
    # policy gate (medxray.scoring.gate): Body Part Examined values scored ("any" = no check), and what an
    # image over the checkpoint's out-of-distribution threshold gets: warn (ok + warning) | skip
    accept_body_parts: Sequence[str] | str | None = DEFAULT_ACCEPT_BODY_PARTS
    ood_policy: str = "warn"
    # Test/extension hook: a picklable top-level function replacing the decode step (same arguments as
    # medxray.scoring.workers.decode_job; returns a medxray.scoring.messages.DecodedImage or DecodeFailure).
    decode_fn: Callable[..., DecodeResult] | None = None


@dataclass
class ScoreSummary:
    total: int = 0  # files in this run's scope (this shard)
    scored: int = 0  # rows written by this invocation
    skipped: int = 0  # rows already present from an earlier (interrupted) run
    ok: int = 0  # ok rows in the final results file (this scope)
    error: int = 0
    not_scored: int = 0  # rows with status skipped (the policy gate: not_chest, out_of_distribution)
    seconds: float = 0.0
    images_per_s: float = 0.0
    results: str = ""
    backend: str = ""
    merged: str | None = None
    outputs_failed: int = 0  # scored now, but CAM overlays / SR not written (a re-run writes them)
    outputs_redone: int = 0  # rows of an earlier run redone because their CAM overlays / SR were missing

    def line(self) -> str:
        return (
            f"{self.total} files: {self.ok} ok, {self.error} error, {self.not_scored} skipped by policy; "
            f"scored {self.scored} now "
            f"({self.skipped} already done) in {self.seconds:.1f} s = {self.images_per_s:.1f} files/s "
            f"[{self.backend}] -> {self.results}"
            + (f"; {self.outputs_redone} redone for missing CAM/SR outputs" if self.outputs_redone else "")
            + (f"; CAM/SR outputs of {self.outputs_failed} file(s) NOT written" if self.outputs_failed else "")
        )


def load_score_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = (), **values: Any
) -> ScoreConfig:
    """A :class:`ScoreConfig` from a YAML file, ``key=value`` overrides (YAML-typed) and keywords.

    Unknown keys are a :class:`ConfigError` (a typo must not silently fall back to a default).
    """
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        data.update(load_yaml_mapping(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        data[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    data.update(values)
    known = {f.name for f in fields(ScoreConfig)} - {"decode_fn"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown scoring option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    missing = [k for k in ("input_dir", "checkpoint", "out") if not data.get(k)]
    if missing:
        raise ConfigError(f"scoring needs {', '.join(missing)} (in the config or as key=value)")
    if data.get("allowed_modalities") in ("any", "ANY"):
        data["allowed_modalities"] = None
    return ScoreConfig(**data)


def validate_config(cfg: ScoreConfig) -> tuple[int, tuple[int, int] | None]:
    if cfg.cams not in CAM_MODES:
        raise ConfigError(f"--cams must be one of {', '.join(CAM_MODES)}, got {cfg.cams!r}")
    if cfg.cam_method not in CAM_METHODS:
        raise ConfigError(f"--cam-method must be one of {', '.join(CAM_METHODS)}, got {cfg.cam_method!r}")
    if int(cfg.batch_size) < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.max_maps is not None and int(cfg.max_maps) < 1:
        raise ConfigError(f"--max-maps must be >= 1 (or unset for no cap; --cams none for no maps), got {cfg.max_maps}")
    accepted_body_parts(cfg.accept_body_parts)
    check_ood_policy(cfg.ood_policy)
    on_gpu = str(cfg.device) == "cuda" or (str(cfg.device) == "auto" and cuda_available())
    workers = default_workers("cuda" if on_gpu else "cpu") if cfg.workers in (None, 0) else int(cfg.workers)
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {cfg.workers}")
    pixel_limit(cfg.max_pixels)  # ConfigError for a value (or $MEDXRAY_MAX_PIXELS) that is not a pixel count
    if cfg.overlay_max_side is not None and int(cfg.overlay_max_side) < 16:
        raise ConfigError(
            f"overlay_max_side must be >= 16 (or unset for the original size), got {cfg.overlay_max_side}"
        )
    if cfg.lock_wait is None or float(cfg.lock_wait) < 0:
        raise ConfigError(f"--lock-wait must be >= 0 seconds, got {cfg.lock_wait}")
    return workers, resolve_shard(cfg.shard, count=cfg.shard_count)


def n_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(device: str = "cpu") -> int:
    """Decode processes. On CPU one per core, sharing the cores with the single-threaded
    inference streams (:func:`medxray.scoring.workers.worker_init` says why and what was
    measured); no fixed split can idle a core whichever stage is the slower (issue 14: a fixed
    1+1 split left most of a core idle). With a GPU, all cores but one decode."""
    n = n_cores()
    if device != "cpu":
        return max(1, n - 1)
    return n


def default_threads(workers: int) -> int:
    """CPU inference threads: every core (the decode workers yield to inference; ``workers`` is
    accepted for callers of the old split and not used)."""
    return n_cores()


def cuda_available() -> bool:
    """Cheap first: without NVIDIA device nodes (Linux) there is no CUDA and torch need not load yet."""
    if os.name == "posix" and not os.path.exists("/dev/nvidiactl") and not os.path.exists("/dev/dxg"):
        return False
    import torch

    return torch.cuda.is_available()
