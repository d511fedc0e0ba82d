"""Run state on disk and in the process: run-directory layout, resuming, checkpoint metadata, RNG states, versions.

Holds what makes a run reproducible and resumable: the files of a run directory
(:data:`RUN_FILES`), the best-epoch / early-stopping state (:class:`BestTracking`),
:func:`prepare_resume` (stored config + allowed overrides + the last epoch's training state),
the metadata stored in every checkpoint, RNG state capture and restore (:func:`rng_states`,
:func:`scoped_rng`), deterministic algorithms, and the library versions and git commit recorded
with each run.

Must not import the training loop (:mod:`medxray.training.loop`), models or evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch

from medxray import __version__
from medxray.checkpoint import load_checkpoint, save_checkpoint
from medxray.errors import CheckpointError, ConfigError
from medxray.fileio import to_jsonable
from medxray.training.config import RESUME_OVERRIDABLE, TrainConfig, build_config, make_config

log = logging.getLogger(__name__)

RUN_FILES = {
    "config": "config.yaml",
    "run": "run.json",
    "metrics": "metrics.jsonl",
    "last": "last.pt",
    "last_prev": "last.prev.pt",
    "best": "best.pt",
    "val_predictions": "val_predictions.csv",
}


@dataclasses.dataclass(frozen=True)
class BestTracking:
    """Best-epoch selection and early stopping as a value: :meth:`update` returns the next state.

    An epoch's monitored ``score`` improves on the best so far when ``score > best_score +
    min_delta`` (``mode="max"``) or ``score < best_score - min_delta`` (``mode="min"``), the rule of
    Keras' and Lightning's ``EarlyStopping`` callbacks; a NaN score never improves. After
    ``patience`` epochs in a row without improvement, :attr:`should_stop` is true (``patience`` 0:
    never). The fine-tuning loop monitors the validation mean AUROC (CheXNet's model selection,
    Rajpurkar et al. 2017; the validation loss, negated, when no class has both labels) with
    ``mode="max"`` and ``min_delta=0``.

    ``best_auroc`` is the validation mean AUROC of the best epoch (NaN when it was selected by the
    loss); ``best_epoch`` counts from 1 (0: none yet). :meth:`to_state` / :meth:`from_state` give
    the four keys stored in ``last.pt``'s training state, so a resumed run continues the count.
    Raises ``ValueError`` for an unknown ``mode``, a negative ``patience`` or ``min_delta``.
    """

    patience: int = 0
    min_delta: float = 0.0
    mode: Literal["max", "min"] = "max"
    best_score: float = -math.inf
    best_epoch: int = 0
    best_auroc: float = math.nan
    bad_epochs: int = 0
    improved: bool = False  # whether the last update's epoch became the best

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', not {self.mode!r}")
        if self.patience < 0 or not self.min_delta >= 0:
            raise ValueError(f"patience ({self.patience}) and min_delta ({self.min_delta}) must be >= 0")

    @classmethod
    def start(cls, patience: int = 0, *, min_delta: float = 0.0, mode: Literal["max", "min"] = "max") -> BestTracking:
        """The state before the first epoch: no best yet (best score -inf for ``max``, +inf for ``min``)."""
        return cls(patience, min_delta, mode, best_score=-math.inf if mode == "max" else math.inf)

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        patience: int = 0,
        *,
        min_delta: float = 0.0,
        mode: Literal["max", "min"] = "max",
    ) -> BestTracking:
        """The state saved by :meth:`to_state` (keys missing in older checkpoints take the start values)."""
        first = cls.start(patience, min_delta=min_delta, mode=mode)
        return dataclasses.replace(
            first,
            best_score=float(state.get("best_score", first.best_score)),
            best_epoch=int(state.get("best_epoch", 0)),
            best_auroc=float(state.get("best_auroc", math.nan)),
            bad_epochs=int(state.get("bad_epochs", 0)),
        )

    def to_state(self) -> dict[str, Any]:
        """``best_score``, ``best_epoch``, ``best_auroc``, ``bad_epochs`` for the training state."""
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_auroc": self.best_auroc,
            "bad_epochs": self.bad_epochs,
        }

    def is_better(self, score: float) -> bool:
        """Whether ``score`` improves on the best by more than ``min_delta`` (False for NaN)."""
        if self.mode == "max":
            return score > self.best_score + self.min_delta
        return score < self.best_score - self.min_delta

    def update(self, epoch: int, score: float, auroc: float = math.nan) -> BestTracking:
        """The state after ``epoch`` (1-based) scored ``score``; ``auroc`` is kept when it is the best."""
        if self.is_better(score):
            return dataclasses.replace(
                self, best_score=score, best_epoch=epoch, best_auroc=auroc, bad_epochs=0, improved=True
            )
        return dataclasses.replace(self, bad_epochs=self.bad_epochs + 1, improved=False)

    @property
    def should_stop(self) -> bool:
        """``patience`` epochs in a row without improvement (never when ``patience`` is 0)."""
        return bool(self.patience) and self.bad_epochs >= self.patience


def versions() -> dict[str, str]:
    """Library versions stored with every run and checkpoint."""
    out = {
        "medxray": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    for mod in ("torchvision", "monai"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # optional at inference time
            pass
    return out


def git_commit() -> str | None:
    """The source tree's commit (None outside a git checkout)."""
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
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
    """Python, NumPy, torch (and CUDA) RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    st = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [st[0], torch.from_numpy(np.asarray(st[1], dtype=np.int64)), int(st[2]), int(st[3]), float(st[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def set_rng_states(states: Mapping[str, Any], device: torch.device) -> None:
    """Restore the states captured by :func:`rng_states`."""
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = states["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state_all(states["cuda"])


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` for the block when ``enabled``;
    the caller's setting is restored afterwards."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def prepare_resume(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """Stored config + allowed overrides, and the training state of the last completed epoch.

    The state comes from ``last.pt``, or, when that is missing, truncated or otherwise unusable,
    from ``last.prev.pt`` (the epoch before; a warning says so). ``state["resumed_from"]`` names
    the file used. Raises :class:`ConfigError` when the run directory is not a run or a fixed
    option changed, and :class:`CheckpointError` when neither file holds a usable training state.
    """
    run_dir = Path(cfg.resume).expanduser()  # type: ignore[arg-type]
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such run directory")
    cfg_path, last = run_dir / RUN_FILES["config"], run_dir / RUN_FILES["last"]
    if not cfg_path.is_file():
        raise ConfigError(f"--resume {run_dir}: not a medxray run directory (no {RUN_FILES['config']})")
    if not last.is_file() and not (run_dir / RUN_FILES["last_prev"]).is_file():
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
    problems = []
    for name in (RUN_FILES["last"], RUN_FILES["last_prev"]):
        try:
            state = load_training_state(run_dir / name, stored.model)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems:
            log.warning(
                "%s; resuming from %s instead (the epoch before, epoch %s): one epoch is trained again",
                problems[0],
                name,
                state.get("epoch"),
            )
        return build_config(merged), dict(state, resumed_from=name)
    raise CheckpointError(
        f"--resume {run_dir}: no usable training state ({'; '.join(problems)}); start the run again with another --out"
    )


def load_training_state(path: Path, architecture: str) -> dict[str, Any]:
    """The training state in one ``last.pt`` / ``last.prev.pt``, verified: a readable checkpoint
    (not truncated, weights_only), with a training state, for ``architecture``. Raises
    :class:`CheckpointError` saying which of these failed."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    ckpt = load_checkpoint(path)
    state = ckpt.extra.get("training_state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has no training state; it cannot be resumed")
    if ckpt.metadata.get("architecture") != architecture:
        raise CheckpointError(
            f"{path} holds a {ckpt.metadata.get('architecture')} but the run config says {architecture}"
        )
    return dict(state, model_state=ckpt.state_dict, metadata=ckpt.metadata)


def save_training_checkpoint(
    run_dir: Path,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    training_state: Mapping[str, Any],
    *,
    keep_previous: bool = True,
) -> Path:
    """Write ``last.pt`` and keep the one it replaces as ``last.prev.pt``.

    The new file is written completely (atomically, beside) before the renames, so a kill at any
    moment leaves a loadable ``last.pt`` or ``last.prev.pt``. ``keep_previous=False`` when the
    current ``last.pt`` is known bad (a resume fell back to ``last.prev.pt``): it is replaced and
    the good previous state stays.
    """
    last, prev = run_dir / RUN_FILES["last"], run_dir / RUN_FILES["last_prev"]
    new = run_dir / f".{RUN_FILES['last']}.new"
    save_checkpoint(new, state_dict, metadata, training_state=dict(training_state))
    if keep_previous and last.exists():
        os.replace(last, prev)
    os.replace(new, last)
    return last


def data_provenance(
    summary: Mapping[str, Any], manifest_hash: str, *, dataset: str = "", data_root: str | None = None
) -> dict[str, Any]:
    """What the model learned from, for the checkpoint (DESIGN convention 12; shown on the app's model card).

    ``summary`` is :attr:`medxray.data.DatasetSplits.summary`. Returns ``synthetic`` (phantom data
    marked by ``medxray data synth``; None when the summary does not say), ``data_root`` as an
    absolute path, ``manifest_hash``, ``counts`` (images per split), ``missing_by_split`` (images
    listed in the labels but absent from the download, dropped with --allow-missing) and, where
    known, the official-list coverage.
    """
    import os

    root = summary.get("data_root") or data_root
    synthetic = summary.get("synthetic")
    out: dict[str, Any] = {
        "synthetic": None if synthetic is None else bool(synthetic),
        "dataset": summary.get("dataset") or dataset,
        "data_root": os.path.abspath(os.path.expanduser(str(root))) if root else None,
        "manifest_hash": manifest_hash,
        "counts": {str(k): int(v) for k, v in (summary.get("counts") or {}).items()},
        "missing_by_split": {str(k): int(v) for k, v in (summary.get("missing_dropped_by_split") or {}).items()},
    }
    coverage = {k: summary[k] for k in ("labelled_not_in_lists",) if k in summary}
    if coverage:
        out["coverage"] = coverage
    return out


def checkpoint_metadata(
    cfg: TrainConfig,
    *,
    label_names: Sequence[str],
    manifest_hash: str,
    run_name: str,
    epoch: int,
    metrics: Mapping[str, Any],
    data_summary: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata stored in ``best.pt`` / ``last.pt`` (the checkpoint format's contract:
    architecture, labels, preprocessing, default thresholds 0.5, metrics, provenance, config).

    ``data_summary`` (the splits' summary) becomes ``data_provenance`` (:func:`data_provenance`).
    """
    from medxray.data.transforms import preprocessing_config

    return to_jsonable(
        {
            "architecture": cfg.model,
            "num_classes": len(label_names),
            "in_chans": 3,
            "label_names": list(label_names),
            "preprocessing": preprocessing_config(cfg.image_size),
            "thresholds": {n: 0.5 for n in label_names},
            "metrics": dict(metrics),
            "versions": versions(),
            "git_commit": git_commit(),
            "data_manifest_hash": manifest_hash,
            "data_provenance": data_provenance(
                data_summary or {}, manifest_hash, dataset=cfg.dataset, data_root=cfg.data_root
            ),
            "dataset": cfg.dataset,
            "pretrained": cfg.pretrained,
            "model_version": f"{cfg.model}-{run_name}-e{epoch:03d}",
            "epoch": epoch,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": cfg.to_dict(),
        }
    )
