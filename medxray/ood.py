"""Out-of-distribution (OOD) score of an input from the model's own pooled features.

A checkpoint fine-tuned on frontal chest radiographs will happily output probabilities for a
knee, a CT slice or noise. This module gives each input a number saying how far it lies from
what the model saw in training, with no help from the DICOM header:

* the feature is the global-average-pooled last feature map (``model.forward_features`` after
  norm5 + ReLU, pooled over h x w: exactly the classifier's input), shape (F,);
* the training set's features are summarised by a Gaussian: mean, the top-k principal
  components with a Ledoit-Wolf shrunk covariance inside that subspace, and one isotropic
  variance for what lies outside it (probabilistic PCA, Tipping & Bishop 1999). Keeping only
  k x F numbers keeps the checkpoint small (k=64, F=1024: 256 kB);
* the score is the Mahalanobis distance to that Gaussian (Lee et al., "A Simple Unified
  Framework for Detecting Out-of-Distribution Samples", NeurIPS 2018, here on the final pooled
  features only, without input perturbation): ``d = sqrt(z' S^-1 z + |r|^2 / s_r)`` with
  ``z`` the feature's coordinates in the k components, ``r`` the residual;
* the threshold is a percentile (default the 99th) of the distances of the **validation**
  images, so by construction about 1 % of in-distribution images are flagged.

The statistics live in a checkpoint as the top-level entry :data:`OOD_KEY` (tensors and plain
numbers only: ``torch.load(weights_only=True)`` reads them). ``finetune`` writes them into
``best.pt`` at the end of a run (:func:`add_ood_stats`); :func:`calibrate_checkpoint` (the
``medxray ood-calibrate`` command) adds them to an older checkpoint.

Must not import the training loop, evaluation, inference, scoring or the CLI (they import
this); :mod:`medxray.data` and :mod:`medxray.checkpoint` are imported inside the functions that
need them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from medxray.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

OOD_KEY = "ood"
OOD_FORMAT = "medxray-ood/1"
DEFAULT_COMPONENTS = 64
DEFAULT_PERCENTILE = 99.0
#: what the scorer does with an input over the threshold: keep it ``ok`` with a warning, or skip it
#: (the texts and the ``out_of_distribution`` code are in :mod:`medxray.dicom.codes`)
OOD_POLICIES = ("warn", "skip")


@dataclass
class OODStats:
    """Feature statistics of a training set and the threshold chosen on validation data.

    ``mean`` (F,), ``components`` (k, F) orthonormal rows, ``precision`` (k, k) the inverse of the
    shrunk covariance of the projected features, ``residual_var`` the mean variance per
    dimension outside the subspace, ``threshold`` the distance above which an input is flagged
    (None until :meth:`calibrate`).
    """

    mean: np.ndarray
    components: np.ndarray
    precision: np.ndarray
    residual_var: float
    threshold: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    # -- fitting ---------------------------------------------------------------------------

    @classmethod
    def fit(cls, features: np.ndarray, n_components: int = DEFAULT_COMPONENTS) -> "OODStats":
        """Fit on training features (N, F); raises :class:`DataError` for fewer than 3 rows."""
        from sklearn.covariance import LedoitWolf

        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 3:
            raise DataError(f"OOD statistics need at least 3 training feature vectors, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise DataError("OOD statistics: the training features hold NaN or inf values")
        n, f = x.shape
        mean = x.mean(0)
        xc = x - mean
        k = int(max(1, min(n_components, n - 1, f)))
        # principal axes of the centred features (rows of vt are orthonormal)
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        comps = vt[:k]
        z = xc @ comps.T
        lw = LedoitWolf(assume_centered=True).fit(z)
        resid = xc - z @ comps
        dims_left = max(1, f - k)
        residual_var = float((resid**2).sum() / (n * dims_left))
        # a floor keeps the residual term finite when the training features fill the subspace
        residual_var = max(residual_var, 1e-6 * float(np.trace(lw.covariance_)) / k, 1e-12)
        info = {
            "format": OOD_FORMAT,
            "n_train": int(n),
            "feature_dim": int(f),
            "n_components": int(k),
            "shrinkage": float(lw.shrinkage_),
            "method": "Mahalanobis distance of pooled forward_features to the training set "
            "(top-k PCA + Ledoit-Wolf, isotropic residual)",
        }
        return cls(
            mean=mean.astype(np.float32),
            components=comps.astype(np.float32),
            precision=np.asarray(lw.precision_, dtype=np.float32),
            residual_var=residual_var,
            info=info,
        )

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distances (N,) of pooled features (N, F); NaN rows give NaN."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 4:  # a feature map (N, F, h, w): pool it here
            x = x.mean(axis=(2, 3))
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ConfigError(f"OOD statistics are for {self.mean.shape[0]} features, got shape {x.shape}")
        xc = x - self.mean.astype(np.float64)
        comps = self.components.astype(np.float64)
        z = xc @ comps.T
        resid = xc - z @ comps
        d2 = np.einsum("ni,ij,nj->n", z, self.precision.astype(np.float64), z) + (resid**2).sum(1) / self.residual_var
        return np.sqrt(np.maximum(d2, 0.0))

    def calibrate(self, val_features: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> float:
        """Set the threshold to ``percentile`` of the validation distances; returns it."""
        if not 50.0 <= float(percentile) < 100.0:
            raise ConfigError(f"the OOD percentile must be in [50, 100), got {percentile}")
        d = self.distance(val_features)
        d = d[np.isfinite(d)]
        if d.size == 0:
            raise DataError("OOD calibration: no validation features to choose a threshold on")
        self.threshold = float(np.percentile(d, percentile))
        self.info.update(
            {
                "n_val": int(d.size),
                "percentile": float(percentile),
                "val_distance_median": float(np.median(d)),
                "val_distance_max": float(d.max()),
                "threshold_rule": f"{percentile:g}th percentile of the validation distances",
            }
        )
        return self.threshold

    def flags(self, distances: np.ndarray) -> np.ndarray:
        """Boolean (N,): over the threshold (NaN counts as over: a non-finite feature is not normal)."""
        if self.threshold is None:
            raise ConfigError("OOD statistics have no threshold; calibrate them on validation data first")
        d = np.asarray(distances, dtype=np.float64)
        return ~(d <= self.threshold)

    # -- checkpoint entry ------------------------------------------------------------------

    def to_entry(self) -> dict[str, Any]:
        """The checkpoint entry: tensors and plain numbers only (weights_only-loadable)."""
        return {
            "format": OOD_FORMAT,
            "mean": torch.from_numpy(self.mean.copy()),
            "components": torch.from_numpy(self.components.copy()),
            "precision": torch.from_numpy(self.precision.copy()),
            "residual_var": float(self.residual_var),
            "threshold": None if self.threshold is None else float(self.threshold),
            "info": dict(self.info),
        }

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> "OODStats":
        """Read :meth:`to_entry`'s dict back; raises :class:`CheckpointError` for a damaged one."""
        try:
            if entry.get("format") != OOD_FORMAT:
                raise ValueError(f"format {entry.get('format')!r}")
            mean = np.asarray(entry["mean"], dtype=np.float32)
            comps = np.asarray(entry["components"], dtype=np.float32)
            prec = np.asarray(entry["precision"], dtype=np.float32)
            k, f = comps.shape
            if mean.shape != (f,) or prec.shape != (k, k):
                raise ValueError(f"shapes mean {mean.shape}, components {comps.shape}, precision {prec.shape}")
            th = entry.get("threshold")
            return cls(
                mean=mean,
                components=comps,
                precision=prec,
                residual_var=float(entry["residual_var"]),
                threshold=None if th is None else float(th),
                info=dict(entry.get("info") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"the checkpoint's OOD statistics are damaged ({exc}); recompute them with `medxray ood-calibrate`"
            ) from None


def stats_from_checkpoint(ckpt: Any) -> OODStats | None:
    """The OOD statistics of a loaded :class:`~medxray.checkpoint.Checkpoint`, or None when it has none."""
    entry = (getattr(ckpt, "extra", None) or {}).get(OOD_KEY)
    if entry is None:
        return None
    stats = OODStats.from_entry(entry)
    return stats if stats.threshold is not None else None


# ---------------------------------------------------------------------------------------------
# features of a dataset, and the end-of-training / calibration entry points
# ---------------------------------------------------------------------------------------------


def pooled(features: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, F, h, w) feature map -> (N, F) float32 global average pool (the classifier's input)."""
    if isinstance(features, torch.Tensor):
        return features.float().mean(dim=(2, 3)).cpu().numpy()
    return np.asarray(features, dtype=np.float32).mean(axis=(2, 3))


@torch.no_grad()
def dataset_features(
    model: torch.nn.Module,
    dataset: Any,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    num_workers: int = 0,
    max_items: int | None = None,
) -> np.ndarray:
    """Pooled features (N, F) of a dataset's items (``item["image"]``: (3, S, S)), fp32, eval mode.

    All-zero inputs (the blank a dataset puts in place of an unreadable image) are left out.
    ``max_items`` takes an evenly spaced subset (keeps a large training set affordable).
    """
    from medxray.data.loading import IndexedDataset, make_loader

    n = len(dataset)
    idx = np.arange(n) if not max_items or n <= max_items else np.linspace(0, n - 1, max_items).round().astype(int)
    loader = make_loader(
        IndexedDataset(dataset, [int(i) for i in idx]), batch_size=batch_size, seed=0, num_workers=num_workers
    )
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in loader:
            x = batch["image"]
            feats = pooled(model.forward_features(x.to(dev)))
            out.append(feats[(x.flatten(1).abs().amax(1) > 0).numpy()])  # not the blank of an unreadable file
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def unaugmented(dataset: Any) -> Any:
    """The same items without random augmentation (a copy with ``augment=False`` where it has one)."""
    import copy

    if getattr(dataset, "augment", False):
        ds = copy.copy(dataset)  # XrayDataset's pickled state drops its built transform list
        ds.augment = False
        return ds
    return dataset


def compute_stats(
    model: torch.nn.Module,
    train: Any,
    val: Any,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    num_workers: int = 0,
    n_components: int = DEFAULT_COMPONENTS,
    percentile: float = DEFAULT_PERCENTILE,
    max_train: int | None = 20000,
) -> OODStats:
    """Fit on ``train`` (unaugmented), choose the threshold on ``val``."""
    tr = dataset_features(
        model, unaugmented(train), device=device, batch_size=batch_size, num_workers=num_workers, max_items=max_train
    )
    va = dataset_features(model, unaugmented(val), device=device, batch_size=batch_size, num_workers=num_workers)
    stats = OODStats.fit(tr, n_components)
    stats.calibrate(va, percentile)
    log.info(
        "OOD statistics: %d train / %d val images, k=%d, threshold %.2f (%s)",
        stats.info["n_train"],
        stats.info["n_val"],
        stats.info["n_components"],
        stats.threshold,
        stats.info["threshold_rule"],
    )
    return stats


def add_ood_stats(path: str | os.PathLike, stats: OODStats) -> None:
    """Write ``stats`` into the checkpoint at ``path`` (atomically), keeping everything else."""
    from medxray.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(path)
    extra = {**ckpt.extra, OOD_KEY: stats.to_entry()}
    meta = {**ckpt.metadata, "ood": {k: v for k, v in stats.info.items()} | {"threshold": stats.threshold}}
    save_checkpoint(path, ckpt.state_dict, meta, **extra)


def calibrate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 32,
    num_workers: int | None = None,
    n_components: int = DEFAULT_COMPONENTS,
    percentile: float = DEFAULT_PERCENTILE,
    max_train: int | None = 20000,
) -> OODStats:
    """Add OOD statistics to an existing checkpoint (``medxray ood-calibrate``).

    The train and validation splits are rebuilt with the options the checkpoint was trained with
    (``data_root`` defaults to the one it records), so the threshold is chosen on the same
    validation images training used. Raises :class:`ConfigError` / :class:`DataError` /
    :class:`CheckpointError` for unusable arguments.
    """
    from medxray.checkpoint import load_checkpoint, model_from_checkpoint
    from medxray.data import DATASETS, build_datasets
    from medxray.hardware import default_num_workers, resolve_device
    from medxray.modelinput import check_preprocessing

    ckpt = load_checkpoint(checkpoint)
    meta = ckpt.metadata
    image_size = check_preprocessing(meta.get("preprocessing", {}))
    cfg = dict(meta.get("config") or {})
    dataset = meta.get("dataset") or cfg.get("dataset") or "chestxray14"
    if dataset not in DATASETS:
        raise ConfigError(f"the checkpoint was trained on dataset {dataset!r}, which medxray cannot rebuild here")
    root = data_root or cfg.get("data_root")
    if not root:
        raise ConfigError("--data-root is required: the folder holding the data the checkpoint was trained on")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data root {root} does not exist; pass the training data's folder (or its CSV manifest)")
    opts = {
        k: cfg[k]
        for k in ("val_fraction", "split_seed", "view", "max_per_patient", "allow_missing", "use_cache")
        if k in cfg
    }
    splits = build_datasets(
        dataset=dataset,
        data_root=root,
        image_size=image_size,
        augment=False,
        **opts,
        **dict(cfg.get("dataset_options") or {}),
    )
    if splits.train is None or not len(splits.train) or splits.val is None or not len(splits.val):
        raise DataError("OOD calibration needs the training and validation splits; one of them is empty here")
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt).to(dev)
    stats = compute_stats(
        model,
        splits.train,
        splits.val,
        device=dev,
        batch_size=batch_size,
        num_workers=default_num_workers(dev) if num_workers is None else num_workers,
        n_components=n_components,
        percentile=percentile,
        max_train=max_train,
    )
    add_ood_stats(checkpoint, stats)
    return stats


def stats_for_run(
    best_checkpoint: str | os.PathLike,
    train: Any,
    val: Any,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    num_workers: int = 0,
) -> OODStats | None:
    """End of ``finetune``: fit the OOD statistics of the best weights on the run's training images,
    choose the threshold on its validation images, and store both in ``best.pt``.

    Never fails the run: a problem is logged as a warning (the checkpoint then scores without an
    OOD check until ``medxray ood-calibrate`` adds one). Returns the statistics, or None.
    """
    from medxray.checkpoint import load_checkpoint, model_from_checkpoint
    from medxray.errors import MedxrayError

    path = Path(best_checkpoint)
    if not path.is_file():
        return None
    try:
        ckpt = load_checkpoint(path)
        if stats_from_checkpoint(ckpt) is not None:
            return stats_from_checkpoint(ckpt)  # a resumed, finished run: already there
        model = model_from_checkpoint(ckpt).to(device)
        stats = compute_stats(model, train, val, device=device, batch_size=batch_size, num_workers=num_workers)
        add_ood_stats(path, stats)
        return stats
    except (MedxrayError, ValueError, RuntimeError, np.linalg.LinAlgError) as exc:
        log.warning(
            "no OOD statistics written into %s (%s); add them later with `medxray ood-calibrate --checkpoint %s`",
            path.name,
            str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
            path,
        )
        return None
