"""Small variants of pydicom-data's RG1 chest CR (fake identity), for the standard-conformance tests.

``rg1_dataset()`` is the real RG1_UNCR radiograph (MONOCHROME1, 15 bits stored, window
15000/30000) downsampled 4x (489x461) so each generated file is small and fast, with the patient
module replaced by the fake PHI of :mod:`dicom_corpus`. Tests edit a copy and save it with
:func:`save`.
"""

from __future__ import annotations

import copy
import io
from functools import lru_cache

import numpy as np
from dicom_corpus import PHI_BIRTH, PHI_ID, PHI_NAME


@lru_cache(maxsize=1)
def _base():
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    arr = np.ascontiguousarray(ds.pixel_array[::4, ::4])
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.astype("<u2").tobytes()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI_NAME, PHI_ID, PHI_BIRTH
    return ds


def rg1_dataset():
    """A fresh copy of the downsampled RG1 data set (uint16 pixels 874..26479, 15 bits stored)."""
    return copy.deepcopy(_base())


def rg1_pixels() -> np.ndarray:
    """The downsampled RG1 stored values (uint16, 489x461)."""
    return np.frombuffer(_base().PixelData, dtype="<u2").reshape(_base().Rows, _base().Columns).copy()


def set_pixels(
    ds, arr: np.ndarray, *, bits_stored: int | None = None, high_bit: int | None = None, signed: bool = False
) -> None:
    arr = np.asarray(arr)
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = arr.astype("<i2" if signed else "<u2").tobytes()
    if bits_stored is not None:
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1 if high_bit is None else high_bit


def save(ds, path, *, implicit: bool = False):
    from pydicom.uid import ImplicitVRLittleEndian

    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def window_reference(values: np.ndarray, center: float, width: float, func: str, monochrome1: bool) -> np.ndarray:
    """PS3.3 C.11.2.1.2/3 computed by pydicom's ``apply_windowing`` on a unit-range data set, to [0, 1]."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    unit = Dataset()
    unit.PhotometricInterpretation = "MONOCHROME2"
    unit.BitsStored, unit.PixelRepresentation = 1, 0  # output range [0, 1]
    unit.WindowCenter, unit.WindowWidth, unit.VOILUTFunction = center, width, func
    out = apply_windowing(np.asarray(values, dtype=np.float64), unit)
    return 1.0 - out if monochrome1 else out
