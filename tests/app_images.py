"""Small synthetic images for the app's loading and viewing tests: a chest-like grey pattern, as PNG or JPEG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_of(arr: np.ndarray, mode: str | None = None) -> bytes:
    """``arr`` (uint8 / uint16 grey, or uint8 RGB) encoded as PNG."""
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_of(arr: np.ndarray) -> bytes:
    """``arr`` (uint8) encoded as JPEG, quality 95."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def chest_like(h: int = 300, w: int = 280, seed: int = 0) -> np.ndarray:
    """A smooth grey pattern with noise, uint8 (h, w): enough structure for windowing and JPEG tests."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.5 + 0.3 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + rng.normal(0, 0.05, (h, w))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)
