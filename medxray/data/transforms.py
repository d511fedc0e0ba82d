"""MONAI dictionary transforms, defined once for every consumer.

The network input is defined once, by the input contract :func:`medxray.modelinput.model_input`
(dtype and range checked, area resize, 3 channels, ImageNet normalisation). The deterministic
list here is its MONAI dictionary form for datasets (training, validation, test, the
preprocessing cache): :class:`ScaleByBitDepthd`, :class:`AreaResized` and :class:`ReplicateNormalized`
are thin wrappers of the contract's ``unit_range``, ``area_resize`` and ``normalise``
(tests/test_input_contract.py proves the list and the function give bit-identical inputs for every
accepted dtype and refuse the same inputs).
The scorer, the app and the Predictor call the function itself (:func:`preprocess_array`).
Training appends random transforms to that list and never changes the deterministic part.

The intensity convention (what a pixel value means before normalisation) is the named constant
:data:`INTENSITY_CONVENTION`; it is stored in every checkpoint through
:func:`preprocessing_config`, and loading code refuses a checkpoint whose convention differs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import (
    EnsureChannelFirstd,
    MapTransform,
    RandomizableTransform,
)

from medxray.data.imageio import read_image
from medxray.modelinput import (  # noqa: F401  (the input contract, torch-free; constants re-exported)
    DEFAULT_IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTENSITY_CONVENTION,
    area_resize,
    check_preprocessing,
    model_input,
    normalise,
    preprocessing_config,
    unit_range,
)


class ScaleByBitDepthd(MapTransform):
    """Dictionary wrapper of :func:`medxray.modelinput.unit_range`: pixels to float32 [0, 1] by bit depth.

    MONAI's array / dictionary pattern: the rule (uint8 / 255, wider integers / (2**bits - 1),
    floats checked to lie in [0, 1], other dtypes refused with
    :class:`medxray.errors.ImageValueError`) is the input contract's one function; this class only
    applies it under each key. A torch tensor comes back as a float32 tensor, an array as an array.
    ``bits_stored`` is the stored bit depth of integer input when the source knows it (else 8 for
    1-byte types, 16 for wider ones).
    """

    def __init__(
        self, keys: Sequence[str] | str, bits_stored: int | None = None, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.bits_stored = bits_stored

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if isinstance(img, torch.Tensor):
                d[key] = torch.from_numpy(
                    unit_range(img.detach().cpu().as_subclass(torch.Tensor).numpy(), bits_stored=self.bits_stored)
                )
            else:
                d[key] = unit_range(img, bits_stored=self.bits_stored)
        return d


def deterministic_transforms(
    image_size: int = DEFAULT_IMAGE_SIZE, *, from_file: bool = True, keys: Sequence[str] = ("image",)
) -> list:
    """The one deterministic list.

    ``from_file=True`` starts from a path (PNG/JPEG as ChestX-ray14 ships them);
    ``from_file=False`` starts from a 2-D array the input contract accepts (uint8 / uint16 scaled
    by bit depth, float in [0, 1]; :func:`medxray.modelinput.unit_range`).
    The result under each key is a float tensor of shape (3, image_size, image_size).
    """
    keys = list(keys)
    head: list = []
    if from_file:
        head.append(ReadRadiographd(keys))
    head += scale_resize_transforms(image_size, keys=keys)
    head.append(ReplicateNormalized(keys))
    return head


def _plain_float(img: Any) -> torch.Tensor:
    """A plain (non-MetaTensor) float32 torch tensor view of ``img``."""
    if isinstance(img, torch.Tensor):
        return img.as_subclass(torch.Tensor).float()
    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))


class AreaResized(MapTransform):
    """Area (box-filter) resize of a (C, H, W) image to (C, S, S): :func:`medxray.modelinput.area_resize`.

    The input contract's own resize (adaptive average pooling), so the list gives the very numbers
    of :func:`preprocess_array` and the decode workers; they equal MONAI's ``Resized(mode="area")``
    (``torch.nn.functional.interpolate(mode="area")``) to float32 rounding, which a test checks.
    An image already S x S (the preprocessing cache) is passed through untouched.
    """

    def __init__(self, keys: Sequence[str], spatial_size: int) -> None:
        super().__init__(keys)
        self.size = (int(spatial_size), int(spatial_size))

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = _plain_float(d[key])
            if tuple(img.shape[1:]) != self.size:
                arr = img.numpy()
                img = torch.from_numpy(np.stack([area_resize(c, self.size[0]) for c in arr]))
            d[key] = img
        return d


class ReplicateNormalized(MapTransform):
    """(1, H, W) gray in [0, 1] -> (3, H, W) float32 tensor normalised with the ImageNet statistics.

    :func:`medxray.modelinput.normalise` (the input contract's last step); the result is that of
    ``RepeatChanneld(3)``, then ``NormalizeIntensityd(channel_wise=True)`` with IMAGENET_MEAN/STD,
    then ``EnsureTyped(float32)``.
    """

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = _plain_float(d[key])
            if img.ndim != 3 or img.shape[0] != 1:
                from medxray.errors import InputShapeError

                raise InputShapeError(f"expected a (1, H, W) gray image before normalisation, got {tuple(img.shape)}")
            d[key] = torch.from_numpy(normalise(img[0].numpy()))
        return d


def scale_resize_transforms(image_size: int, *, keys: Sequence[str] = ("image",)) -> list:
    """The part of the deterministic list that the preprocessing cache stores.

    2-D array -> (1, S, S) float in [0, 1]: channel first, scale by bit depth, area resize.
    :mod:`medxray.data.cache` quantises its output to uint8, so that cached pixels equal
    decode + resize by construction.
    """
    keys = list(keys)
    return [
        EnsureChannelFirstd(keys, channel_dim="no_channel"),
        ScaleByBitDepthd(keys),
        AreaResized(keys, image_size),
    ]


def train_transforms(
    image_size: int = DEFAULT_IMAGE_SIZE,
    *,
    from_file: bool = True,
    keys: Sequence[str] = ("image",),
    rotate_deg: float = 7.0,
    scale: float = 0.10,
    translate: float = 0.05,
    hflip: bool = True,
    brightness: float = 0.10,
    contrast: float = 0.10,
    prob: float = 0.5,
) -> list:
    """The deterministic list followed by the random transforms that training alone uses.

    The defaults are deliberately mild, because a radiograph has a fixed orientation:
    - a small rotation (``rotate_deg``), scale (``scale``) and translation (``translate``, as a
      fraction of the side), resampled with border padding so no black wedges appear;
    - a horizontal flip with probability 0.5 when ``hflip`` is set (CheXNet's only augmentation).
      Pass ``hflip=False`` to keep laterality;
    - brightness (an added offset) and contrast (a multiplicative factor), each up to the given
      fraction. They are applied to the normalised tensor, so they act around the ImageNet mean.

    Each random transform is applied with probability ``prob``. Set an argument to 0 (or
    ``hflip=False``) to drop that transform. The list's random state is seeded by its user
    (``Compose.set_random_state``). Nothing here touches the global RNG.
    """
    keys = list(keys)
    out = deterministic_transforms(image_size, from_file=from_file, keys=keys)
    if rotate_deg or scale or translate:
        out.append(RandSmallAffined(keys, prob=prob, rotate_deg=rotate_deg, scale=scale, translate=translate))
    if hflip:
        out.append(RandHFlipd(keys, prob=0.5))
    if contrast or brightness:
        out.append(RandContrastBrightnessd(keys, prob=prob, contrast=contrast, brightness=brightness))
    return out


class RandSmallAffined(RandomizableTransform, MapTransform):
    """Random rotation about the centre, isotropic zoom and shift, on (C, H, W) tensors.

    With probability ``prob``: angle ~ U(-rotate_deg, rotate_deg), zoom ~ 1 + U(-scale, scale),
    shift ~ U(-translate, translate) of the side on each axis, bilinear, border padding. This is
    the subset of MONAI's ``RandAffined`` that training uses. It goes straight to
    ``affine_grid``/``grid_sample``, which is about 3x cheaper per image than the general
    transform; that matters once images come from the preprocessing cache. The random state is
    the transform's own (``set_random_state``), as for every MONAI randomizable transform.
    """

    def __init__(
        self,
        keys: Sequence[str],
        *,
        prob: float = 0.5,
        rotate_deg: float = 7.0,
        scale: float = 0.1,
        translate: float = 0.05,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.rotate = float(np.deg2rad(rotate_deg))
        self.scale = float(scale)
        self.translate = float(translate)
        self._theta = torch.eye(2, 3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        a = self.R.uniform(-self.rotate, self.rotate)
        z = 1.0 + self.R.uniform(-self.scale, self.scale)
        tx, ty = self.R.uniform(-self.translate, self.translate, size=2) * 2.0  # [-1, 1] grid units
        c, s = np.cos(a) / z, np.sin(a) / z
        self._theta = torch.tensor([[c, -s, tx], [s, c, ty]], dtype=torch.float32)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = _plain_float(d[key])
            grid = torch.nn.functional.affine_grid(self._theta[None], [1, *img.shape], align_corners=False)
            d[key] = torch.nn.functional.grid_sample(
                img[None], grid, mode="bilinear", padding_mode="border", align_corners=False
            )[0]
        return d


class RandHFlipd(RandomizableTransform, MapTransform):
    """Left-right flip of a (C, H, W) tensor with probability ``prob`` (MONAI ``RandFlipd(spatial_axis=1)``).

    Arrays are (C, H, W) with rows as rows, so the last axis (W) is left-right.
    """

    def __init__(self, keys: Sequence[str], prob: float = 0.5) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = torch.flip(_plain_float(d[key]), dims=[-1])
        return d


class RandContrastBrightnessd(RandomizableTransform, MapTransform):
    """With probability ``prob`` each: x * (1 + U(-contrast, contrast)), then x + U(-brightness, brightness).

    Applied to the normalised tensor, so contrast acts around the ImageNet mean. This is the
    same as MONAI's ``RandScaleIntensityd`` followed by ``RandShiftIntensityd``, in one step on
    plain tensors.
    """

    def __init__(
        self, keys: Sequence[str], *, prob: float = 0.5, contrast: float = 0.1, brightness: float = 0.1
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, 1.0)
        self.p = float(prob)
        self.contrast = float(contrast)
        self.brightness = float(brightness)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        gain = 1.0 + self.R.uniform(-self.contrast, self.contrast) if self.R.rand() < self.p else 1.0
        shift = self.R.uniform(-self.brightness, self.brightness) if self.R.rand() < self.p else 0.0
        if gain != 1.0 or shift != 0.0:
            for key in self.key_iterator(d):
                d[key] = _plain_float(d[key]) * float(gain) + float(shift)
        return d


class ReadRadiographd(MapTransform):
    """File path -> 2-D uint8/uint16 array, decoded by :func:`medxray.data.imageio.read_image`.

    The data layer's one decoder (not MONAI's ``LoadImaged``), so a list that starts from a file
    sees exactly the pixels the datasets, the cache and the app see.
    """

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = read_image(d[key])[0]
        return d


def preprocess_array(image: np.ndarray, image_size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """The network input (3, S, S) float32 tensor for one 2-D image (Predictor, app, scorer path).

    :func:`medxray.modelinput.model_input` as a tensor: the input contract's one array-level
    function, so the Predictor and the scorer's decode workers compute the same numbers. Accepts
    uint8 / uint16 (scaled by bit depth) and float [0, 1]; raises
    :class:`medxray.errors.InputShapeError` for a non-2-D array and
    :class:`medxray.errors.ImageValueError` for a refused dtype or range.
    """
    return torch.from_numpy(model_input(image, int(image_size)))
