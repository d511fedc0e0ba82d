"""Issue 10 items 1-2: inputs that once escaped the DICOM reader, kept as regression tests.

``tests/data/dicom-faults/`` holds copies of ``../shared/cases/dicom-faults/`` (files found by
mutation fuzzing; README there); ``tests/data/fuzz-escapes/dicom/`` holds every input `make fuzz`
ever found escaping (written there by tests/fuzz/). Each must give a refusal with the project's
own error type and, for the named ones, the reason code that names the cause.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from medxray.dicom import read_dicom
from medxray.errors import DicomError

DATA = Path(__file__).resolve().parent / "data"
FAULTS = DATA / "dicom-faults"
ESCAPES = DATA / "fuzz-escapes" / "dicom"
SHARED_FAULTS = Path(__file__).resolve().parents[1].parent / "shared" / "cases" / "dicom-faults"

EXPECTED = {
    "ts_not_a_transfer_syntax.dcm": ("unreadable", "is not a transfer syntax"),
    "ts_multivalued.dcm": ("unreadable", "has 2 values"),
    "group_length_vr_US.dcm": ("unreadable", "Group Length"),
    "group_length_vr_LO.dcm": ("unreadable", "Group Length"),
    "unknown_vr_fuzzed.dcm": ("unreadable", "Unknown Value Representation"),
    "rle_panic_CR.dcm": ("decode_failed", "PanicException: index out of bounds"),
}


def _read(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every oddity it tolerates
        return read_dicom(path, allowed_modalities=None)


def test_copies_are_complete_and_identical_to_shared():
    assert sorted(p.name for p in FAULTS.glob("*.dcm")) == sorted(EXPECTED)
    assert SHARED_FAULTS.is_dir(), f"{SHARED_FAULTS} is beside the clone in CI and here"
    for name in EXPECTED:
        assert (FAULTS / name).read_bytes() == (SHARED_FAULTS / name).read_bytes(), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fault_file_gives_its_reason_code(name):
    code, text = EXPECTED[name]
    with pytest.raises(DicomError) as e:
        _read(FAULTS / name)
    assert e.value.code == code, str(e.value)
    assert text in str(e.value)
    assert "\n" not in str(e.value)


def test_every_fuzz_escape_is_refused_or_read():
    paths = sorted(p for p in ESCAPES.glob("*") if p.name != "README.md")
    for path in paths:
        try:
            _read(path)
        except DicomError as exc:
            assert exc.code and str(exc).startswith(exc.code + ": "), path.name


class _FakePanic(BaseException):
    """Stands for pyo3_runtime.PanicException: a BaseException, not an Exception."""


def _rle_file(tmp_path):
    from dicom_corpus import make_dataset
    from pydicom.uid import RLELossless

    ds = make_dataset("panic")
    ds.compress(RLELossless)
    path = tmp_path / "rle.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_any_codec_base_exception_becomes_decode_failed(tmp_path, monkeypatch):
    import pydicom.dataset

    path = _rle_file(tmp_path)

    def panic(self):
        raise _FakePanic("thread panicked at src/lib.rs:1:1\nsecond line of the message")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(panic))
    with pytest.raises(DicomError) as e:
        read_dicom(path)
    assert e.value.code == "decode_failed"
    assert "_FakePanic: thread panicked at src/lib.rs:1:1 second line of the message" in str(e.value)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_interrupts_are_not_swallowed(tmp_path, monkeypatch, exc):
    import pydicom.dataset

    path = _rle_file(tmp_path)

    def interrupt(self):
        raise exc()

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(interrupt))
    with pytest.raises(exc):
        read_dicom(path)


def test_codec_message_is_phi_free(tmp_path, monkeypatch):
    import pydicom.dataset
    from dicom_corpus import PHI_ID, PHI_NAME

    path = _rle_file(tmp_path)

    def leak(self):
        raise RuntimeError(f"libjpeg -1038 while reading {PHI_NAME} / {PHI_ID}")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(leak))
    with pytest.raises(DicomError) as e:
        read_dicom(path)
    text = str(e.value)
    assert "libjpeg -1038" in text and PHI_ID not in text and "Zzyzxphi" not in text


def test_codec_message_is_the_same_in_every_run(tmp_path, monkeypatch):
    import pydicom.dataset

    path = _rle_file(tmp_path)
    texts = set()
    for _ in range(2):

        def fail(self, obj=object()):  # noqa: B008  a new object (address) per run, on purpose
            raise OSError(f"cannot identify image file {obj!r}")

        monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(fail))
        with pytest.raises(DicomError) as e:
            read_dicom(path)
        texts.add(str(e.value))
    assert len(texts) == 1 and " at 0x" not in texts.pop()


def test_codestream_bomb_is_refused_before_decoding(monkeypatch):
    """make fuzz found it: a 512x512 header over a JPEG 2000 codestream declaring 2818560x512 (the
    decoder asked for > 4 GB). The size is read from the SIZ marker and the frame never decoded."""
    import pydicom.dataset

    def never(self):
        raise AssertionError("decoded a codestream larger than the header")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(never))
    with pytest.raises(DicomError) as e:
        _read(ESCAPES / "oom-d2e1dfc3b7267e21181e36438e78b3f42dfd888e.bin")
    assert e.value.code == "decode_failed" and "declares 2818560x512x1 samples" in str(e.value)


def test_codestream_sizes_of_real_files():
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.encaps import generate_frames

    from medxray.dicom.codestream import declared_size

    for name, size in {
        "JPEG2000.dcm": (256, 1024, 1),
        "JPEG-LL.dcm": (256, 1024, 1),
        "JPEGLSNearLossless_16.dcm": (10, 50, 1),
        "SC_rgb_jpeg_dcmtk.dcm": (100, 100, 3),
        "RG1_J2KR.dcm": (1841, 1955, 1),
    }.items():
        ds = pydicom.dcmread(get_testdata_file(name))
        assert declared_size(next(generate_frames(ds.PixelData, number_of_frames=1))) == size, name
    assert declared_size(b"not a codestream") is None
