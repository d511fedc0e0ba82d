"""Stored pixel values -> display image: the modality LUT, then the VOI LUT or a window.

DICOM PS3.3 C.11.1 (Modality LUT: rescale slope/intercept or a Modality LUT Sequence) and
C.11.2 (VOI LUT: a VOI LUT Sequence, or Window Center/Width with the VOI LUT Function
LINEAR, LINEAR_EXACT or SIGMOID). When the file has neither, :func:`percentile_window` gives a
robust 0.5-99.5 percentile window. :func:`rewindow` re-applies another window (app sliders).

All arrays are 2-D; outputs are float32 (the window maps to [0, 1]). MONOCHROME1 inversion is
applied by the reader and by :func:`rewindow`, not by the window functions.

Must not import the reader (:mod:`medxray.dicom.reader` imports this) nor pydicom.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from medxray.dicom.codes import UNREADABLE, refusal
from medxray.dicom.header import first_float, text_attr


class Rewindowable(Protocol):
    """What :func:`rewindow` needs of a decoded image (:class:`medxray.dicom.DicomImage` has it)."""

    raw: np.ndarray
    meta: dict[str, Any]


def modality_lut_params(ds: Any) -> Any:
    """('rescale', slope, intercept) or ('lut', first, table) from the file (PS3.3 C.11.1)."""
    seq = ds.get("ModalityLUTSequence", None)
    if seq:
        item = seq[0]
        desc = [int(x) for x in item.LUTDescriptor]
        table = lut_table(item, desc)
        return ("lut", desc[1], table)
    slope = first_float(ds.get("RescaleSlope", None))
    intercept = first_float(ds.get("RescaleIntercept", None))
    return ("rescale", 1.0 if slope in (None, 0.0) else slope, 0.0 if intercept is None else intercept)


def lut_table(item: Any, desc: list[int]) -> np.ndarray:
    """The LUT Data of a LUT sequence item as float64 (``desc`` = its LUT Descriptor as ints)."""
    data = item.get("LUTData", None)
    if data is None:
        raise refusal(UNREADABLE, "a LUT sequence item has no LUT Data")
    n = desc[0] or 65536
    if isinstance(data, (bytes, bytearray)):
        table = np.frombuffer(data, dtype="<u2" if desc[2] > 8 or len(data) >= 2 * n else "u1")
    else:
        table = np.asarray(list(data) if not isinstance(data, int) else [data], dtype=np.float64)
    return np.asarray(table[:n], dtype=np.float64)


def apply_modality_lut(stored: np.ndarray, params: Any) -> np.ndarray:
    """Stored integer values -> modality values (float32), with :func:`modality_lut_params`' result."""
    kind = params[0]
    if kind == "lut":
        _, first, table = params
        idx = np.clip(stored.astype(np.int64) - first, 0, len(table) - 1)
        return table.astype(np.float32)[idx]
    _, slope, intercept = params
    out = stored.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def window_from_file(ds: Any) -> tuple[float, float, str] | None:
    """(center, width, VOI LUT Function) stored in the file (first value if several), or None."""
    center = first_float(ds.get("WindowCenter", None))
    width = first_float(ds.get("WindowWidth", None))
    if center is None or width is None or width <= 0:
        return None
    func = text_attr(ds, "VOILUTFunction").upper() or "LINEAR"
    if func not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        func = "LINEAR"
    return center, width, func


def apply_window(raw: np.ndarray, center: float, width: float, func: str, out: np.ndarray | None = None) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1], float32, in place when ``out`` is given."""
    y = out if out is not None else np.array(raw, dtype=np.float32, copy=True)
    if func == "SIGMOID":
        y -= np.float32(center)
        y *= np.float32(-4.0 / width)
        np.exp(y, out=y)
        y += np.float32(1.0)
        np.reciprocal(y, out=y)
        return y
    if func == "LINEAR_EXACT":
        lo, scale = center - width / 2.0, 1.0 / width
    else:  # LINEAR: the standard's (c - 0.5, w - 1) form
        w1 = max(width - 1.0, 1e-6)
        lo, scale = center - 0.5 - w1 / 2.0, 1.0 / w1
    y -= np.float32(lo)
    y *= np.float32(scale)
    np.clip(y, 0.0, 1.0, out=y)
    return y


def percentile_window(raw: np.ndarray) -> tuple[float, float]:
    """Robust (center, width) when the file has none: 0.5-99.5 percentiles of a strided sample."""
    step = max(1, int(np.sqrt(raw.size / 250_000)))
    sample = raw[::step, ::step]
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
        if hi <= lo:
            hi = lo + 1.0
    return (lo + hi) / 2.0, hi - lo


def apply_voi_lut_seq(raw: np.ndarray, item: Any) -> np.ndarray:
    """Apply the first VOI LUT Sequence item (PS3.3 C.11.2.1.1) -> float32 in [0, 1]."""
    desc = [int(x) for x in item.LUTDescriptor]
    table = lut_table(item, desc)
    top = float(2 ** desc[2] - 1) if desc[2] > 0 else 1.0
    if table.size and table.max() > top:  # some writers state the wrong bit depth
        top = float(table.max())
    idx = np.clip(np.rint(raw).astype(np.int64) - desc[1], 0, len(table) - 1)
    return (table / max(top, 1.0)).astype(np.float32)[idx]


def rewindow(image: Rewindowable, center: float, width: float, func: str = "LINEAR") -> np.ndarray:
    """The display image for another window (app sliders): same rules as :func:`~medxray.dicom.read_dicom`."""
    pixels = apply_window(image.raw, center, width, func.upper())
    if image.meta.get("photometric") == "MONOCHROME1":
        np.subtract(np.float32(1.0), pixels, out=pixels)
    return pixels
