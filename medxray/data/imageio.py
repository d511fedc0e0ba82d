"""The one PNG/JPEG radiograph decoder: training, evaluation, the cache, the demo and the app use it.

:func:`decode_image` turns a file path or the bytes of an upload into a 2-D grayscale array kept
at its stored bit depth (uint8 or uint16); :func:`read_image` is its training-side form (path in,
array and (H, W) out) and :meth:`DecodedImage.as_float01` gives the app's [0, 1] float32 view.
Both scale by the type's bit depth (0..255 or 0..65535), the same fixed convention as
:class:`medxray.data.transforms.ScaleByBitDepthd`, so a file gives the same model input whether
it was read for training or uploaded to the app.

Edge behaviour, the same for every caller:

- 8-bit gray ("L") and 16-bit gray ("I;16*") are kept as stored.
- 32-bit integer ("I", e.g. some 16-bit PNG/TIFF writers) is accepted only when every value lies
  in 0..65535 and is then treated as 16-bit; anything outside is refused (no data-dependent
  rescaling, which would make the same tissue a different intensity in each image).
- Floating-point images ("F": TIFF only, PNG/JPEG cannot hold them) are refused: there is no
  agreed scale for them; export an 8- or 16-bit grayscale PNG.
- Colour, palette and bilevel images are collapsed to 8-bit gray; :attr:`DecodedImage.colour`
  says whether the channels really differed (a radiograph saved as RGB does not count).
- Images larger than the pixel limit (:func:`medxray.limits.pixel_limit`: ``max_pixels``, else
  ``$MEDXRAY_MAX_PIXELS``, else 60 MP, the same default as the DICOM reader) are refused from
  their header, before their pixels are decoded (decompression bombs); images smaller than
  ``min_side`` on a side, non-images and truncated files are refused. Every refusal is a
  :class:`medxray.errors.DataError` naming the file.

Must not import torch, MONAI, Streamlit, pandas or other medxray.data modules: it is the leaf the
data layer and the review app both build on.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medxray.errors import DataError
from medxray.limits import DEFAULT_MAX_PIXELS, pixel_limit

MIN_IMAGE_SIDE = 32
MAX_PIXELS = DEFAULT_MAX_PIXELS  # the shared default (medxray.limits); $MEDXRAY_MAX_PIXELS overrides it
COLOUR_TOLERANCE = 8  # channel difference (of 255) below which an RGB file is gray saved as colour

_GRAY16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_COLLAPSE_MODES = frozenset({"1", "P", "PA", "LA", "La", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"})
_MULTI_CHANNEL_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"})


@dataclass(frozen=True)
class DecodedImage:
    """One decoded radiograph.

    ``pixels``: (H, W) uint8 or uint16, as stored (16-bit kept at 16 bits). ``format``: PIL's
    format name ("PNG", "JPEG", ...). ``colour``: the file had colour channels that differ by
    more than :data:`COLOUR_TOLERANCE` somewhere, so it may not be a radiograph.
    """

    pixels: np.ndarray
    format: str
    colour: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])

    def as_float01(self) -> np.ndarray:
        """(H, W) float32 in [0, 1]: the stored value divided by its type's maximum (255 or 65535)."""
        return to_float01(self.pixels)


def to_float01(pixels: np.ndarray) -> np.ndarray:
    """uint8/uint16 (H, W) -> float32 in [0, 1], scaled by the type's range, never by the data."""
    top = float(np.iinfo(pixels.dtype).max)
    return np.ascontiguousarray(pixels, dtype=np.float32) / np.float32(top)


def decode_image(
    source: str | os.PathLike | bytes,
    *,
    name: str | None = None,
    max_pixels: int | None = None,
    min_side: int = MIN_IMAGE_SIDE,
    exif_transpose: bool = False,
) -> DecodedImage:
    """Decode a PNG/JPEG (or other PIL-readable) radiograph from a path or from bytes.

    ``name`` labels the file in error messages (default: the path, or "the image" for bytes).
    ``max_pixels``: the largest width x height accepted (None: :func:`medxray.limits.pixel_limit`).
    ``exif_transpose`` applies a JPEG's EXIF orientation (photos of films taken by phones); off by
    default so the training data are read as stored. Raises :class:`DataError` for every refusal
    listed in the module docstring.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    limit = pixel_limit(max_pixels)
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    label = name or ("the image" if is_bytes else str(source))
    try:
        with Image.open(io.BytesIO(bytes(source)) if is_bytes else Path(source)) as img:
            w, h = img.size
            if w * h > limit:  # from the header: Image.open has decoded no pixel yet
                raise DataError(
                    f"{label} is {w}x{h} pixels, more than the {limit / 1e6:g} megapixels "
                    "accepted; downscale it first (or raise MEDXRAY_MAX_PIXELS)"
                )
            fmt = str(img.format or "")
            img.load()  # decode now, so a truncated file fails here and not later
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            pixels, colour = _gray(img, label)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{label}: file not found") from None
    except UnidentifiedImageError:
        raise DataError(
            f"{label} cannot be decoded: not an image file PIL can read (damaged, or not a PNG/JPEG?)"
        ) from None
    except Image.DecompressionBombError:  # Pillow's own ceiling (2 x Image.MAX_IMAGE_PIXELS), met in Image.open
        raise DataError(
            f"{label} has more pixels than Pillow will open and than the {limit / 1e6:g} megapixels "
            "accepted; downscale it first"
        ) from None
    except MemoryError:
        raise DataError(f"{label}: not enough memory to decode this image") from None
    except Exception as exc:  # Pillow's plugins raise many types on damaged files (make fuzz: TypeError in TIFF)
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise DataError(f"{label} cannot be decoded: unreadable or truncated image ({first})") from None
    if pixels.ndim != 2 or min(pixels.shape) < min_side:
        raise DataError(
            f"{label}: image of shape {pixels.shape} is not a 2-D radiograph of at least {min_side}x{min_side} pixels"
        )
    return DecodedImage(pixels=np.ascontiguousarray(pixels), format=fmt, colour=colour)


def _gray(img, label: str) -> tuple[np.ndarray, bool]:
    """(pixels at stored depth, colour?) of a loaded PIL image, or DataError for refused modes."""
    mode = img.mode
    if mode in _GRAY16_MODES:
        return np.array(img, dtype=np.uint16), False
    if mode == "I":
        arr32 = np.asarray(img)
        if arr32.size and (arr32.min() < 0 or arr32.max() > 65535):
            raise DataError(
                f"{label}: 32-bit integer image with values outside 0..65535; "
                "export it as an 8- or 16-bit grayscale PNG"
            )
        return arr32.astype(np.uint16), False
    if mode == "L":
        return np.array(img, dtype=np.uint8), False
    if mode == "F":
        raise DataError(
            f"{label}: floating-point image (unsupported pixel format 'F'); there is no agreed "
            "intensity scale for it, export it as an 8- or 16-bit grayscale PNG"
        )
    if mode in _COLLAPSE_MODES:
        colour = False
        if mode in _MULTI_CHANNEL_MODES:
            rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
            colour = bool(
                np.abs(rgb[..., 0] - rgb[..., 1]).max() > COLOUR_TOLERANCE
                or np.abs(rgb[..., 1] - rgb[..., 2]).max() > COLOUR_TOLERANCE
            )
        return np.array(img.convert("L"), dtype=np.uint8), colour
    raise DataError(
        f"{label}: unsupported pixel format {mode!r} (expected 8- or 16-bit grayscale PNG/JPEG); convert the image"
    )


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one PNG/JPEG radiograph into a 2-D uint8 or uint16 array and its (H, W).

    The training-side form of :func:`decode_image` (no EXIF rotation): 8- and 16-bit grayscale
    stay as stored so :class:`ScaleByBitDepthd` scales them by their bit depth; colour or palette
    files, such as the few RGBA images among the NIH PNGs, become 8-bit gray. Raises
    :class:`DataError` naming the file for a non-image, a truncated image, a float or
    out-of-range 32-bit image, or one smaller than 32x32.
    """
    img = decode_image(path)
    return img.pixels, img.shape
