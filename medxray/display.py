"""The display size of map overlays, shrinking an image to it, and the one [0, 1] -> 8-bit conversion.

Torch-free (decode workers use it).

Overlays (:func:`medxray.overlay.overlay_with_legend`, the one renderer of the scorer's PNGs, the
node's Secondary Captures and the app) are drawn at a display size, not at the detector's
2-3k pixels: :data:`DISPLAY_LONG_SIDE` on the long side by default. Imports only numpy and PIL.
"""

from __future__ import annotations

import numpy as np

# Long side (pixels) overlays are drawn at: a screen's worth of a 2-3k px detector image. The
# scorer's default --overlay-max-side; the node's SC (pacs.results.NODE_OVERLAY_MAX_SIDE) and the
# app's display (review.study.DISPLAY_MAX_SIDE) are this constant.
DISPLAY_LONG_SIDE = 1024


def to_uint8(image01: np.ndarray) -> np.ndarray:
    """A display image in [0, 1] as 8-bit grey levels: ``rint(clip(x, 0, 1) * 255)``.

    The one float -> uint8 conversion of medxray (the DICOM reader's display image and flat-image
    check, map overlays, the review app). Values are clipped to [0, 1] first, computed in float32
    and rounded to the nearest level, halves to even (``numpy.rint``), so level ``k`` holds
    ``[(k - 0.5) / 255, (k + 0.5) / 255]``. Any shape; returns a new uint8 array of the same
    shape. NaN has no grey level: callers pass finite values (the reader's are). Raises nothing
    for numeric input.
    """
    out = np.clip(np.asarray(image01, dtype=np.float32), 0.0, 1.0)
    out *= np.float32(255.0)
    np.rint(out, out=out)
    return out.astype(np.uint8)


def fit_display(gray_u8: np.ndarray, max_side: int | None = DISPLAY_LONG_SIDE) -> np.ndarray:
    """A uint8 (H, W) display image shrunk (area average, PIL BOX) so its long side is at most
    ``max_side`` pixels, aspect ratio kept; returned unchanged when already small enough or
    ``max_side`` is None / 0."""
    img = np.asarray(gray_u8)
    if not max_side or max(img.shape[:2]) <= int(max_side):
        return img
    from PIL import Image

    scale = int(max_side) / max(img.shape[:2])
    size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(size, Image.Resampling.BOX))
