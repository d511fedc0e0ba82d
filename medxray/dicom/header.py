"""What the DICOM header says, read defensively: attribute readers, safe metadata, checks.

* :func:`int_attr`, :func:`first_float`, :func:`text_attr`: one attribute of a pydicom data set,
  tolerant of multi-valued, empty and malformed values;
* :func:`safe_meta`: the allow-list of non-identifying attributes that may leave the reader
  (patient names, IDs and birth dates never do);
* :func:`is_lateral_view`: view position, view code or (failing both) descriptions;
* :func:`check_image`: everything refused before any pixel is decoded (no pixel data, frames,
  colour, modality, size, bit depth), DICOM PS3.3 C.7.6.3 Image Pixel Module.

Must not import the reader, the VOI code or anything outside :mod:`medxray.dicom.codes`
(pydicom data sets are duck-typed here; pydicom itself is not imported).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from medxray.dicom.codes import COLOUR, MODALITY, MULTI_FRAME, NO_PIXEL_DATA, TOO_LARGE, UNREADABLE, UNSUPPORTED, refusal

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
    }


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
        raise refusal(NO_PIXEL_DATA,
                      "the file holds no pixel data (a report, structured document or other non-image object)")
    frames = int_attr(ds, "NumberOfFrames", 1) or 1
    if frames > 1:
        raise refusal(MULTI_FRAME, f"the file holds {frames} frames; only single-frame 2-D radiographs can be scored")
    spp = int_attr(ds, "SamplesPerPixel", 1) or 1
    photometric = text_attr(ds, "PhotometricInterpretation").upper()
    if spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise refusal(
            COLOUR,
            f"colour image ({photometric or 'no photometric interpretation'}, {spp} samples per pixel); "
            "only grayscale MONOCHROME1/2 radiographs can be scored",
        )
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
