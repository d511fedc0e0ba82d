"""The network input from a 2-D [0, 1] image with numpy alone: what scoring's decode workers run.

The deterministic transform list (:mod:`medxray.data.transforms`, MONAI) is the definition of
preprocessing; this module computes the same numbers for the array path without importing
torch or MONAI, so that a decode worker starts in a fraction of a second. The steps are those of
``preprocess_array``: clip to [0, 1] (``ScaleByBitDepthd`` on float input), area resize to S x S
(``torch.nn.functional.interpolate(mode="area")``, i.e. adaptive average pooling: output cell
i averages input rows floor(i*H/S) .. ceil((i+1)*H/S) - 1), replicate to 3 channels, subtract
the ImageNet mean and divide by the std. tests/test_speed_reduce.py proves equality with the
MONAI list to float32 rounding.

The ImageNet statistics are defined here (torch-free) and re-exported by
:mod:`medxray.data.transforms`. Must import nothing but numpy.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@lru_cache(maxsize=64)
def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 averaging matrix of adaptive average pooling along one axis."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo = (i * n_in) // n_out
        hi = -((-(i + 1) * n_in) // n_out)  # ceil
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def area_resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) -> (size, size) float32 area resize (adaptive average pooling), as torch ``mode="area"``."""
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    if (h, w) == (size, size):
        return img
    return _pool_matrix(h, size) @ img @ _pool_matrix(w, size).T


def model_input(image01: np.ndarray, size: int, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """2-D [0, 1] gray image (any size) -> (3, size, size) float32 normalised network input.

    Raises ValueError for an array that is not 2-D.
    """
    arr = np.asarray(image01, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {arr.shape}")
    small = area_resize(np.clip(arr, 0.0, 1.0), int(size))
    m = np.asarray(mean, np.float32).reshape(3, 1, 1)
    s = np.asarray(std, np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((small[None] - m) / s, dtype=np.float32)
