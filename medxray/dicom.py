"""DICOM file -> display-ready float image in [0, 1] plus safe metadata, or a clear refusal.

What the scorer and the app both need from a radiograph, decided once here:

* files are recognised by content (the ``DICM`` marker after the 128-byte preamble, or a raw
  data set without preamble starting with group 0002/0008), never by extension;
* the modality LUT (rescale slope/intercept, or a Modality LUT Sequence) gives ``raw``; the VOI
  LUT Sequence or the window stored in the file (first value when multi-valued, VOI LUT Function
  honoured) maps it to [0, 1], else a robust 0.5-99.5 percentile window; MONOCHROME1 is inverted
  so that air is always dark; BitsStored and PixelRepresentation are honoured (overlay bits in
  the unused high bits are masked, signed values are sign-extended);
* anything that is not a single 2-D grayscale image the model can read is refused with a
  :class:`~medxray.errors.DicomError` whose ``code`` names the case and whose message says why.

Metadata is an allow-list of non-identifying attributes: patient names, IDs and birth dates
never leave this module.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, Union

import numpy as np

from medxray.errors import DicomError

log = logging.getLogger(__name__)

DicomSource = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes]]

DEFAULT_ALLOWED_MODALITIES: tuple[str, ...] = ("CR", "DX")
# The largest chest detectors are ~4300x4300 (18.5 MP); 50 MP leaves room and bounds memory.
DEFAULT_MAX_PIXELS = 50_000_000
# File-size guard checked before anything is read into memory (uncompressed 50 MP x 4 bytes + header).
_MAX_FILE_BYTES_PER_PIXEL = 4
_MAX_HEADER_BYTES = 64 << 20

# Refusal codes (DicomError.code); the reason text starts with the code so a CSV is greppable.
NOT_DICOM = "not_dicom"
UNREADABLE = "unreadable"
TRUNCATED = "truncated"
NO_PIXEL_DATA = "no_pixel_data"
SHORT_PIXEL_DATA = "short_pixel_data"
MULTI_FRAME = "multi_frame"
COLOUR = "colour"
MODALITY = "modality"
TOO_LARGE = "too_large"
UNSUPPORTED = "unsupported"
DECODE_FAILED = "decode_failed"

LATERAL_WARNING = (
    "lateral view: the model was trained on frontal (PA/AP) chest radiographs, predictions on a "
    "lateral view are unreliable"
)

_UNDEFINED = 0xFFFFFFFF
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_LATERAL_POSITIONS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"})
_LATERAL_WORD = re.compile(r"\bLAT(ERAL)?\b", re.IGNORECASE)


def refusal(code: str, message: str) -> DicomError:
    """A :class:`DicomError` carrying a machine-readable ``code`` and a ``code: message`` text."""
    err = DicomError(f"{code}: {message}")
    err.code = code  # type: ignore[attr-defined]
    return err


@dataclass
class DicomImage:
    """One decoded radiograph.

    ``pixels`` is what the model and a viewer see (float32, [0, 1], air dark). ``raw`` holds the
    modality-LUT values (e.g. for re-windowing in the app); it is computed on first access so the
    batch scorer does not pay for a second full-size float copy it never uses.
    """

    pixels: np.ndarray
    meta: dict[str, Any]
    window: tuple[float, float] | None
    warnings: list[str] = field(default_factory=list)
    is_lateral: bool = False
    _stored: np.ndarray | None = field(default=None, repr=False)
    _modality_lut: Any = field(default=None, repr=False)
    _raw: np.ndarray | None = field(default=None, repr=False)

    @property
    def raw(self) -> np.ndarray:
        """Modality-LUT output (rescaled values, e.g. Hounsfield-like units), float32 2-D."""
        if self._raw is None:
            if self._stored is None:
                raise ValueError("this DicomImage was built without its stored values")
            self._raw = _apply_modality_lut(self._stored, self._modality_lut)
        return self._raw

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]

    def display_uint8(self) -> np.ndarray:
        """The display image as 8-bit grayscale (for PNG overlays and thumbnails)."""
        return np.rint(self.pixels * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# recognising and reading
# ---------------------------------------------------------------------------------------------


def sniff_dicom(head: bytes) -> str | None:
    """Tell from the first bytes whether this is DICOM: ``"part10"``, ``"raw"`` (no preamble) or None.

    Raw data sets (older modalities, some archives) start directly with an element of group
    0002 or 0008; explicit-VR ones have a VR after the tag, implicit ones a small length.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "part10"
    if len(head) < 8:
        return None
    for endian in "<>":
        group, _elem = struct.unpack(endian + "HH", head[:4])
        if group not in (0x0002, 0x0008):
            continue
        if head[4:6] in _VRS:
            return "raw"
        (length,) = struct.unpack(endian + "I", head[4:8])
        if length <= 0x4000:
            return "raw"
    return None


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Cheap content check (reads 132 bytes); used to tell DICOM from other files in a folder."""
    try:
        with open(path, "rb") as fh:
            return sniff_dicom(fh.read(132)) is not None
    except OSError:
        return False


def _read_source(source: DicomSource, max_bytes: int) -> tuple[bytes, str]:
    """Return the file content and a display name (never the patient: the caller's path)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = "<bytes>"
    elif isinstance(source, (str, os.PathLike)):
        p = Path(source)
        try:
            size = p.stat().st_size
        except OSError as exc:
            raise refusal(UNREADABLE, f"cannot open the file ({exc.strerror or type(exc).__name__})") from None
        if size > max_bytes:
            raise refusal(TOO_LARGE, f"the file is {size / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit")
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise refusal(UNREADABLE, f"cannot read the file ({exc.strerror or type(exc).__name__})") from None
        name = p.name
    elif hasattr(source, "read"):
        if hasattr(source, "seek"):
            try:
                source.seek(0)
            except (OSError, ValueError):
                pass
        data = source.read(max_bytes + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("read_dicom needs a binary file object")
        if len(data) > max_bytes:
            raise refusal(TOO_LARGE, f"the upload is above the {max_bytes / 2**20:.0f} MiB limit")
        data = bytes(data)
        name = str(getattr(source, "name", "<stream>"))
    else:
        raise TypeError(f"read_dicom takes a path, bytes or a binary file object, not {type(source).__name__}")
    if len(data) > max_bytes:
        raise refusal(TOO_LARGE,
                      f"the data is {len(data) / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit")
    return data, name


def _element_end(el: Any) -> int | None:
    """File offset just past a raw element, or None when pydicom no longer knows it."""
    tell = getattr(el, "value_tell", None)
    length = getattr(el, "length", None)
    if tell is None or length is None:
        return None
    if length == _UNDEFINED:
        value = getattr(el, "value", None)
        if not isinstance(value, (bytes, bytearray)):
            return None
        return tell + len(value) + 8  # + the sequence delimitation item
    return tell + length


def _check_not_truncated(ds: Any, size: int, kind: str) -> None:
    """pydicom reads a cut file silently; find the cut from the element offsets it recorded."""
    meta = getattr(ds, "file_meta", None)
    if kind == "part10" and meta is not None:
        group_len = meta.get("FileMetaInformationGroupLength")
        if group_len is not None and size < 132 + 12 + int(group_len):
            raise refusal(TRUNCATED, "the file ends inside its DICOM header (it was cut short or damaged)")
    if len(ds) == 0:
        raise refusal(TRUNCATED, "the file ends before its data set is complete (cut short or damaged)")
    ends: dict[Any, int | None] = {}
    for tag in ds.keys():
        end = _element_end(ds.get_item(tag))
        if end is not None and end > size:
            raise refusal(TRUNCATED, f"the file ends inside element {tag} (it was cut short or damaged)")
        ends[tag] = end
    known = [e for e in ends.values() if e is not None]
    last_tag = max(ends)
    if known and ends[last_tag] is not None and max(known) < size:
        # pydicom stops quietly at a partial element header or an unterminated sequence.
        raise refusal(
            TRUNCATED, f"the file ends {size - max(known)} bytes into an incomplete element (cut short or damaged)"
        )


def _parse(data: bytes, kind: str) -> Any:
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=(kind == "raw"))
    except Exception as exc:  # pydicom raises many types for damaged headers
        raise refusal(
            UNREADABLE, f"the file looks like DICOM but its header cannot be parsed ({type(exc).__name__})"
        ) from None
    meta = ds.file_meta
    ts = meta.get("TransferSyntaxUID", None)
    if ts is None or not ts.is_deflated:  # offsets of a deflated body are not file offsets
        _check_not_truncated(ds, len(data), kind)
    if "TransferSyntaxUID" not in meta:
        # Raw data sets carry no meta group: the encoding pydicom detected defines the syntax.
        el = ds.get_item("PixelData") if "PixelData" in ds else None
        if el is not None and getattr(el, "length", 0) == _UNDEFINED:
            raise refusal(UNSUPPORTED, "compressed pixel data without a transfer syntax; the codec is unknown")
        implicit, little = getattr(ds, "original_encoding", (True, True))
        implicit = True if implicit is None else implicit
        little = True if little is None else little
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    return ds


# ---------------------------------------------------------------------------------------------
# checks before decoding
# ---------------------------------------------------------------------------------------------


def _int(ds: Any, keyword: str, default: int | None = None) -> int | None:
    """Integer attribute (first value if multi-valued), or ``default`` when absent or invalid."""
    v = ds.get(keyword, None)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except TypeError:
        try:
            return int(v[0])
        except (TypeError, ValueError, IndexError):
            return default
    except ValueError:
        return default


def _first_float(v: Any) -> float | None:
    """First value of a (possibly multi-valued) DS/IS element."""
    if v is None or v == "":
        return None
    try:
        if isinstance(v, (str, bytes)):
            return float(v)
        try:
            return float(v[0])
        except TypeError:
            return float(v)
    except (TypeError, ValueError, IndexError):
        return None


def _text(ds: Any, keyword: str) -> str:
    v = ds.get(keyword, None)
    if v is None:
        return ""
    if not isinstance(v, (str, bytes)):
        try:
            v = "\\".join(str(x) for x in v)
        except TypeError:
            v = str(v)
    return str(v).strip()


def _safe_meta(ds: Any, ts_uid: Any) -> dict[str, Any]:
    """Allow-listed, non-identifying attributes only (no names, IDs, dates of birth)."""
    spacing = ds.get("PixelSpacing", None) or ds.get("ImagerPixelSpacing", None)
    try:
        spacing = [float(x) for x in spacing] if spacing is not None else None
    except (TypeError, ValueError):
        spacing = None
    return {
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "series_instance_uid": _text(ds, "SeriesInstanceUID"),
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "modality": _text(ds, "Modality").upper(),
        "view_position": _text(ds, "ViewPosition").upper(),
        "body_part": _text(ds, "BodyPartExamined").upper(),
        "image_laterality": _text(ds, "ImageLaterality").upper(),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "bits_allocated": _int(ds, "BitsAllocated"),
        "bits_stored": _int(ds, "BitsStored"),
        "pixel_representation": _int(ds, "PixelRepresentation", 0),
        "photometric": _text(ds, "PhotometricInterpretation").upper(),
        "transfer_syntax": str(ts_uid),
        "transfer_syntax_name": getattr(ts_uid, "name", str(ts_uid)),
        "pixel_spacing_mm": spacing,
    }


def _lateral(ds: Any, meta: Mapping[str, Any]) -> bool:
    if meta["view_position"] in _LATERAL_POSITIONS:
        return True
    if meta["view_position"]:
        return False
    for item in ds.get("ViewCodeSequence", None) or []:
        meaning = str(item.get("CodeMeaning", "")).lower()
        if "lateral" in meaning and "decubitus" not in meaning:
            return True
    # No view position at all: descriptions are the only hint left (read, never stored).
    for keyword in ("SeriesDescription", "ProtocolName", "StudyDescription"):
        if _LATERAL_WORD.search(_text(ds, keyword)):
            return True
    return False


def _check_image(ds: Any, allowed_modalities: Iterable[str] | None, max_pixels: int | None) -> None:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise refusal(UNSUPPORTED, "float pixel data (a parametric map), not a radiograph")
        raise refusal(NO_PIXEL_DATA,
                      "the file holds no pixel data (a report, structured document or other non-image object)")
    frames = _int(ds, "NumberOfFrames", 1) or 1
    if frames > 1:
        raise refusal(MULTI_FRAME, f"the file holds {frames} frames; only single-frame 2-D radiographs can be scored")
    spp = _int(ds, "SamplesPerPixel", 1) or 1
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise refusal(
            COLOUR,
            f"colour image ({photometric or 'no photometric interpretation'}, {spp} samples per pixel); "
            "only grayscale MONOCHROME1/2 radiographs can be scored",
        )
    if allowed_modalities is not None:
        allowed = {m.upper() for m in allowed_modalities}
        modality = _text(ds, "Modality").upper()
        if modality not in allowed:
            raise refusal(
                MODALITY,
                f"modality {modality or '(missing)'} is not in the allowed list {sorted(allowed)} "
                "(change the allow-list to score it anyway)",
            )
    rows, cols = _int(ds, "Rows", 0) or 0, _int(ds, "Columns", 0) or 0
    if rows <= 0 or cols <= 0:
        raise refusal(UNREADABLE, f"invalid image size {rows}x{cols} in the header")
    if max_pixels is not None and rows * cols > max_pixels:
        raise refusal(
            TOO_LARGE,
            f"the image is {cols}x{rows} = {rows * cols / 1e6:.1f} MP, above the {max_pixels / 1e6:.1f} MP limit "
            "(raise max_pixels if this is a real radiograph)",
        )
    bits_alloc = _int(ds, "BitsAllocated", 0) or 0
    if bits_alloc not in (8, 16, 32):
        raise refusal(UNSUPPORTED, f"{bits_alloc}-bit allocated pixels; only 8, 16 or 32 bits are supported")
    bits_stored = _int(ds, "BitsStored", bits_alloc) or bits_alloc
    if not 1 <= bits_stored <= bits_alloc:
        raise refusal(UNREADABLE, f"BitsStored {bits_stored} does not fit BitsAllocated {bits_alloc}")


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------


def _decode_stored(ds: Any) -> np.ndarray:
    """Stored pixel values as an integer array, BitsStored/PixelRepresentation honoured."""
    ts = ds.file_meta.TransferSyntaxUID
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits_alloc = int(ds.BitsAllocated)
    bits_stored = _int(ds, "BitsStored", bits_alloc) or bits_alloc
    signed = (_int(ds, "PixelRepresentation", 0) or 0) == 1
    if not ts.is_compressed and not ts.is_deflated:
        # Native pixels: a direct view of the bytes (pydicom's generic path copies several times).
        raw = ds.get_item("PixelData").value
        if raw is None:
            raw = ds.PixelData
        nbytes = bits_alloc // 8
        expected = rows * cols * nbytes
        if len(raw) < expected:
            raise refusal(
                SHORT_PIXEL_DATA,
                f"the pixel data holds {len(raw)} bytes but the header promises {cols}x{rows}x{bits_alloc} bits "
                f"= {expected} bytes",
            )
        dtype = np.dtype(f"{'i' if signed else 'u'}{nbytes}").newbyteorder("<" if ts.is_little_endian else ">")
        arr = np.frombuffer(raw, dtype=dtype, count=rows * cols).reshape(rows, cols)
        arr = arr.astype(dtype.newbyteorder("="), copy=False)
    else:
        try:
            arr = ds.pixel_array
        except Exception as exc:  # codec errors come in many types
            first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise refusal(DECODE_FAILED, f"cannot decode the {ts.name} pixel data ({first})") from None
        if arr.ndim != 2 or arr.shape != (rows, cols):
            raise refusal(UNSUPPORTED, f"decoded pixel array has shape {arr.shape}, expected ({rows}, {cols})")
    if not np.issubdtype(arr.dtype, np.integer):
        raise refusal(UNSUPPORTED, f"decoded pixels are {arr.dtype}, expected integers")
    if bits_stored < bits_alloc:
        shift = arr.dtype.itemsize * 8 - bits_stored
        if signed:
            # Sign-extend from BitsStored; also drops overlay bits above it.
            arr = (arr.astype(arr.dtype, copy=True) << shift) >> shift
        else:
            arr = arr & np.array((1 << bits_stored) - 1, dtype=arr.dtype)
    return arr


def _modality_lut_params(ds: Any) -> Any:
    """('rescale', slope, intercept) or ('lut', first, table) from the file."""
    seq = ds.get("ModalityLUTSequence", None)
    if seq:
        item = seq[0]
        desc = [int(x) for x in item.LUTDescriptor]
        table = _lut_table(item, desc)
        return ("lut", desc[1], table)
    slope = _first_float(ds.get("RescaleSlope", None))
    intercept = _first_float(ds.get("RescaleIntercept", None))
    return ("rescale", 1.0 if slope in (None, 0.0) else slope, 0.0 if intercept is None else intercept)


def _lut_table(item: Any, desc: list[int]) -> np.ndarray:
    data = item.get("LUTData", None)
    if data is None:
        raise refusal(UNREADABLE, "a LUT sequence item has no LUT Data")
    n = desc[0] or 65536
    if isinstance(data, (bytes, bytearray)):
        table = np.frombuffer(data, dtype="<u2" if desc[2] > 8 or len(data) >= 2 * n else "u1")
    else:
        table = np.asarray(list(data) if not isinstance(data, int) else [data], dtype=np.float64)
    return np.asarray(table[:n], dtype=np.float64)


def _apply_modality_lut(stored: np.ndarray, params: Any) -> np.ndarray:
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


def _window_from_file(ds: Any) -> tuple[float, float, str] | None:
    center = _first_float(ds.get("WindowCenter", None))
    width = _first_float(ds.get("WindowWidth", None))
    if center is None or width is None or width <= 0:
        return None
    func = _text(ds, "VOILUTFunction").upper() or "LINEAR"
    if func not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        func = "LINEAR"
    return center, width, func


def _apply_window(raw: np.ndarray, center: float, width: float, func: str, out: np.ndarray | None = None) -> np.ndarray:
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


def _percentile_window(raw: np.ndarray) -> tuple[float, float]:
    """Robust window when the file has none: 0.5-99.5 percentiles of a strided sample."""
    step = max(1, int(np.sqrt(raw.size / 250_000)))
    sample = raw[::step, ::step]
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
        if hi <= lo:
            hi = lo + 1.0
    return (lo + hi) / 2.0, hi - lo


def _apply_voi_lut_seq(raw: np.ndarray, item: Any) -> np.ndarray:
    desc = [int(x) for x in item.LUTDescriptor]
    table = _lut_table(item, desc)
    top = float(2 ** desc[2] - 1) if desc[2] > 0 else 1.0
    if table.size and table.max() > top:  # some writers state the wrong bit depth
        top = float(table.max())
    idx = np.clip(np.rint(raw).astype(np.int64) - desc[1], 0, len(table) - 1)
    return (table / max(top, 1.0)).astype(np.float32)[idx]


# ---------------------------------------------------------------------------------------------
# public entry
# ---------------------------------------------------------------------------------------------


def read_dicom(
    source: DicomSource,
    *,
    allowed_modalities: Iterable[str] | None = DEFAULT_ALLOWED_MODALITIES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    keep_raw: bool = True,
) -> DicomImage:
    """Read one DICOM radiograph (path, bytes or binary file object) into a :class:`DicomImage`.

    ``allowed_modalities=None`` accepts any modality (tests, research use). ``keep_raw=False``
    frees the stored values once the display image exists (the batch scorer never needs ``raw``).
    Raises :class:`DicomError` (with ``.code``) for anything it refuses.
    """
    max_bytes = (max_pixels or DEFAULT_MAX_PIXELS) * _MAX_FILE_BYTES_PER_PIXEL + _MAX_HEADER_BYTES
    data, _name = _read_source(source, max_bytes)
    if not data:
        raise refusal(NOT_DICOM, "the file is empty (0 bytes)")
    kind = sniff_dicom(data[:132])
    if kind is None:
        raise refusal(NOT_DICOM, "not a DICOM file (no DICM marker and no DICOM data set at the start)")
    ds = _parse(data, kind)
    try:
        _check_image(ds, allowed_modalities, max_pixels)
        ts = ds.file_meta.TransferSyntaxUID
        meta = _safe_meta(ds, ts)
        stored = _decode_stored(ds)
        mlut = _modality_lut_params(ds)
        voi_seq = ds.get("VOILUTSequence", None)
        lateral = _lateral(ds, meta)
    except DicomError:
        raise
    except Exception as exc:  # a damaged attribute surfaces lazily in pydicom
        raise refusal(UNREADABLE, f"a header attribute cannot be interpreted ({type(exc).__name__})") from None
    del data

    raw = _apply_modality_lut(stored, mlut)
    window: tuple[float, float] | None
    if voi_seq:
        pixels = _apply_voi_lut_seq(raw, voi_seq[0])
        window, meta["window_source"] = None, "voi_lut"
    else:
        from_file = _window_from_file(ds)
        if from_file is not None:
            center, width, func = from_file
            meta["window_source"] = "file"
        else:
            (center, width), func = _percentile_window(raw), "LINEAR_EXACT"
            meta["window_source"] = "percentile"
        meta["voi_lut_function"] = func
        window = (float(center), float(width))
        pixels = _apply_window(raw, center, width, func, out=None if keep_raw else raw)
    if meta["photometric"] == "MONOCHROME1":
        np.subtract(np.float32(1.0), pixels, out=pixels)
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    warns: list[str] = []
    if lateral:
        warns.append(LATERAL_WARNING)
    return DicomImage(
        pixels=pixels,
        meta=meta,
        window=window,
        warnings=warns,
        is_lateral=lateral,
        _stored=stored if keep_raw else None,
        _modality_lut=mlut,
        _raw=raw if keep_raw and raw is not pixels else None,
    )


def rewindow(image: DicomImage, center: float, width: float, func: str = "LINEAR") -> np.ndarray:
    """The display image for another window (app sliders): same rules as :func:`read_dicom`."""
    pixels = _apply_window(image.raw, center, width, func.upper())
    if image.meta.get("photometric") == "MONOCHROME1":
        np.subtract(np.float32(1.0), pixels, out=pixels)
    return pixels
