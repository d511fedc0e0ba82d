"""A generated archive of many small, valid chest radiographs (CR, 64 px), for sharding and scheduler tests.

Each file's pixels differ (a per-file seed), so every row of the results is distinguishable; files go
into a few day folders, like a PACS export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dicom_corpus import _save, make_dataset, phantom


def write_radiograph(path: Path, seed: int) -> Path:
    """One 64x64 12-bit CR phantom with per-seed noise and contrast, saved as a DICOM file."""
    rng = np.random.default_rng(seed)
    base = phantom().astype(np.float64)
    img = base * rng.uniform(0.7, 1.0) + rng.normal(0, 60, base.shape)
    arr = np.clip(np.rint(img), 0, 4095).astype(np.int64)
    _save(make_dataset(f"archive-{seed}", arr), path)
    return path


def make_archive(root: Path, n: int, start: int = 0, days: int = 3) -> list[str]:
    """``n`` radiographs under ``root/day-K/img-NNNNN.dcm`` (numbered from ``start``); their relative paths."""
    rels = []
    for i in range(start, start + n):
        rel = f"day-{i % days}/img-{i:05d}.dcm"
        write_radiograph(root / rel, seed=i)
        rels.append(rel)
    return rels
