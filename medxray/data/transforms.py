"""MONAI dictionary transforms, defined once for every consumer.

One deterministic list turns an image into the network's input; validation, test, the DICOM
scorer and the app all use it, so a checkpoint scores an image the same way everywhere.
Training appends random transforms to that list and never changes the deterministic part.

The intensity convention (what a pixel value means before normalisation) is the named constant
:data:`INTENSITY_CONVENTION`; it is stored in every checkpoint through
:func:`preprocessing_config`, and loading code refuses a checkpoint whose convention differs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.data import PILReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    RepeatChanneld,
    Resized,
)

# Grayscale scaled to [0, 1] by the stored bit depth (0 = black, i.e. air is dark, after any
# MONOCHROME1 inversion), resized to a square, replicated to 3 channels and normalised with the
# ImageNet statistics the DenseNet was initialised with.
INTENSITY_CONVENTION = "gray01-bitdepth/square-area-resize/rgb-replicate/imagenet-norm/v1"
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
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


class ScaleByBitDepthd(MapTransform):
    """Map integer pixels to [0, 1] by the range of their stored type (8 or 16 bit).

    A fixed, data-independent scale keeps the convention identical for every image; float
    input is taken to be in [0, 1] already (the DICOM decoder produces that) and clipped.
    """

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr_dtype = img.dtype
            if isinstance(img, torch.Tensor):
                is_int = not torch.is_floating_point(img)
                top = float(torch.iinfo(arr_dtype).max) if is_int else 1.0
                img = img.float()
            else:
                is_int = np.issubdtype(arr_dtype, np.integer)
                top = float(np.iinfo(arr_dtype).max) if is_int else 1.0
                img = np.asarray(img, dtype=np.float32)
            if is_int:
                if arr_dtype in (np.int32, torch.int32) and float(img.max()) <= 65535:
                    top = 65535.0  # 16-bit PNGs arrive as int32 from PIL
                img = img / top
            d[key] = img.clip(0.0, 1.0)
        return d


def deterministic_transforms(
    image_size: int = DEFAULT_IMAGE_SIZE, *, from_file: bool = True, keys: Sequence[str] = ("image",)
) -> list:
    """The one deterministic list.

    ``from_file=True`` starts from a path (PNG/JPEG as ChestX-ray14 ships them);
    ``from_file=False`` starts from a 2-D float array already in [0, 1] (DICOM decoder, app).
    The result under each key is a float tensor of shape (3, image_size, image_size).
    """
    keys = list(keys)
    head: list = []
    if from_file:
        # reverse_indexing=False keeps rows as rows (MONAI's PIL default would transpose).
        head.append(
            LoadImaged(keys, reader=PILReader(reverse_indexing=False, converter=_to_gray), dtype=None, image_only=True)
        )
    head += [
        EnsureChannelFirstd(keys, channel_dim="no_channel"),
        ScaleByBitDepthd(keys),
        Resized(keys, spatial_size=(image_size, image_size), mode="area"),
        RepeatChanneld(keys, repeats=3),
        NormalizeIntensityd(
            keys,
            subtrahend=np.asarray(IMAGENET_MEAN, dtype=np.float32),
            divisor=np.asarray(IMAGENET_STD, dtype=np.float32),
            channel_wise=True,
        ),
        EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False),
    ]
    return head


def _to_gray(img):  # PIL.Image -> PIL.Image
    """Collapse RGB(A)/palette images to one channel; keep 8/16-bit grayscale as stored."""
    if img.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
        return img
    return img.convert("L")


def check_preprocessing(preprocessing: Mapping[str, Any]) -> int:
    """Validate a checkpoint's stored preprocessing against this code; return its image size."""
    from medxray.errors import CheckpointError

    conv = preprocessing.get("intensity")
    if conv != INTENSITY_CONVENTION:
        raise CheckpointError(
            f"checkpoint was trained with intensity convention {conv!r}, this medxray uses "
            f"{INTENSITY_CONVENTION!r}; re-train or use the medxray version that wrote it"
        )
    return int(preprocessing.get("image_size", DEFAULT_IMAGE_SIZE))


def preprocess_array(image01: np.ndarray, image_size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """Deterministic transforms applied to one 2-D [0, 1] array (scorer and app path)."""
    if image01.ndim != 2:
        from medxray.errors import InputShapeError

        raise InputShapeError(f"expected a 2-D grayscale image, got shape {tuple(image01.shape)}")
    return Compose(deterministic_transforms(image_size, from_file=False))({"image": image01.astype(np.float32)})["image"]
