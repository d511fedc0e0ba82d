"""The input contract: the one array-level function from a decoded image to the network input.

:func:`model_input` is the network input for a 2-D array, for every caller: the scorer's decode
workers, :meth:`medxray.inference.Predictor.preprocess` (through
:func:`medxray.data.transforms.preprocess_array`) and the app. The MONAI dictionary list of
:mod:`medxray.data.transforms` (training, evaluation, the preprocessing cache) wraps the same three
step functions as ``MapTransform`` s (MONAI's array / dictionary pattern), so every path computes
bit-identical inputs. The steps, in order:

1. :func:`unit_range`: dtype and range checked, pixels mapped to float32 [0, 1] with a fixed,
   data-independent scale (0 = black, i.e. air is dark):

   - ``uint8`` (any 1-byte integer): divided by 255;
   - any wider integer type: divided by ``2**bits_stored - 1`` when the caller knows the stored
     bit depth (DICOM BitsStored, PS3.3 C.7.6.3.1.1), else by 65535, i.e. treated as 16-bit gray
     (Pillow reads 16-bit PNGs as ``uint16`` or ``int32``). We do not guess a bit depth from the
     data (a 12-bit image in a ``uint16`` is scaled by 65535 unless ``bits_stored=12`` is given),
     because a data-dependent scale would give the same tissue a different intensity in each
     image. Values below 0 or above the bit depth's maximum are refused;
   - floating point: taken to be [0, 1] already (the DICOM reader's output) and refused when any
     value lies outside [-1e-3, 1 + 1e-3] or is NaN/infinite (the message says to divide by 255 or
     65535, or to pass the integer array); values within the tolerance are clipped;
   - ``bool``, complex, object, string and date types are refused.

   Every refusal is a :class:`medxray.errors.ImageValueError` (a ``DataError`` and a
   ``ValueError``) with one message saying what was wrong and what to do.
2. :func:`area_resize` to S x S (``torch.nn.functional.interpolate(mode="area")``, i.e.
   adaptive average pooling: output cell i averages input rows floor(i*H/S) .. ceil((i+1)*H/S) - 1).
3. Replicated to 3 channels and normalised with the ImageNet mean and std that the DenseNet was
   initialised with (Huang et al. 2017; torchvision's weights).

Tests: tests/test_input_contract.py (every entry point, every dtype: same input or same refusal),
tests/test_speed_reduce.py (numpy resize equals torch ``mode="area"``). Must import nothing but
numpy and :mod:`medxray.errors` (the decode workers never import torch or MONAI).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np

from medxray.errors import CheckpointError, ImageValueError, InputShapeError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

FLOAT_TOLERANCE = 1e-3
"""How far outside [0, 1] a float pixel may lie (rounding of an upstream resize or window) before it is refused."""

DEFAULT_INTEGER_BITS = 16
"""Bit depth assumed for an integer image wider than one byte when the caller does not say (see :func:`unit_range`)."""


def integer_scale(dtype: np.dtype, bits_stored: int | None = None) -> float:
    """The divisor that maps integer pixels of ``dtype`` to [0, 1]: ``2**bits - 1``.

    ``bits`` is ``bits_stored`` when given (1..16, at most the dtype's width), else 8 for a
    1-byte type and 16 for any wider one. Raises :class:`ImageValueError` for a bad ``bits_stored``.
    """
    width = 8 * np.dtype(dtype).itemsize
    default = 8 if width == 8 else DEFAULT_INTEGER_BITS
    if bits_stored is None:
        bits = default
    else:
        bits = int(bits_stored)
        if not 1 <= bits <= min(width, 16):
            raise ImageValueError(
                f"bits_stored={bits_stored} does not fit a {np.dtype(dtype).name} image "
                f"(expected 1..{min(width, 16)}); pass the BitsStored of the image's source"
            )
    return float(2**bits - 1)


def unit_range(image: np.ndarray, *, bits_stored: int | None = None) -> np.ndarray:
    """Any-shape grayscale array -> float32 array of the same shape in [0, 1] (step 1 of the contract).

    See the module docstring for the rule per dtype. ``bits_stored`` applies to integer images only.
    Raises :class:`medxray.errors.ImageValueError` for an empty array, a dtype that is not an
    image's, integer values outside 0..2**bits-1, or float values outside [0, 1] (beyond
    :data:`FLOAT_TOLERANCE`) or not finite.
    """
    arr = np.asarray(image)
    kind = arr.dtype.kind
    if kind not in "uif":
        what = {"b": "a boolean array (a mask?)", "c": "complex"}.get(kind, f"of dtype {arr.dtype}")
        raise ImageValueError(
            f"image is {what}, not a grayscale image; pass the decoded pixels as an unsigned "
            "integer array (8 or 16 bit) or a float array in [0, 1]"
        )
    if arr.size == 0:
        raise ImageValueError(f"image is empty (shape {arr.shape}); pass the decoded pixels")
    lo, hi = float(arr.min()), float(arr.max())
    if kind == "f":
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ImageValueError("float image contains NaN or infinite values; pass finite pixels in [0, 1]")
        if lo < -FLOAT_TOLERANCE or hi > 1.0 + FLOAT_TOLERANCE:
            raise ImageValueError(
                f"float image has values in [{lo:g}, {hi:g}], medxray takes float images in [0, 1]: divide "
                "8-bit values by 255 (16-bit by 65535), or pass the integer array itself (it is scaled by "
                "its bit depth)"
            )
        out = arr.astype(np.float32, copy=False)
        if lo < 0.0 or hi > 1.0:
            out = np.clip(out, 0.0, 1.0)
        return out
    top = integer_scale(arr.dtype, bits_stored)
    if lo < 0 or hi > top:
        bits = int(round(np.log2(top + 1)))
        raise ImageValueError(
            f"integer image ({arr.dtype}) has values in [{lo:g}, {hi:g}], outside 0..{top:g} of {bits}-bit gray; "
            "pass unsigned 8- or 16-bit pixels (or the stored bit depth as bits_stored), or a float image in [0, 1]"
        )
    return (arr.astype(np.float32) / np.float32(top)).astype(np.float32, copy=False)


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


def normalise(
    gray01: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """(H, W) gray in [0, 1] -> (3, H, W) float32: replicated to 3 channels, minus ``mean``, over ``std``."""
    m = np.asarray(mean, np.float32).reshape(3, 1, 1)
    s = np.asarray(std, np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((np.asarray(gray01, np.float32)[None] - m) / s, dtype=np.float32)


def model_input(
    image: np.ndarray,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    bits_stored: int | None = None,
) -> np.ndarray:
    """2-D grayscale image (H, W), any size and dtype the contract accepts -> (3, size, size) float32.

    :func:`unit_range` (dtype and range checked), :func:`area_resize`, :func:`normalise`.
    Raises :class:`medxray.errors.InputShapeError` (a ``ValueError``) for an array that is not
    2-D and :class:`medxray.errors.ImageValueError` for one whose dtype or range is refused.
    """
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise InputShapeError(
            f"expected a 2-D grayscale image (H, W), got shape {tuple(arr.shape)}; convert a colour image to gray first"
        )
    return normalise(area_resize(unit_range(arr, bits_stored=bits_stored), int(size)), mean, std)


# Grayscale scaled to [0, 1] by the stored bit depth (0 = black, i.e. air is dark, after any
# MONOCHROME1 inversion), resized to a square, replicated to 3 channels and normalised with the
# ImageNet statistics the DenseNet was initialised with.
INTENSITY_CONVENTION = "gray01-bitdepth/square-area-resize/rgb-replicate/imagenet-norm/v1"
DEFAULT_IMAGE_SIZE = 224


def preprocessing_config(image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, Any]:
    """JSON-able description of the deterministic transforms, stored in checkpoints."""
    return {
        "intensity": INTENSITY_CONVENTION,
        "image_size": int(image_size),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "channels": 3,
    }


def check_preprocessing(preprocessing: Mapping[str, Any]) -> int:
    """Validate a checkpoint's stored preprocessing against this code; return its image size.

    Raises :class:`medxray.errors.CheckpointError` when the checkpoint's intensity convention is
    not :data:`INTENSITY_CONVENTION` (its network input would mean something else)."""
    conv = preprocessing.get("intensity")
    if conv != INTENSITY_CONVENTION:
        raise CheckpointError(
            f"checkpoint was trained with intensity convention {conv!r}, this medxray uses "
            f"{INTENSITY_CONVENTION!r}; re-train or use the medxray version that wrote it"
        )
    return int(preprocessing.get("image_size", DEFAULT_IMAGE_SIZE))
