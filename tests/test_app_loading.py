"""Opening a study without Streamlit: uploads and scored files as PNG, JPEG or DICOM, and every refusal."""

from __future__ import annotations

import app_helpers
import numpy as np
import pytest
from app_images import chest_like, jpeg_of, png_of

from medxray.errors import DataError, MedxrayError
from medxray.review.study import (
    distribution_warnings,
    load_study_bytes,
    load_study_file,
    safe_metadata_table,
    sniff_kind,
)


@pytest.fixture(scope="module")
def rg1_bytes() -> bytes:
    return app_helpers.rg1_bytes()  # pydicom-data's RG1_UNCI.dcm, a real MONOCHROME1 chest CR


def test_png_8bit_and_16bit_scale_by_bit_depth():
    arr8 = chest_like()
    s8 = load_study_bytes(png_of(arr8), "x.png")
    assert s8.kind == "png" and s8.pixels.dtype == np.float32 and s8.shape == arr8.shape
    np.testing.assert_allclose(s8.pixels, arr8 / 255.0, atol=1e-6)
    assert s8.key.kind == "sha256" and s8.key.value == s8.sha256 and not s8.warnings
    arr16 = arr8.astype(np.uint16) * 257
    s16 = load_study_bytes(png_of(arr16), "x16.png")
    np.testing.assert_allclose(s16.pixels, arr16 / 65535.0, atol=1e-6)


def test_jpeg_and_colour_images_become_grayscale_with_a_warning():
    g = chest_like()
    sj = load_study_bytes(jpeg_of(g), "x.jpg")
    assert sj.kind == "jpeg" and sj.pixels.ndim == 2
    assert np.abs(sj.pixels - g / 255.0).mean() < 0.02
    rgb = np.stack([g, g // 2, 255 - g], axis=-1)
    sc = load_study_bytes(png_of(rgb), "colour.png")
    assert sc.pixels.ndim == 2 and any("colour" in w for w in sc.warnings)


@pytest.mark.parametrize(
    "data, name, match",
    [
        (b"hello, not an image" * 10, "notes.txt", "not a DICOM, PNG or JPEG"),
        (b"", "empty.png", "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "broken.png", "cannot be decoded"),
        (b"\xff\xd8\xff\xe0" + b"\x13" * 40, "broken.jpg", "cannot be decoded"),
    ],
)
def test_bad_uploads_raise_one_clear_error(data, name, match):
    with pytest.raises(DataError, match=match):
        load_study_bytes(data, name)


def test_oversized_upload_is_refused_before_decoding():
    data = png_of(chest_like())
    with pytest.raises(DataError, match="upload limit"):
        load_study_bytes(data, "big.png", max_bytes=len(data) - 1)


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr("medxray.review.study.MAX_PIXELS", 1000)
    with pytest.raises(DataError, match="megapixels"):
        load_study_bytes(png_of(chest_like(50, 40)), "bomb.png")


def test_load_study_file_missing_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no longer exists"):
        load_study_file(tmp_path / "gone.dcm")


def test_sniffing_uses_content_not_extension():
    assert sniff_kind(b"\x00" * 128 + b"DICM" + b"\x00" * 10, "noext") == "dicom"
    assert sniff_kind(png_of(chest_like(8, 8)), "looks.dcm") == "png"
    assert sniff_kind(b"random", "scan.DCM") == "dicom"  # preamble-less DICOM: read_dicom decides
    assert sniff_kind(b"random", "scan.bin") is None


def test_real_dicom_is_keyed_by_uid_and_shows_no_phi(rg1_bytes):
    s = load_study_bytes(rg1_bytes, "RG1_UNCI.dcm")
    assert s.kind == "dicom" and s.shape == (1955, 1841) and s.pixels.dtype == np.float32
    assert s.key.kind == "study_series_sop" and s.key.value.startswith("1.3.6.1.4.1.5962")
    assert s.key.value.endswith("/" + s.meta["sop_instance_uid"])
    assert s.window is not None and s.raw is not None and s.raw.shape == s.shape
    table = safe_metadata_table(s)
    text = table.to_string()
    assert "CompressedSamples" not in text and "RG1" not in text  # the patient name of the test file
    assert dict(zip(table["field"], table["value"]))["modality"] == "CR"
    assert distribution_warnings(s, image_size=224) == []  # an adult PA chest CR: nothing to warn about


def test_broken_dicom_is_a_clear_dicom_error(rg1_bytes):
    from medxray.errors import DicomError

    with pytest.raises(DicomError):
        load_study_bytes(rg1_bytes[: len(rg1_bytes) // 2], "cut.dcm")
    with pytest.raises(MedxrayError):
        load_study_bytes(b"\x00" * 128 + b"DICM" + b"garbage" * 20, "junk.dcm")
