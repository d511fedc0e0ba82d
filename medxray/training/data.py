"""The data side of a fine-tuning run: building and checking its splits, per-epoch augmentation
seeding, and the positive-class weights of the loss.

The datasets themselves come from :mod:`medxray.data` (:func:`medxray.data.build_datasets`);
this module only prepares them for one run. Must not import the training loop, models,
checkpoints or evaluation.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from medxray.data import build_datasets
from medxray.data.loading import plain_tensor
from medxray.errors import ConfigError, DataError, MedxrayError
from medxray.training import distributed as mdist
from medxray.training.config import TrainConfig
from medxray.training.distributed import DistInfo

log = logging.getLogger(__name__)


def build_run_splits(cfg: TrainConfig, info: DistInfo) -> Any:
    """Train / val / test splits for ``cfg`` (:func:`medxray.data.build_datasets`).

    Under DDP rank 0 builds first (it may write the preprocessing cache) and the other ranks
    follow, or re-raise rank 0's error instead of waiting forever. Raises :class:`ConfigError`
    without a data root, :class:`DataError` when it is missing or not a folder.
    """
    if not cfg.data_root:
        raise ConfigError("--data-root is required: the folder holding the dataset's images and label file")
    root = Path(cfg.data_root).expanduser()
    if not root.exists():
        raise DataError(f"data root {root} does not exist; pass the folder that holds the {cfg.dataset} data")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    kwargs = dict(
        image_size=cfg.image_size,
        val_fraction=cfg.val_fraction,
        split_seed=cfg.split_seed,
        view=cfg.view,
        max_per_patient=cfg.max_per_patient,
        allow_missing=cfg.allow_missing,
        use_cache=cfg.use_cache,
        augment=cfg.augment,
        **cfg.dataset_options,
    )

    def build() -> Any:
        return build_datasets(dataset=cfg.dataset, data_root=root, **kwargs)

    if not info.enabled:
        return build()
    # Rank 0 builds first (it may write the preprocessing cache); the others follow, or
    # re-raise rank 0's error instead of waiting forever.
    splits, err = None, None
    if info.is_main:
        try:
            splits = build()
        except MedxrayError as exc:
            err = exc
    status = mdist.all_gather_objects(None if err is None else (type(err).__name__, str(err)), info)[0]
    if err is not None:
        raise err
    if status is not None:
        raise DataError(status[1])
    return splits if splits is not None else build()


def check_run_data(
    cfg: TrainConfig,
    splits: Any,
    info: DistInfo,
    *,
    label_names: Sequence[str],
    manifest_hash: str,
    resume_state: Mapping[str, Any] | None,
) -> None:
    """Refuse data a run cannot use: empty train or val split, a batch larger than a rank's share,
    or (on resume) data whose manifest hash or label names differ from the run's.

    Raises :class:`DataError` or :class:`ConfigError` with the fix in the message.
    """
    s = splits
    if s.train is None or len(s.train) == 0:
        raise DataError("the training split is empty; check the data root and the split options")
    if s.val is None or len(s.val) == 0:
        raise DataError("the validation split is empty; raise val_fraction or add images")
    per_rank = len(s.train) // info.world_size
    if cfg.batch_size > per_rank:
        raise ConfigError(
            f"batch size {cfg.batch_size} is larger than the training set ({len(s.train)} images"
            f"{f' over {info.world_size} processes' if info.enabled else ''}); use --batch-size "
            f"{max(1, min(per_rank, 16))} or fewer"
        )
    if resume_state is not None:
        old = resume_state["metadata"].get("data_manifest_hash")
        if old and manifest_hash and old != manifest_hash:
            raise DataError(
                f"the data changed since the run started (manifest hash {old[:12]} -> {manifest_hash[:12]}); "
                f"resume with the same data or start a new run"
            )
        if list(resume_state["metadata"].get("label_names", [])) != list(label_names):
            raise DataError("the dataset's label names differ from the run's; resume with the same data")


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


def positive_weights(dataset: Dataset, max_weight: float = 1000.0) -> np.ndarray:
    """Per-class negatives / positives among known training labels (BCE ``pos_weight``), clipped to [1, max]."""
    labels, masks = label_matrix(dataset)
    pos = ((labels > 0.5) * masks).sum(0)
    neg = ((labels <= 0.5) * masks).sum(0)
    return np.clip(neg / np.maximum(pos, 1.0), 1.0, max_weight).astype(np.float32)


def label_matrix(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(labels, masks) (N, C) float32 arrays of a training set, read from the dataset's tables when it
    exposes them (``label_matrix``/``labels`` and ``masks``/``mask``), else item by item."""
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
