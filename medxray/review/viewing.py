"""How the reviewer looks at an image: window/level presets, invert, zoom and pan, the CAM overlay.

All of it changes the display only; the model always reads the file's default rendering
(:attr:`medxray.review.study.StudyImage.pixels`). Chest presets are set from the image's own
brightness distribution, because projection radiographs have no calibrated unit (unlike CT's
Hounsfield units, a CR/DX pixel value depends on the detector and the exposure): "Lung" spreads
the darker part of the film (aerated lung), "Mediastinum" the brighter soft tissue behind the
heart and mediastinum, "Bone" the brightest part. Window values are shown in the file's stored
units (after the Modality LUT, DICOM PS3.3 C.11.1) for DICOM, and as a share of the grey range for
PNG/JPEG, whose grey levels have no unit.

Must not import streamlit (only :mod:`medxray.review.ui` and its page helpers do) or the
worklist/model-card modules; the map drawing itself is :mod:`medxray.cam`'s (one definition).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PRESET_DEFAULT = "File default"
# Brightness quantiles (dark -> bright on screen) each preset spans.
CHEST_PRESETS: dict[str, tuple[float, float]] = {
    "Lung": (0.02, 0.60),
    "Mediastinum": (0.40, 0.995),
    "Bone": (0.65, 0.999),
}
PRESETS: tuple[str, ...] = (PRESET_DEFAULT, *CHEST_PRESETS)
ZOOM_LEVELS: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)


@dataclass(frozen=True)
class ViewState:
    """What the reviewer chose: a window (None: the file's default), invert, zoom and pan centre."""

    window: tuple[float, float] | None = None  # (center, width) in the file's units, or [0, 1] for PNG
    invert: bool = False
    zoom: float = 1.0
    center_x: float = 0.5  # pan centre as a fraction of the width / height
    center_y: float = 0.5


def _sample(values: np.ndarray, n: int = 250_000) -> np.ndarray:
    v = np.asarray(values)
    step = max(1, int(np.sqrt(v.size / n)))
    return v[::step, ::step].astype(np.float64, copy=False).ravel()


def preset_window(study: Any, preset: str) -> tuple[float, float] | None:
    """(center, width) of a chest preset for this image, None for the file default.

    For DICOM the window is in the raw (modality-LUT) values; MONOCHROME1 films are bright where
    the values are low, so the quantiles are taken from the other end. For PNG/JPEG it is in
    [0, 1] grey levels. Raises KeyError for an unknown preset name.
    """
    if preset == PRESET_DEFAULT:
        return None
    q_lo, q_hi = CHEST_PRESETS[preset]
    raw = getattr(study, "raw", None)
    if raw is not None:
        values = _sample(raw)
        if str(study.meta.get("photometric", "")).upper() == "MONOCHROME1":
            q_lo, q_hi = 1.0 - q_hi, 1.0 - q_lo
    else:
        values = _sample(study.pixels)
    lo, hi = np.quantile(values, [q_lo, q_hi])
    width = max(float(hi - lo), 1.0 if raw is not None else 1e-3)
    return float((lo + hi) / 2.0), width


def window_text(study: Any, window: tuple[float, float] | None) -> str:
    """The window as the reviewer should read it: file units for DICOM, a share of the grey range otherwise."""
    if window is None:
        if getattr(study, "window", None) is not None:
            c, w = study.window
            return f"file default: center {c:g}, width {w:g} (stored values after the modality LUT)"
        return "file default rendering"
    c, w = window
    if getattr(study, "raw", None) is not None:
        return f"center {c:.0f}, width {w:.0f} (stored values after the modality LUT)"
    return f"center {100 * c:.0f}%, width {100 * w:.0f}% of the grey range"


def apply_gray_window(img01: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Linear window on [0, 1] grey levels (PNG/JPEG): ``(x - (c - w/2)) / w`` clipped to [0, 1]."""
    c, w = float(window[0]), max(float(window[1]), 1e-6)
    return np.clip((np.asarray(img01, np.float32) - (c - w / 2.0)) / w, 0.0, 1.0)


def crop_box(shape: tuple[int, int], zoom: float, center_x: float, center_y: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the region shown at ``zoom`` around the pan centre, inside the image."""
    h, w = int(shape[0]), int(shape[1])
    z = max(1.0, float(zoom))
    ch, cw = max(1, round(h / z)), max(1, round(w / z))
    cy = min(max(float(center_y), 0.0), 1.0) * h
    cx = min(max(float(center_x), 0.0), 1.0) * w
    top = int(min(max(round(cy - ch / 2), 0), h - ch))
    left = int(min(max(round(cx - cw / 2), 0), w - cw))
    return top, top + ch, left, left + cw


def apply_view(img: np.ndarray, view: ViewState) -> np.ndarray:
    """Invert (for a 2-D [0, 1] image) and crop to the zoomed region; works on RGB arrays too (crop only)."""
    out = np.asarray(img)
    if view.invert and out.ndim == 2:
        out = 1.0 - out
    top, bottom, left, right = crop_box(out.shape[:2], view.zoom, view.center_x, view.center_y)
    return out[top:bottom, left:right]


def cam_view(
    display01: np.ndarray,
    cam: np.ndarray,
    view: ViewState,
    *,
    alpha: float = 0.4,
    style: str = "fill",
    title: str = "",
    finding: str | None = None,
) -> np.ndarray:
    """The CAM over the displayed (windowed, inverted, zoomed) image, with its colour bar: uint8 RGB.

    The map is upsampled to the full display first and cropped with the image, so image and map
    stay aligned at any zoom; drawing (floor, colour bar, contour, the "no positive evidence"
    words) is :func:`medxray.overlay.overlay_with_legend`.
    """
    from medxray.overlay import overlay_with_legend, upsample_cam

    full = upsample_cam(np.asarray(cam, dtype=np.float32), display01.shape[:2])
    shown = apply_view(display01, view)
    top, bottom, left, right = crop_box(display01.shape[:2], view.zoom, view.center_x, view.center_y)
    return np.asarray(
        overlay_with_legend(
            shown,
            full[top:bottom, left:right],
            title,
            alpha=float(alpha),
            style=style,
            finding=finding,
            footer="not for clinical use",
        )
    )


def spacing_text(value: Any) -> str:
    """Pixel Spacing (mm) for the metadata table; a missing or zero spacing is "unknown", never "0, 0"."""
    try:
        vals = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    except (TypeError, ValueError):
        return "unknown"
    if not vals or any(not np.isfinite(v) or v <= 0 for v in vals):
        return "unknown"
    return " x ".join(f"{v:g}" for v in vals) + " mm"
