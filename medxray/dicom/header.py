"""What the DICOM header says, read defensively: attribute readers, safe metadata, checks.

* :func:`int_attr`, :func:`first_float`, :func:`text_attr`: one attribute of a pydicom data set,
  tolerant of multi-valued, empty and malformed values;
* :func:`safe_meta`: the allow-list of non-identifying attributes that may leave the reader
  (patient names, IDs and birth dates never do);
* :func:`is_lateral_view`: view position, view code or (failing both) descriptions;
* :func:`check_image`: everything refused before any pixel is decoded (no pixel data, frames,
  colour, missing photometric interpretation, modality, size, bit depth), DICOM PS3.3 C.7.6.3
  Image Pixel Module;
* :func:`transfer_syntax`: the Transfer Syntax UID, refused when it is not one (PS3.5 A);
* :func:`lut_descriptor`: a LUT Descriptor with its first and third values read unsigned whatever
  VR the file gave it (PS3.3 C.11.1.1.1, C.11.2.1.1);
* :func:`padding_range`: Pixel Padding Value / Range Limit in stored units (PS3.3 C.7.5.1.1.2);
* :func:`scrub_phi`: a message with the file's patient identifiers blanked out.

These readers are public: the scorer's body-part / distribution gate reads headers through them.
Must not import the reader, the VOI code or anything outside :mod:`medxray.dicom.codes`
(pydicom data sets are duck-typed here; pydicom itself is not imported).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import Any, Iterable, Mapping

from medxray.dicom.codes import (
    COLOUR,
    MISSING_ATTRIBUTE,
    MODALITY,
    MULTI_FRAME,
    NO_PIXEL_DATA,
    TOO_LARGE,
    UNREADABLE,
    UNSUPPORTED,
    refusal,
)

_COLOUR_PHOTOMETRICS = frozenset(
    {
        "RGB",
        "PALETTE COLOR",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_PARTIAL_422",
        "YBR_PARTIAL_420",
        "YBR_ICT",
        "YBR_RCT",
        "HSV",
        "ARGB",
        "CMYK",
        "XYB",
    }
)
# Attributes whose values are blanked out of any message that leaves the reader.
PHI_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "AccessionNumber",
    "PatientAddress",
    "ReferringPhysicianName",
    "InstitutionName",
)

_LATERAL_POSITIONS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"})
_LATERAL_WORD = re.compile(r"\bLAT(ERAL)?\b", re.IGNORECASE)


def int_attr(ds: Any, keyword: str, default: int | None = None) -> int | None:
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


def first_float(v: Any) -> float | None:
    """First value of a (possibly multi-valued) DS/IS element, or None when absent or invalid."""
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


def text_attr(ds: Any, keyword: str) -> str:
    """A text attribute, stripped; multiple values joined with a backslash; "" when absent."""
    v = ds.get(keyword, None)
    if v is None:
        return ""
    if not isinstance(v, (str, bytes)):
        try:
            v = "\\".join(str(x) for x in v)
        except TypeError:
            v = str(v)
    return str(v).strip()


def safe_meta(ds: Any, ts_uid: Any) -> dict[str, Any]:
    """Allow-listed, non-identifying attributes only (no names, IDs, dates of birth)."""
    spacing = ds.get("PixelSpacing", None) or ds.get("ImagerPixelSpacing", None)
    try:
        spacing = [float(x) for x in spacing] if spacing is not None else None
    except (TypeError, ValueError):
        spacing = None
    return {
        "sop_instance_uid": text_attr(ds, "SOPInstanceUID"),
        "study_instance_uid": text_attr(ds, "StudyInstanceUID"),
        "series_instance_uid": text_attr(ds, "SeriesInstanceUID"),
        "sop_class_uid": text_attr(ds, "SOPClassUID"),
        "modality": text_attr(ds, "Modality").upper(),
        "view_position": text_attr(ds, "ViewPosition").upper(),
        "body_part": text_attr(ds, "BodyPartExamined").upper(),
        "image_laterality": text_attr(ds, "ImageLaterality").upper(),
        "rows": int_attr(ds, "Rows"),
        "columns": int_attr(ds, "Columns"),
        "bits_allocated": int_attr(ds, "BitsAllocated"),
        "bits_stored": int_attr(ds, "BitsStored"),
        "pixel_representation": int_attr(ds, "PixelRepresentation", 0),
        "photometric": text_attr(ds, "PhotometricInterpretation").upper(),
        "transfer_syntax": str(ts_uid),
        "transfer_syntax_name": getattr(ts_uid, "name", str(ts_uid)),
        "pixel_spacing_mm": spacing,
        "view_code": code_meaning(ds, "ViewCodeSequence"),
        "anatomic_region": code_meaning(ds, "AnatomicRegionSequence"),
    }


def code_meaning(ds: Any, keyword: str) -> str:
    """``CodeMeaning`` (else ``CodeValue``) of the first item of a code sequence, upper case; "" when absent."""
    try:
        items = ds.get(keyword, None) or []
        item = items[0] if len(items) else None
        if item is None:
            return ""
        return (text_attr(item, "CodeMeaning") or text_attr(item, "CodeValue")).upper()[:64]
    except Exception:  # a damaged sequence is no reason to refuse the image
        return ""


def is_lateral_view(ds: Any, meta: Mapping[str, Any]) -> bool:
    """True for a lateral projection (View Position, else View Code Sequence, else descriptions)."""
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
        if _LATERAL_WORD.search(text_attr(ds, keyword)):
            return True
    return False


def check_image(ds: Any, allowed_modalities: Iterable[str] | None, max_pixels: int | None) -> None:
    """Refuse (``DicomError`` with a code) anything that is not one 2-D grayscale image we can read."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise refusal(UNSUPPORTED, "float pixel data (a parametric map), not a radiograph")
        raise refusal(
            NO_PIXEL_DATA, "the file holds no pixel data (a report, structured document or other non-image object)"
        )
    frames = int_attr(ds, "NumberOfFrames", 1) or 1
    if frames > 1:
        raise refusal(MULTI_FRAME, f"the file holds {frames} frames; only single-frame 2-D radiographs can be scored")
    spp = int_attr(ds, "SamplesPerPixel", 1) or 1
    photometric = text_attr(ds, "PhotometricInterpretation").upper()
    if spp != 1 or photometric in _COLOUR_PHOTOMETRICS:
        raise refusal(
            COLOUR,
            f"colour image ({photometric or 'no photometric interpretation'}, {spp} samples per pixel); "
            "only grayscale MONOCHROME1/2 radiographs can be scored",
        )
    if not photometric:
        raise refusal(
            MISSING_ATTRIBUTE,
            "Photometric Interpretation (0028,0004) is missing: MONOCHROME1 (air bright) and MONOCHROME2 "
            "(air dark) cannot be told apart; fix the header at the source",
        )
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise refusal(UNSUPPORTED, f"photometric interpretation {photometric[:32]!r} is not MONOCHROME1/2")
    if allowed_modalities is not None:
        allowed = {m.upper() for m in allowed_modalities}
        modality = text_attr(ds, "Modality").upper()
        if modality not in allowed:
            raise refusal(
                MODALITY,
                f"modality {modality or '(missing)'} is not in the allowed list {sorted(allowed)} "
                "(change the allow-list to score it anyway)",
            )
    rows, cols = int_attr(ds, "Rows", 0) or 0, int_attr(ds, "Columns", 0) or 0
    if rows <= 0 or cols <= 0:
        raise refusal(UNREADABLE, f"invalid image size {rows}x{cols} in the header")
    if max_pixels is not None and rows * cols > max_pixels:
        raise refusal(
            TOO_LARGE,
            f"the image is {cols}x{rows} = {rows * cols / 1e6:.1f} MP, above the {max_pixels / 1e6:.1f} MP limit "
            "(raise max_pixels if this is a real radiograph)",
        )
    bits_alloc = int_attr(ds, "BitsAllocated", 0) or 0
    if bits_alloc not in (8, 16, 32):
        raise refusal(UNSUPPORTED, f"{bits_alloc}-bit allocated pixels; only 8, 16 or 32 bits are supported")
    bits_stored = int_attr(ds, "BitsStored", bits_alloc) or bits_alloc
    if not 1 <= bits_stored <= bits_alloc:
        raise refusal(UNREADABLE, f"BitsStored {bits_stored} does not fit BitsAllocated {bits_alloc}")
    high_bit = int_attr(ds, "HighBit", bits_stored - 1)
    if high_bit is None or not bits_stored - 1 <= high_bit < bits_alloc:
        raise refusal(
            UNREADABLE, f"High Bit {high_bit} does not fit Bits Stored {bits_stored} in Bits Allocated {bits_alloc}"
        )


def transfer_syntax(ds: Any) -> Any:
    """The file's Transfer Syntax UID (a pydicom ``UID``), or a refusal when it is not one.

    pydicom raises ValueError/AttributeError lazily for a UID that is not a transfer syntax or a
    multi-valued one; both are header damage (``unreadable``). PS3.5 Annex A lists the syntaxes.
    """
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID", None) if meta is not None else None
    if ts is None:
        return None
    if not isinstance(ts, str):
        raise refusal(UNREADABLE, f"the Transfer Syntax UID (0002,0010) has {len(ts)} values; it must have one")
    if not getattr(ts, "is_transfer_syntax", False):
        raise refusal(
            UNREADABLE,
            f"the Transfer Syntax UID {str(ts)[:64]!r} is not a transfer syntax (a damaged or hand-edited header)",
        )
    return ts


def lut_descriptor(item: Any, signed: bool, little_endian: bool = True) -> tuple[int, int, int]:
    """(number of entries, first value mapped, bits per entry) of a LUT sequence item.

    PS3.3 C.11.1.1.1 / C.11.2.1.1: the first and third values are always unsigned (0 entries
    means 65536); only the second follows the pixel representation. In Implicit VR the whole
    descriptor is read as SS for signed pixels, so 32768 entries arrive as -32768: read back here.
    """
    el = item.get("LUTDescriptor", None) if hasattr(item, "get") else None
    if el is None:
        raise refusal(UNREADABLE, "a LUT sequence item has no LUT Descriptor")
    value = item["LUTDescriptor"].value if hasattr(item, "__getitem__") else el
    if isinstance(value, (bytes, bytearray)):
        if len(value) < 6:
            raise refusal(UNREADABLE, f"a LUT Descriptor holds {len(value)} bytes, 6 are needed")
        fmt = ("<" if little_endian else ">") + ("HhH" if signed else "HHH")
        values = list(struct.unpack(fmt, bytes(value[:6])))
    else:
        try:
            values = [int(v) for v in value]
        except (TypeError, ValueError):
            raise refusal(UNREADABLE, "a LUT Descriptor is not three integers") from None
    if len(values) != 3:
        raise refusal(UNREADABLE, f"a LUT Descriptor has {len(values)} values, 3 are needed")
    entries, first, bits = values[0] & 0xFFFF, values[1], values[2] & 0xFFFF
    return entries or 65536, first, bits


def padding_range(ds: Any) -> tuple[int, int] | None:
    """Stored values that are padding, (low, high) inclusive, or None (PS3.3 C.7.5.1.1.2).

    Pixel Padding Value alone pads one value; with Pixel Padding Range Limit every stored value
    between the two (either order) is padding. Both are 'US or SS' like the pixels: a value
    written with the other sign convention is read back into the pixels' one.
    """
    value = int_attr(ds, "PixelPaddingValue")
    if value is None:
        return None
    limit = int_attr(ds, "PixelPaddingRangeLimit", value)
    limit = value if limit is None else limit
    bits_alloc = int_attr(ds, "BitsAllocated", 16) or 16
    signed = (int_attr(ds, "PixelRepresentation", 0) or 0) == 1
    if bits_alloc == 16:

        def fix(v: int) -> int:
            return (v - 65536 if v > 32767 else v) if signed else (v + 65536 if v < 0 else v)

        value, limit = fix(value), fix(limit)
    return min(value, limit), max(value, limit)


def scrub_phi(message: str, ds: Any) -> str:
    """``message`` with every value of the file's patient identifiers (:data:`PHI_KEYWORDS`) blanked."""
    for keyword in PHI_KEYWORDS:
        try:
            raw = ds.get(keyword, None)
            if raw is None:
                continue
            many = isinstance(raw, Sequence) and not isinstance(raw, (str, bytes))
            value = "\\".join(str(v) for v in raw) if many else str(raw)
        except Exception:  # a damaged identifier must not stop the scrub of the others
            continue
        for part in {value, *value.replace("^", "\\").split("\\")}:
            part = part.strip()
            if len(part) >= 3:
                message = message.replace(part, "<redacted>")
    return message
