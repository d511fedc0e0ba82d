"""Refusal codes of the DICOM reader and the one way to raise them.

Holds the machine-readable codes a :class:`~medxray.errors.DicomError` carries in ``.code``
(the scorer writes them at the start of a row's ``reason``, so a results CSV is greppable),
:func:`refusal` that builds such an error, and the warning text for lateral views.

Must not import anything from medxray but :mod:`medxray.errors` (every other DICOM module
imports this one).
"""

from __future__ import annotations

from medxray.errors import DicomError

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


def refusal(code: str, message: str) -> DicomError:
    """A :class:`DicomError` carrying a machine-readable ``code`` and a ``code: message`` text."""
    err = DicomError(f"{code}: {message}")
    err.code = code  # type: ignore[attr-defined]
    return err
