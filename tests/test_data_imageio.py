"""The one image decoder (medxray.data.imageio): its edges, the same for training and the app's upload."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import nih_sample_pngs
from PIL import Image

from medxray.data.imageio import MIN_IMAGE_SIDE, decode_image, read_image, to_float01
from medxray.errors import DataError
from medxray.review.study import load_study_bytes


def _encode(arr: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _both(tmp_path: Path, data: bytes, suffix: str):
    """(read_image result, decode_image-from-bytes result) for the same file content."""
    p = tmp_path / f"img{suffix}"
    p.write_bytes(data)
    return read_image(p), decode_image(data, name=p.name)


def _ramp(h: int = 48, w: int = 40, top: int = 255) -> np.ndarray:
    return (np.linspace(0, top, h * w).reshape(h, w)).round()


def test_real_nih_png_gives_the_same_pixels_to_training_and_to_the_app():
    paths = nih_sample_pngs()
    for path in paths[:3]:
        arr, hw = read_image(path)
        assert arr.dtype == np.uint8 and hw == (1024, 1024)
        study = load_study_bytes(path.read_bytes(), path.name)
        np.testing.assert_array_equal(study.pixels, to_float01(arr))
        assert study.pixels.dtype == np.float32 and 0.0 <= float(study.pixels.min()) < float(study.pixels.max()) <= 1.0


def test_16_bit_png_is_kept_and_scaled_by_its_type_range(tmp_path):
    arr16 = (_ramp(top=4095) * 16).astype(np.uint16)  # a 12-bit detector stored in 16 bits
    (arr, hw), dec = _both(tmp_path, _encode(arr16, "PNG"), ".png")
    assert arr.dtype == np.uint16 and np.array_equal(arr, arr16) and np.array_equal(dec.pixels, arr16)
    study = load_study_bytes(_encode(arr16, "PNG"), "x16.png")
    np.testing.assert_allclose(study.pixels, arr16 / 65535.0, atol=1e-7)  # not stretched to max = 1


def test_32_bit_integer_in_16_bit_range_is_treated_as_16_bit(tmp_path):
    a = (_ramp(top=60000)).astype(np.int32)
    data = _encode(a, "TIFF")
    (arr, _), dec = _both(tmp_path, data, ".tif")
    assert arr.dtype == np.uint16 and np.array_equal(arr, a) and np.array_equal(dec.pixels, a)
    np.testing.assert_allclose(dec.as_float01(), a / 65535.0, atol=1e-7)


def test_32_bit_integer_outside_16_bit_range_is_refused_by_both(tmp_path):
    a = (_ramp(top=70000)).astype(np.int32)
    data = _encode(a, "TIFF")
    p = tmp_path / "wide.tif"
    p.write_bytes(data)
    for call in (lambda: read_image(p), lambda: decode_image(data, name="wide.tif")):
        with pytest.raises(DataError, match="outside 0..65535"):
            call()
    neg = _encode(_ramp().astype(np.int32) - 10, "TIFF")
    with pytest.raises(DataError, match="outside 0..65535"):
        decode_image(neg)


def test_float_image_is_refused_by_both(tmp_path):
    data = _encode(np.full((64, 64), 0.5, np.float32), "TIFF", mode="F")
    p = tmp_path / "float.tif"
    p.write_bytes(data)
    for call in (lambda: read_image(p), lambda: decode_image(data, name="float.tif")):
        with pytest.raises(DataError, match="floating-point"):
            call()
    # The app never hands a TIFF to the decoder: its upload accepts DICOM, PNG and JPEG only.
    with pytest.raises(DataError, match="not a DICOM, PNG or JPEG"):
        load_study_bytes(data, "float.tif")


def test_colour_is_collapsed_to_gray_and_flagged_only_when_channels_differ(tmp_path):
    g = _ramp().astype(np.uint8)
    (gray_arr, _), gray_dec = _both(tmp_path, _encode(np.stack([g] * 3, -1), "PNG"), ".png")
    assert gray_arr.dtype == np.uint8 and np.array_equal(gray_arr, g) and not gray_dec.colour
    colour = np.stack([g, g // 2, 255 - g], -1)
    (arr, _), dec = _both(tmp_path, _encode(colour, "PNG"), ".png")
    assert arr.ndim == 2 and dec.colour and np.array_equal(arr, dec.pixels)
    assert any("colour" in w for w in load_study_bytes(_encode(colour, "PNG"), "c.png").warnings)


def test_exif_orientation_is_applied_only_when_asked():
    g = np.zeros((40, 64), np.uint8)
    g[:, :8] = 255  # bright left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(g, "JPEG", exif=exif, quality=95)
    assert decode_image(data).shape == (40, 64)  # training reads the file as stored
    rotated = decode_image(data, exif_transpose=True)
    assert rotated.shape == (64, 40) and rotated.pixels[:8].mean() > 200  # left edge now on top
    assert load_study_bytes(data, "phone.jpg").shape == (64, 40)  # the app applies it


def test_too_small_too_large_and_broken_files_are_refused_by_both(tmp_path):
    tiny = _encode(np.zeros((MIN_IMAGE_SIDE - 1, 64), np.uint8), "PNG")
    p = tmp_path / "tiny.png"
    p.write_bytes(tiny)
    with pytest.raises(DataError, match="at least 32x32"):
        read_image(p)
    with pytest.raises(DataError, match="at least 32x32"):
        load_study_bytes(tiny, "tiny.png")
    big = _encode(np.zeros((64, 64), np.uint8), "PNG")
    with pytest.raises(DataError, match="megapixels"):
        decode_image(big, max_pixels=64 * 64 - 1)
    good = _encode(_ramp().astype(np.uint8), "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="cut.png cannot be decoded: unreadable or truncated"):
        read_image(cut)
    with pytest.raises(DataError, match="cut.png cannot be decoded"):
        load_study_bytes(cut.read_bytes(), "cut.png")
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "absent.png")
