"""Stored pixel values -> display image: the modality LUT, then the VOI LUT or a window.

DICOM PS3.3 C.11.1 (Modality LUT: rescale slope/intercept or a Modality LUT Sequence) and
C.11.2 (VOI LUT: a VOI LUT Sequence, or Window Center/Width with the VOI LUT Function
LINEAR, LINEAR_EXACT or SIGMOID). A window the standard does not define (LINEAR with width < 1,
width <= 0, an unknown function, a non-finite value) is not applied: :func:`window_problem`
names why and the reader takes the automatic window, :func:`auto_window` (0.5-99.5 percentiles
of the pixels that are not padding, PS3.3 C.7.5.1.1.2). :func:`rewindow` re-applies another
window (app sliders). :func:`grey_levels` counts what survives the window.
:func:`invert_monochrome1` is the one MONOCHROME1 inversion (PS3.3 C.7.6.3.1.2).

Which stage is pydicom's and which is ours, and why (each "why" is a test in
tests/test_dicom_standard.py that fails on pydicom's function):

* Modality LUT Sequence: ours (:func:`lut_table` + a clipped index, as PS3.3 C.11.1.1.1 says).
  pydicom's ``apply_modality_lut`` reads its own descriptor (an Implicit VR descriptor with 32768
  entries and signed pixels is -32768: IndexError) and builds the table as ``uint{bits}``, so a
  descriptor that says 12 bits (TypeError) or 8 bits over 16-bit words (OverflowError) fails;
* rescale slope/intercept: ours, float32 in place (pydicom's is float64 and ignores a slope
  without intercept); a test proves equal values;
* VOI LUT Sequence: ours. ``pydicom.pixels.apply_voi`` indexes with the LUT's entry type, so an
  8-bit LUT with more than 256 entries wraps, and it fails on the Implicit VR descriptor; and it
  scales by the descriptor's bits, so a table of 12-bit entries under a descriptor saying 16 (an
  Agfa CR habit) comes out washed out (the ``lut_range`` tests);

LUT entries whose range disagrees with the descriptor (its third value), one rule for the family:
the LUT Data's length says how the entries are stored (16-bit words when it holds two bytes per
entry, else bytes), whatever the descriptor's bits; the VOI LUT's output is scaled by
:func:`lut_output_max`, ``2**n - 1`` for the ``n`` bits its largest entry really uses (as
Cornerstone, Horos and dicom-rs do); the Modality LUT's entries are modality values and are used
as they are (only their storage is read as above).
* windows: ours, float32 in place and usable without a data set (:func:`rewindow`); a test proves
  equal values to ``pydicom.pixels.apply_windowing`` for every function the standard defines.

All arrays are 2-D; outputs are float32 (the window maps to [0, 1]). MONOCHROME1 inversion
(:func:`invert_monochrome1`) is applied by the reader and by :func:`rewindow`, not by the window
functions.

Must not import the reader (:mod:`medxray.dicom.reader` imports this) nor pydicom; imports
:mod:`medxray.display` for the one [0, 1] -> uint8 rounding.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from medxray.dicom.codes import UNREADABLE, UNSUPPORTED, refusal
from medxray.dicom.header import first_float, int_attr, lut_descriptor, text_attr
from medxray.display import to_uint8

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
    """('rescale', slope, intercept) or ('lut', first value mapped, table) from the file (PS3.3 C.11.1).

    The table is float64, as many entries as the descriptor says, read by :func:`lut_table`.
    Raises ``DicomError`` (``unreadable``/``unsupported``) for a LUT that cannot be read.
    """
    seq = ds.get("ModalityLUTSequence", None)
    if seq:
        item = seq[0]
        entries, first, bits = lut_descriptor(item, _signed(ds), _little_endian(ds))
        if not 1 <= bits <= 16:
            raise refusal(UNSUPPORTED, f"a Modality LUT with {bits}-bit entries (PS3.3 C.11.1.1.1: 8 or 16)")
        return ("lut", first, lut_table(item, entries, bits, _little_endian(ds)))
    slope = first_float(ds.get("RescaleSlope", None))
    intercept = first_float(ds.get("RescaleIntercept", None))
    ok = slope is not None and math.isfinite(slope) and slope != 0.0
    return ("rescale", slope if ok else 1.0, intercept if intercept is not None and math.isfinite(intercept) else 0.0)


def apply_modality_lut(stored: np.ndarray, params: Any) -> np.ndarray:
    """Stored integer values -> modality values (float32, same shape), with :func:`modality_lut_params`' result.

    A LUT maps stored value ``v`` to entry ``v - first`` (clipped to the table: PS3.3 C.11.1.1.1);
    a rescale is ``slope * v + intercept``.
    """
    if params[0] == "lut":
        _, first, table = params
        return _lookup(stored, first, table.astype(np.float32))
    _, slope, intercept = params
    out = stored.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _lookup(values: np.ndarray, first: int, table: np.ndarray) -> np.ndarray:
    """``table[clip(values - first, 0, len - 1)]`` (values below the first mapped take the first entry)."""
    idx = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values.astype(np.int64)
    idx -= first
    np.clip(idx, 0, table.size - 1, out=idx)
    return table[idx]


def lut_table(item: Any, entries: int, bits: int, little_endian: bool = True) -> np.ndarray:
    """The LUT Data of a LUT sequence item as float64, ``entries`` long (PS3.3 C.11.1.1.1, C.11.2.1.1).

    Bytes (OW/OB) are read as 16-bit words when they hold two bytes per entry and as bytes when
    they hold one, whatever ``bits`` says (writers put 12 or 16 there for either storage); a US
    value is used as is. Raises ``DicomError`` ``unreadable`` when there is no LUT Data or it is
    shorter than ``entries``.
    """
    data = item.get("LUTData", None)
    if data is None:
        raise refusal(UNREADABLE, "a LUT sequence item has no LUT Data")
    if isinstance(data, (bytes, bytearray)):
        # one byte per entry (+ the even-length pad) is bytes; anything longer under a wide descriptor is words
        wide = len(data) >= 2 * entries or (bits > 8 and len(data) > entries + 1)
        table = np.frombuffer(
            bytes(data[: len(data) // 2 * 2]) if wide else bytes(data),
            dtype=("<u2" if little_endian else ">u2") if wide else "u1",
        )
    else:
        table = np.asarray([data] if isinstance(data, int) else list(data), dtype=np.float64)
    if table.size < entries:
        raise refusal(UNREADABLE, f"a LUT holds {table.size} entries but its descriptor says {entries}")
    return np.asarray(table[:entries], dtype=np.float64)


def lut_output_max(table: np.ndarray) -> float:
    """What a VOI LUT's output is divided by to reach [0, 1]: ``2**n - 1``, ``n`` the bit length of its largest entry.

    Equal to the descriptor's ``2**bits - 1`` when the entries use the bits it declares; when
    they do not (12-bit entries under a descriptor saying 16: Agfa CR; wider entries than
    declared), the entries' real range wins, as in Cornerstone ("we don't trust numBitsPerEntry"),
    Horos and dicom-rs (PR 825). A table of zeros gives 1.
    """
    top = int(table.max()) if table.size else 0
    return float(2 ** max(top.bit_length(), 1) - 1)


def apply_voi_lut_seq(raw: np.ndarray, ds: Any) -> np.ndarray:
    """Apply the first VOI LUT Sequence item (PS3.3 C.11.2.1.1) -> float32 in [0, 1], ``raw``'s shape.

    Inputs below the first mapped value take the first entry, above the last the last entry.
    The output is scaled by :func:`lut_output_max` (the entries' real bit range, which is the
    descriptor's when they agree). Raises ``DicomError`` when the LUT is unusable (the reader
    then falls back to the window).
    """
    item = ds.VOILUTSequence[0]
    entries, first, bits = lut_descriptor(item, _signed(ds), _little_endian(ds))
    if not 1 <= bits <= 16:
        raise refusal(UNSUPPORTED, f"a VOI LUT with {bits}-bit entries")
    table = lut_table(item, entries, bits, _little_endian(ds))
    return _lookup(raw, first, (table / lut_output_max(table)).astype(np.float32))


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
            np.greater(y, np.float32(center - 0.5), out=y)
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
    counts = np.bincount(to_uint8(sample).ravel(), minlength=256)
    return int((counts >= max(1, sample.size // 10_000)).sum())


def rewindow(image: Rewindowable, center: float, width: float, func: str = "LINEAR") -> np.ndarray:
    """The display image for another window (app sliders): same rules as :func:`~medxray.dicom.read_dicom`.

    Raises ValueError for a window the standard does not define (e.g. LINEAR with width < 1).
    """
    return invert_monochrome1(apply_window(image.raw, center, width, func.upper()), image.meta.get("photometric"))


def invert_monochrome1(pixels: np.ndarray, photometric: str | None) -> np.ndarray:
    """``pixels`` (a float display image in [0, 1], any shape) shown so that air is dark.

    MONOCHROME1 means "the minimum sample value is intended to be displayed as white" (DICOM PS3.3
    C.7.6.3.1.2): its display image is inverted, ``1 - x``, in place; any other Photometric
    Interpretation (MONOCHROME2: minimum is black) is returned untouched. Returns ``pixels``.
    """
    if photometric == "MONOCHROME1":
        np.subtract(np.float32(1.0), pixels, out=pixels)
    return pixels
