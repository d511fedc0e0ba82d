"""Datasets for fine-tuning and evaluation: ChestX-ray14, CheXpert and a generic CSV manifest.

Training and evaluation read data only through :func:`build_datasets`. Each dataset module
turns its own files into records. The shared machinery in :mod:`medxray.data.core` then
splits, filters and serves them as dict items::

    {"image": FloatTensor(3, S, S) normalised, "label": FloatTensor(C) 0/1,
     "mask": FloatTensor(C) 1 = known / 0 = unknown, "name": str, "orig_size": (H, W)}
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any

from medxray.errors import ConfigError
from medxray.lazyexports import lazy_exports

if TYPE_CHECKING:
    from medxray.data.core import DatasetSplits, Records, XrayDataset
    from medxray.data.imageio import read_image

# The torch-using parts load on first use (PEP 562), so the CLI lists DATASETS without torch.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {"DatasetSplits": "core", "Records": "core", "XrayDataset": "core", "read_image": "imageio"},
)

DATASETS = ("chestxray14", "chexpert", "csv")

__all__ = ["DATASETS", "DatasetSplits", "Records", "XrayDataset", "build_datasets", "read_image"]


def build_datasets(
    dataset: str = "chestxray14",
    data_root: str | os.PathLike | None = None,
    *,
    image_size: int = 224,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    view: str = "all",
    max_per_patient: int | None = None,
    allow_missing: bool = False,
    use_cache: bool = True,
    augment: bool = True,
    **dataset_options: Any,
) -> DatasetSplits:
    """Train / val / test datasets of one source, split and ready for a DataLoader.

    ``dataset``: "chestxray14" (official test list + seeded patient-disjoint validation),
    "chexpert" (train.csv -> train/val, valid.csv -> test; ``uncertain="ignore"|"ones"|"zeros"``),
    or "csv" (a manifest with image, patient and finding columns; ``csv_path=...``).
    ``view``: "all", "PA" or "AP". ``max_per_patient``: keep at most this many images per patient.
    ``allow_missing``: drop missing image files (counted in ``summary``) instead of raising.
    ``use_cache``: read a finished ``medxray data prepare`` cache when one fits.
    ``augment``: random training transforms on the train split. Their strength comes from
    ``aug_options={...}`` (keyword arguments of :func:`medxray.data.transforms.train_transforms`).
    Other optional keywords: ``cache_dir``, ``aug_seed``, ``on_bad_image="mask"|"raise"`` and the
    dataset-specific ones.
    Splits use only local generators seeded from ``split_seed``; the global RNG is never touched.
    """
    if int(image_size) < 16:
        raise ConfigError(f"image_size must be at least 16, got {image_size}")
    common = dict(
        image_size=int(image_size),
        val_fraction=val_fraction,
        split_seed=int(split_seed),
        view=view,
        max_per_patient=max_per_patient,
        allow_missing=allow_missing,
        use_cache=use_cache,
        augment=augment,
    )
    name = str(dataset).lower().replace("-", "").replace("_", "")
    if name == "chestxray14":
        from medxray.data.chestxray14 import build
    elif name == "chexpert":
        from medxray.data.chexpert import build
    elif name in ("csv", "csvmanifest"):
        from medxray.data.csv_manifest import build
    else:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    params = inspect.signature(build).parameters
    allowed = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY} - set(common)
    unknown = sorted(set(dataset_options) - allowed)
    if unknown:
        raise ConfigError(
            f"option(s) {', '.join(unknown)} do not apply to dataset {name}; it accepts "
            f"{', '.join(sorted(allowed)) or 'no extra options'}"
        )
    return build(data_root, **common, **dataset_options)
