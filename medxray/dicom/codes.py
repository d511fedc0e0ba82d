"""Refusal codes and warning texts of the DICOM reader, and the one way to raise a refusal.

Holds the machine-readable codes a :class:`~medxray.errors.DicomError` carries in ``.code``
(the scorer writes them at the start of a row's ``reason``, so a results CSV is greppable),
:func:`refusal` that builds such an error, :data:`REASON_CODES` (each code with what it means,
the README's table), and the warning texts a decoded image may carry: the reader puts them in
``DicomImage.warnings``, the scorer joins them into the ``warnings`` column of ``results.csv``,
and the review app shows the same strings (one definition, DESIGN convention 11).

Must not import anything from medxray but :mod:`medxray.errors` (every other DICOM module
imports this one).
"""

from __future__ import annotations

import re

from medxray.errors import DicomError

NOT_DICOM = "not_dicom"
UNREADABLE = "unreadable"
TRUNCATED = "truncated"
NO_PIXEL_DATA = "no_pixel_data"
SHORT_PIXEL_DATA = "short_pixel_data"
MULTI_FRAME = "multi_frame"
COLOUR = "colour"
MISSING_ATTRIBUTE = "missing_attribute"
MODALITY = "modality"
TOO_LARGE = "too_large"
UNSUPPORTED = "unsupported"
DECODE_FAILED = "decode_failed"
BIT_DEPTH_MISMATCH = "bit_depth_mismatch"
FLAT_IMAGE = "flat_image"

#: Every refusal code with what it means (the README's table is this one).
REASON_CODES: dict[str, str] = {
    NOT_DICOM: "not a DICOM file (no DICM marker, no data set at the start), or empty",
    UNREADABLE: "DICOM, but the header is damaged (a value of the wrong type, an unknown VR, "
    "a Transfer Syntax UID that is not one, an image size or bit depth that cannot be)",
    TRUNCATED: "the file ends before its data set does (cut short in transfer)",
    NO_PIXEL_DATA: "no image in the file (a report, structured document, presentation state)",
    SHORT_PIXEL_DATA: "the pixel data holds fewer bytes than rows x columns x bits allocated",
    MULTI_FRAME: "more than one frame (a cine, tomosynthesis or multi-frame object)",
    COLOUR: "a colour image (RGB, YBR, PALETTE COLOR or more than one sample per pixel)",
    MISSING_ATTRIBUTE: "a required attribute is absent (e.g. Photometric Interpretation: MONOCHROME1 "
    "and MONOCHROME2 cannot be told apart)",
    MODALITY: "the modality is not in the allow-list (CR, DX by default)",
    TOO_LARGE: "above the pixel or file-size limit (checked before decoding), or a deflated data set that "
    "inflates past its header's image size + 8 MiB of other elements (a decompression bomb)",
    UNSUPPORTED: "a valid image the reader does not handle (bits allocated not 8/16/32, float pixels, "
    "an unknown photometric interpretation, a LUT with an unusable bit depth)",
    DECODE_FAILED: "the codec could not decode the compressed pixel data; the reason keeps its message",
    BIT_DEPTH_MISMATCH: "the stored values are not where Bits Stored / High Bit say and the evidence "
    "does not tell which is right",
    FLAT_IMAGE: "after the LUTs and window the image has fewer than a handful of grey levels "
    "(blank, or a window that hides it)",
}

LATERAL_WARNING = (
    "lateral view: the model was trained on frontal (PA/AP) chest radiographs, predictions on a "
    "lateral view are unreliable"
)


def window_undefined_warning(center: float, width: float, func: str, why: str) -> str:
    """The file's window is one the standard does not define: the automatic window was used."""
    return (
        f"window not used: the file's window (center {center:g}, width {width:g}, {func}) is not defined by "
        f"DICOM PS3.3 C.11.2.1.2 ({why}); the automatic window was used instead"
    )


def bit_depth_warning(bits_stored: int, used_bits: int, evidence: str) -> str:
    """The stored values extend past Bits Stored; the values were used as decoded."""
    return (
        f"bit depth: the header says Bits Stored {bits_stored} but the pixel values need {used_bits} bits "
        f"({evidence}); the decoded values were used, check the image"
    )


def high_bit_warning(high_bit: int, bits_stored: int) -> str:
    """High Bit places the stored bits higher than the values sit; the low bits were used."""
    return (
        f"bit position: High Bit {high_bit} places the {bits_stored} stored bits above bit 0 but the values sit "
        "in the low bits; the low bits were used, check the image"
    )


def voi_lut_ignored_warning(why: str) -> str:
    """The VOI LUT Sequence could not be applied; a window was used instead."""
    return f"VOI LUT not used: {why}; the file's window or the automatic window was used instead"


# -- the scorer's policy gate (medxray.scoring.gate): files read fine but not scored, or scored with a caveat

NOT_CHEST = "not_chest"
OUT_OF_DISTRIBUTION = "out_of_distribution"

#: Codes of rows with status ``skipped``: the file was readable, the scorer's policy kept it from being
#: scored (README "Not a frontal chest radiograph").
SKIP_CODES: dict[str, str] = {
    NOT_CHEST: "Body Part Examined (or, without it, the Anatomic Region Sequence) names a body part that is "
    "not in --accept-body-parts (CHEST by default)",
    OUT_OF_DISTRIBUTION: "--ood-policy skip: the model's own features place the image outside its training "
    "images (Mahalanobis distance over the threshold chosen on validation data)",
}

BODY_PART_MISSING_WARNING = (
    "body part not stated: the file names no Body Part Examined or anatomic region, scored as a chest "
    "radiograph (check it is one)"
)


def not_chest_reason(part: str, accepted: "list[str] | tuple[str, ...]", source: str = "Body Part Examined") -> str:
    """The reason of a ``not_chest`` row (without the code); ``source`` names the attribute read."""
    return (
        f"body part {part[:32]} ({source}) is not in the accepted list {list(accepted)}; the model reads "
        "chest radiographs only (--accept-body-parts adds parts, 'any' turns the check off)"
    )


def not_frontal_warning(view: str, what: str) -> str:
    """A View Position that is neither frontal (PA/AP) nor lateral: oblique or decubitus."""
    return (
        f"not a frontal view: View Position {view[:16]} ({what}), the model was trained on frontal (PA/AP) "
        "chest radiographs and its predictions are unreliable"
    )


def out_of_distribution_warning(distance: float, threshold: float) -> str:
    """The content check (medxray.ood) puts the image over the threshold chosen on validation data."""
    return (
        f"out of distribution: this image is unlike the model's training images (feature distance "
        f"{distance:.1f} > threshold {threshold:.1f}), it may not be a frontal chest radiograph: "
        "check the image before trusting the scores"
    )


#: Every warning text (constants and the stems of the formatted ones): the app and the worklist
#: filter on these prefixes.
WARNING_PREFIXES: tuple[str, ...] = (
    "lateral view",
    "window not used",
    "bit depth",
    "bit position",
    "VOI LUT not used",
    "body part not stated",
    "not a frontal view",
    "out of distribution",
)

_WS = re.compile(r"\s+")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def one_line(message: str, limit: int = 300) -> str:
    """A (codec) message on one line: whitespace collapsed, object addresses dropped (the same file
    must give the same reason in every run), cut at ``limit`` characters."""
    text = _WS.sub(" ", _ADDRESS.sub("", str(message))).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def refusal(code: str, message: str) -> DicomError:
    """A :class:`DicomError` carrying a machine-readable ``code`` and a ``code: message`` text."""
    err = DicomError(f"{code}: {message}")
    err.code = code  # type: ignore[attr-defined]
    return err
