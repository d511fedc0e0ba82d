"""Stored pixel values -> display image: the modality LUT, then the VOI LUT or a window.

DICOM PS3.3 C.11.1 (Modality LUT: rescale slope/intercept or a Modality LUT Sequence) and
C.11.2 (VOI LUT: a VOI LUT Sequence, or Window Center/Width with the VOI LUT Function
LINEAR, LINEAR_EXACT or SIGMOID). A window the standard does not define (LINEAR with width < 1,
width <= 0, an unknown function, a non-finite value) is not applied: :func:`window_problem`
names why and the reader takes the automatic window, :func:`auto_window` (0.5-99.5 percentiles
of the pixels that are not padding, PS3.3 C.7.5.1.1.2). :func:`rewindow` re-applies another
window (app sliders). :func:`grey_levels` counts what survives the window.

Which stage is pydicom's and which is ours, and why (each "why" is a test in
tests/test_dicom_standard.py that fails on pydicom's function):

* Modality LUT Sequence: ``pydicom.pixels.apply_modality_lut``, fed the descriptor read by
  :func:`medxray.dicom.header.lut_descriptor` (pydicom's own reading of an Implicit VR descriptor
  with 32768 entries and signed pixels is -32768 and its function raises IndexError);
* rescale slope/intercept: ours, float32 in place (pydicom's is float64 and ignores a slope
  without intercept); a test proves equal values;
* VOI LUT Sequence: ours. ``pydicom.pixels.apply_voi`` indexes with the LUT's entry type, so an
  8-bit LUT with more than 256 entries wraps, and it fails on the Implicit VR descriptor;
* windows: ours, float32 in place and usable without a data set (:func:`rewindow`); a test proves
  equal values to ``pydicom.pixels.apply_windowing`` for every function the standard defines.

All arrays are 2-D; outputs are float32 (the window maps to [0, 1]). MONOCHROME1 inversion is
applied by the reader and by :func:`rewindow`, not by the window functions.

Must not import the reader (:mod:`medxray.dicom.reader` imports this); pydicom is imported
lazily, only for the Modality LUT Sequence.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from medxray.dicom.codes import UNREADABLE, UNSUPPORTED, one_line, refusal
from medxray.dicom.header import first_float, int_attr, lut_descriptor, text_attr

#: An image with fewer 8-bit grey levels than this ("a handful"; each on >= 1/10000 of the pixels) is flat.
MIN_GREY_LEVELS = 5
_SAMPLE_PIXELS = 250_000


class Rewindowable(Protocol):
    """What :func:`rewindow` needs of a decoded image (:class:`medxray.dicom.DicomImage` has it)."""

    raw: np.ndarray
    meta: dict[str, Any]


def _little_endian(ds: Any) -> bool:
    ts = getattr(getattr(ds, "file_meta", None), "get", lambda *_: None)("TransferSyntaxUID", None)
    return bool(getattr(ts, "is_little_endian", True)) if ts is not None else True


def _signed(ds: Any) -> bool:
    return (int_attr(ds, "PixelRepresentation", 0) or 0) == 1


def modality_lut_params(ds: Any) -> Any:
    """('rescale', slope, intercept) or ('lut', data set for pydicom) from the file (PS3.3 C.11.1)."""
    seq = ds.get("ModalityLUTSequence", None)
    if seq:
        from pydicom.dataset import Dataset, FileMetaDataset

        item = seq[0]
        entries, first, bits = lut_descriptor(item, _signed(ds), _little_endian(ds))
        if bits not in (8, 16):
            raise refusal(UNSUPPORTED, f"a Modality LUT with {bits}-bit entries (PS3.3 C.11.1.1.1 allows 8 or 16)")
        if "LUTData" not in item:
            raise refusal(UNREADABLE, "the Modality LUT Sequence item has no LUT Data")
        fixed = Dataset()
        fixed.add_new(0x00283002, "SS" if first < 0 else "US", [entries % 65536, first, bits])
        fixed.add(item["LUTData"])
        holder = Dataset()
        holder.file_meta = FileMetaDataset()
        holder.file_meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
        holder.ModalityLUTSequence = [fixed]
        return ("lut", holder)
    slope = first_float(ds.get("RescaleSlope", None))
    intercept = first_float(ds.get("RescaleIntercept", None))
    ok = slope is not None and math.isfinite(slope) and slope != 0.0
    return ("rescale", slope if ok else 1.0,
            intercept if intercept is not None and math.isfinite(intercept) else 0.0)


def apply_modality_lut(stored: np.ndarray, params: Any) -> np.ndarray:
    """Stored integer values -> modality values (float32), with :func:`modality_lut_params`' result."""
    if params[0] == "lut":
        from pydicom.pixels import apply_modality_lut as pydicom_modality_lut

        try:
            return np.asarray(pydicom_modality_lut(stored, params[1]), dtype=np.float32)
        except Exception as exc:  # LUT Data shorter than its descriptor, wrong VR, ...
            raise refusal(UNREADABLE, f"the Modality LUT cannot be applied ({type(exc).__name__}: "
                                      f"{one_line(str(exc), 160)})") from None
    _, slope, intercept = params
    out = stored.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def lut_table(item: Any, entries: int, bits: int, little_endian: bool = True) -> np.ndarray:
    """The LUT Data of a LUT sequence item as float64, ``entries`` long (PS3.3 C.11.2.1.1)."""
    data = item.get("LUTData", None)
    if data is None:
        raise refusal(UNREADABLE, "a LUT sequence item has no LUT Data")
    if isinstance(data, (bytes, bytearray)):
        wide = bits > 8 or len(data) >= 2 * entries
        table = np.frombuffer(bytes(data[: len(data) // 2 * 2]) if wide else bytes(data),
                              dtype=("<u2" if little_endian else ">u2") if wide else "u1")
    else:
        table = np.asarray([data] if isinstance(data, int) else list(data), dtype=np.float64)
    if table.size < entries:
        raise refusal(UNREADABLE, f"a LUT holds {table.size} entries but its descriptor says {entries}")
    return np.asarray(table[:entries], dtype=np.float64)


def apply_voi_lut_seq(raw: np.ndarray, ds: Any) -> np.ndarray:
    """Apply the first VOI LUT Sequence item (PS3.3 C.11.2.1.1) -> float32 in [0, 1].

    Inputs below the first mapped value take the first entry, above the last the last entry.
    The output is scaled by the entries' bit depth (by the table's maximum when a writer stated
    too few bits). Raises ``DicomError`` when the LUT is unusable (the reader then falls back).
    """
    item = ds.VOILUTSequence[0]
    entries, first, bits = lut_descriptor(item, _signed(ds), _little_endian(ds))
    if not 1 <= bits <= 16:
        raise refusal(UNSUPPORTED, f"a VOI LUT with {bits}-bit entries")
    table = lut_table(item, entries, bits, _little_endian(ds))
    top = max(float(2**bits - 1), float(table.max()) if table.size else 1.0, 1.0)
    idx = np.rint(raw).astype(np.int64)
    idx -= first
    np.clip(idx, 0, entries - 1, out=idx)
    return (table / top).astype(np.float32)[idx]


def window_from_file(ds: Any) -> tuple[float, float, str] | None:
    """(center, width, VOI LUT Function) stored in the file (first value if several), or None.

    The values are returned as found; :func:`window_problem` says whether the standard defines them.
    """
    center = first_float(ds.get("WindowCenter", None))
    width = first_float(ds.get("WindowWidth", None))
    if center is None or width is None:
        return None
    func = text_attr(ds, "VOILUTFunction").upper() or "LINEAR"
    return center, width, func


def window_problem(center: float, width: float, func: str) -> str | None:
    """Why the standard does not define this window (PS3.3 C.11.2.1.2/3), or None when it does."""
    if not (math.isfinite(center) and math.isfinite(width)):
        return "a center or width that is not a finite number"
    if func == "LINEAR":
        return None if width >= 1.0 else "LINEAR needs a width of at least 1"
    if func in ("LINEAR_EXACT", "SIGMOID"):
        return None if width > 0.0 else f"{func} needs a width above 0"
    return f"unknown VOI LUT Function {func[:32]!r}"


def apply_window(raw: np.ndarray, center: float, width: float, func: str, out: np.ndarray | None = None) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1], float32, in place when ``out`` is given.

    ``func`` is LINEAR (width >= 1), LINEAR_EXACT or SIGMOID (width > 0); check with
    :func:`window_problem` first. Raises ValueError for a window the standard does not define.
    """
    problem = window_problem(center, width, func)
    if problem is not None:
        raise ValueError(problem)
    y = out if out is not None else np.array(raw, dtype=np.float32, copy=True)
    if func == "SIGMOID":
        y -= np.float32(center)
        y *= np.float32(-4.0 / width)
        np.clip(y, -80.0, 80.0, out=y)  # exp(80) fits float32; the output is 0 or 1 to 1e-35 there
        np.exp(y, out=y)
        y += np.float32(1.0)
        np.reciprocal(y, out=y)
        return y
    if func == "LINEAR_EXACT":
        lo, scale = center - width / 2.0, 1.0 / width
    else:  # LINEAR: the standard's (c - 0.5, w - 1) form; width 1 is a threshold at c - 0.5
        w1 = width - 1.0
        if w1 == 0.0:
            np.greater(y, np.float32(center - 0.5), out=y)  # type: ignore[call-overload]
            return y.astype(np.float32, copy=False)
        lo, scale = center - 0.5 - w1 / 2.0, 1.0 / w1
    y -= np.float32(lo)
    y *= np.float32(scale)
    np.clip(y, 0.0, 1.0, out=y)
    return y


def auto_window(raw: np.ndarray, exclude: np.ndarray | None = None) -> tuple[float, float] | None:
    """Robust (center, width) when the file has no usable window, or None if no pixel is left.

    0.5-99.5 percentiles of a strided sample of the pixels not in ``exclude`` (the padding mask),
    used with LINEAR_EXACT (defined for any width > 0, so tiny rescaled ranges work too).
    """
    step = max(1, int(np.sqrt(raw.size / _SAMPLE_PIXELS)))
    sample = raw[::step, ::step]
    if exclude is not None:
        sample = sample[~exclude[::step, ::step]]
        if sample.size == 0:
            sample = raw[~exclude]
    sample = np.asarray(sample, dtype=np.float64).ravel()
    if sample.size == 0:
        return None
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
        if hi <= lo:
            spread = abs(lo) * 1e-6 or 1e-6
            lo, hi = lo - spread, hi + spread
    return (lo + hi) / 2.0, hi - lo



def grey_levels(pixels: np.ndarray, exclude: np.ndarray | None = None) -> int:
    """8-bit grey levels that each hold >= 1/10000 of the (non-excluded) pixels of a [0, 1] image."""
    step = max(1, int(np.sqrt(pixels.size / _SAMPLE_PIXELS)))
    sample = pixels[::step, ::step]
    if exclude is not None:
        sample = sample[~exclude[::step, ::step]]
    if sample.size == 0:
        return 0
    counts = np.bincount(np.rint(np.clip(sample, 0.0, 1.0) * 255.0).astype(np.int64).ravel(), minlength=256)
    return int((counts >= max(1, sample.size // 10_000)).sum())


def rewindow(image: Rewindowable, center: float, width: float, func: str = "LINEAR") -> np.ndarray:
    """The display image for another window (app sliders): same rules as :func:`~medxray.dicom.read_dicom`.

    Raises ValueError for a window the standard does not define (e.g. LINEAR with width < 1).
    """
    pixels = apply_window(image.raw, center, width, func.upper())
    if image.meta.get("photometric") == "MONOCHROME1":
        np.subtract(np.float32(1.0), pixels, out=pixels)
    return pixels
