"""File-level DICOM: reading radiographs and writing result objects (no networking here).

* :mod:`medxray.dicom.codes`: refusal codes (``DicomError.code``), :func:`refusal`, the lateral warning;
* :mod:`medxray.dicom.header`: attribute readers, the safe-metadata allow-list, checks before decoding;
* :mod:`medxray.dicom.voi`: modality LUT, VOI LUT / window, automatic window, :func:`rewindow`;
* :mod:`medxray.dicom.source`: sniffing, size-limited loading, parsing, the truncation check;
* :mod:`medxray.dicom.inflate`: Deflated Explicit VR Little Endian bodies inflated under a ceiling;
* :mod:`medxray.dicom.bits`: where the stored bits are (Bits Stored / High Bit against the values);
* :mod:`medxray.dicom.reader`: decoding, :func:`read_dicom` -> :class:`DicomImage`;
* :mod:`medxray.dicom.sr`: :func:`write_sr` (Comprehensive SR of the AI findings).

This package must not import the scorer, inference, the app or a network node; those import it.
"""

from medxray.dicom.codes import LATERAL_WARNING, REASON_CODES, refusal
from medxray.dicom.reader import (
    DEFAULT_ALLOWED_MODALITIES,
    DEFAULT_MAX_PIXELS,
    DicomImage,
    DicomSource,
    is_dicom_file,
    read_dicom,
    sniff_dicom,
)
from medxray.dicom.sr import NOT_FOR_CLINICAL_USE, write_sr
from medxray.dicom.voi import rewindow

__all__ = [
    "DEFAULT_ALLOWED_MODALITIES",
    "DEFAULT_MAX_PIXELS",
    "LATERAL_WARNING",
    "NOT_FOR_CLINICAL_USE",
    "REASON_CODES",
    "DicomImage",
    "DicomSource",
    "is_dicom_file",
    "read_dicom",
    "refusal",
    "rewindow",
    "sniff_dicom",
    "write_sr",
]
