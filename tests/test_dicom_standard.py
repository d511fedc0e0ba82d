"""Issue 16 items 1-5: each kind of fault, on small files generated from pydicom-data's RG1 chest CR.

Every value asserted is either a refusal code or pixels compared with a reference computed to the
standard (PS3.3 C.11 via pydicom's functions where they are right, or the formula written out).
The "Also" part: where the reader keeps its own code instead of pydicom's LUT functions, a test
here shows pydicom's function failing on the case (marked GAP).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from dicom_corpus import PHI_STRINGS
from dicom_rg1 import rg1_dataset, rg1_pixels, save, set_pixels, to_bytes, window_reference

from medxray.dicom import read_dicom
from medxray.dicom.voi import apply_window, auto_window
from medxray.errors import DicomError

pydicom = pytest.importorskip("pydicom")

RG1_WINDOW = (15000.0, 30000.0)


@pytest.fixture(scope="module")
def reference():
    """The downsampled RG1 read as it is (the right picture every variant must reproduce)."""
    return read_dicom(to_bytes(rg1_dataset()))


def _read(data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_dicom(data, **kw)


def _refusal(data, **kw) -> DicomError:
    with pytest.raises(DicomError) as e:
        _read(data, **kw)
    return e.value


def test_reference_is_the_standard_window(reference):
    ref = window_reference(rg1_pixels(), *RG1_WINDOW, "LINEAR", monochrome1=True)
    np.testing.assert_allclose(reference.pixels, ref, atol=1e-5)
    assert reference.warnings == []


# ---- 1. header vs codestream bit depth -----------------------------------------------------------


def test_j2k_codestream_wider_than_bits_stored_gives_the_right_picture(reference, tmp_path):
    from pydicom.uid import JPEG2000Lossless

    ds = rg1_dataset()
    ds.BitsStored, ds.HighBit = 16, 15
    ds.compress(JPEG2000Lossless)  # the codestream holds 16-bit samples
    ds.BitsStored, ds.HighBit = 12, 11  # ... while the header says 12
    img = _read(save(ds, tmp_path / "j2k16_bs12.dcm"))
    np.testing.assert_array_equal(img.pixels, reference.pixels)  # not masked to 12 bits: no bands
    assert any(w.startswith("bit depth: the header says Bits Stored 12") for w in img.warnings)


def test_native_values_wider_than_bits_stored_give_the_right_picture(reference):
    ds = rg1_dataset()
    ds.BitsStored, ds.HighBit = 12, 11  # RG1's values need 15 bits
    img = _read(to_bytes(ds))
    np.testing.assert_array_equal(img.pixels, reference.pixels)
    assert any("need 15 bits" in w for w in img.warnings)


def test_stored_bits_at_high_bit_are_shifted_down():
    twelve = rg1_pixels() >> 3  # 12-bit values
    plain = rg1_dataset()
    set_pixels(plain, twelve, bits_stored=12)
    plain.WindowCenter, plain.WindowWidth = 15000 / 8, 30000 / 8
    shifted = rg1_dataset()
    set_pixels(shifted, twelve << 4, bits_stored=12, high_bit=15)  # bits 4-15, PS3.5 8.1.1
    shifted.WindowCenter, shifted.WindowWidth = 15000 / 8, 30000 / 8
    a, b = _read(to_bytes(plain)), _read(to_bytes(shifted))
    np.testing.assert_array_equal(b.pixels, a.pixels)
    np.testing.assert_array_equal(b.raw, twelve)


def test_high_bit_wrong_but_values_low_is_read_low_with_warning():
    twelve = rg1_pixels() >> 3
    ds = rg1_dataset()
    set_pixels(ds, twelve, bits_stored=12, high_bit=15)  # says bits 4-15, values sit in 0-11
    img = _read(to_bytes(ds))
    np.testing.assert_array_equal(img.raw, twelve)
    assert any(w.startswith("bit position: High Bit 15") for w in img.warnings)


def test_overlay_plane_above_bits_stored_is_masked():
    twelve = rg1_pixels() >> 3
    overlay = np.zeros_like(twelve)
    overlay[40:60, 30:200] = 1 << 15  # a burnt-in annotation plane in the unused high bit
    plain, over = rg1_dataset(), rg1_dataset()
    set_pixels(plain, twelve, bits_stored=12)
    set_pixels(over, twelve | overlay, bits_stored=12)
    for ds in (plain, over):
        ds.WindowCenter, ds.WindowWidth = 1875, 3750
    np.testing.assert_array_equal(_read(to_bytes(over)).pixels, _read(to_bytes(plain)).pixels)


def test_ambiguous_extra_bits_are_refused_naming_the_mismatch():
    rng = np.random.default_rng(0)
    ds = rg1_dataset()
    set_pixels(ds, rng.integers(0, 65536, rg1_pixels().shape), bits_stored=12)  # noise in all 16 bits
    err = _refusal(to_bytes(ds))
    assert err.code == "bit_depth_mismatch" and "Bits Stored says 12" in str(err)


# ---- 2. window functions at their edges -----------------------------------------------------------


def _tiny_slope(func: str | None, center=0.15, width=0.3):
    ds = rg1_dataset()
    ds.RescaleSlope, ds.RescaleIntercept = "1e-05", "0"  # modality values 0.0087..0.26
    ds.WindowCenter, ds.WindowWidth = center, width
    if func:
        ds.VOILUTFunction = func
    return ds


def test_linear_exact_tiny_window_is_applied_to_the_standard():
    img = _read(to_bytes(_tiny_slope("LINEAR_EXACT")))
    ref = window_reference(rg1_pixels() * 1e-5, 0.15, 0.3, "LINEAR_EXACT", monochrome1=True)
    np.testing.assert_allclose(img.pixels, ref, atol=1e-5)
    assert img.meta["window_source"] == "file"


@pytest.mark.parametrize(
    "func,center,width,why",
    [
        (None, 0.15, 0.3, "LINEAR needs a width of at least 1"),  # PS3.3 C.11.2.1.2.1: LINEAR is w >= 1
        ("LINEAR_EXACT", 0.15, 0.0, "LINEAR_EXACT needs a width above 0"),
        ("SIGMOID", 0.15, -2.0, "SIGMOID needs a width above 0"),
        ("LOG", 0.15, 0.3, "unknown VOI LUT Function 'LOG'"),
    ],
)
def test_undefined_window_takes_the_automatic_window(func, center, width, why):
    ds = _tiny_slope(func, center, width)
    img = _read(to_bytes(ds))
    del ds.WindowCenter, ds.WindowWidth
    auto = _read(to_bytes(ds))
    np.testing.assert_array_equal(img.pixels, auto.pixels)  # not all black: the automatic window
    assert img.meta["window_source"] == "percentile"
    assert any(w.startswith("window not used") and why in w for w in img.warnings)
    lo, hi = np.percentile(rg1_pixels() * 1e-5, [0.5, 99.5])
    np.testing.assert_allclose(img.window, ((lo + hi) / 2, hi - lo), rtol=1e-4)


def test_gap_pydicom_apply_windowing_raises_on_linear_below_width_1():
    from pydicom.pixels import apply_windowing

    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(to_bytes(_tiny_slope(None))))
    with pytest.raises(ValueError):
        apply_windowing(ds.pixel_array, ds)


@pytest.mark.parametrize("func", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("center,width", [(15000.0, 30000.0), (9000.5, 1.0), (12000.0, 2.0), (20000.0, 777.7)])
def test_our_window_equals_pydicom_apply_windowing(func, center, width):
    raw = rg1_pixels().astype(np.float32)
    ours = apply_window(raw, center, width, func)
    np.testing.assert_allclose(ours, window_reference(raw, center, width, func, monochrome1=False), atol=2e-6)


@pytest.mark.parametrize("make", ["constant", "binary", "hidden_by_window"])
def test_flat_images_are_never_ok(make):
    ds = rg1_dataset()
    px = rg1_pixels()
    if make == "constant":
        set_pixels(ds, np.full_like(px, 5000))
        del ds.WindowCenter, ds.WindowWidth
    elif make == "binary":
        set_pixels(ds, np.where(px > 12000, 20000, 3000))
        del ds.WindowCenter, ds.WindowWidth
    else:
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 60000, 10, "LINEAR_EXACT"  # above every value
    err = _refusal(to_bytes(ds))
    assert err.code == "flat_image" and "grey level" in str(err)


# ---- 3. Pixel Padding Value / Range Limit --------------------------------------------------------


def _padded(border_values, **tags):
    ds = rg1_dataset()
    px = rg1_pixels()
    pad = np.zeros(px.shape, dtype=bool)
    pad[:40], pad[-40:], pad[:, :35], pad[:, -35:] = True, True, True, True  # a collimation border
    px = px.copy()
    px[pad] = border_values(pad.sum())
    set_pixels(ds, px)
    del ds.WindowCenter, ds.WindowWidth
    for k, v in tags.items():
        ds.add_new({"PixelPaddingValue": 0x00280120, "PixelPaddingRangeLimit": 0x00280121}[k], "US", v)
    return ds, px, pad


@pytest.mark.parametrize("kind", ["value", "range"])
def test_padding_is_excluded_from_the_automatic_window_and_shown_black(kind):
    rng = np.random.default_rng(1)
    if kind == "value":
        ds, px, pad = _padded(lambda n: 32767, PixelPaddingValue=32767)
    else:
        ds, px, pad = _padded(
            lambda n: rng.integers(30000, 32768, n), PixelPaddingValue=32767, PixelPaddingRangeLimit=30000
        )
    img = _read(to_bytes(ds))
    lo, hi = np.percentile(px[~pad].astype(np.float64), [0.5, 99.5])
    np.testing.assert_allclose(img.window, ((lo + hi) / 2, hi - lo), rtol=1e-6)
    assert (img.pixels[pad] == 0).all()
    ref = window_reference(px, (lo + hi) / 2, hi - lo, "LINEAR_EXACT", monochrome1=True)
    np.testing.assert_allclose(img.pixels[~pad], ref[~pad], atol=1e-5)
    # Without the padding tags the border stretches the window and the lungs lose contrast.
    for k in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
        if k in ds:
            delattr(ds, k)
    stretched = _read(to_bytes(ds))
    assert stretched.window[1] > img.window[1] * 1.1

    def contrast(p):
        h, w = p.shape
        return p[h // 4 : h // 2, w // 2 - 10 : w // 2 + 10].mean() - p[h // 4 : h // 2, w // 5 : w // 3].mean()

    assert contrast(img.pixels) > contrast(stretched.pixels) + 0.03


def test_padding_value_written_unsigned_for_signed_pixels():
    ds, px, pad = _padded(lambda n: 32767)
    set_pixels(ds, px.astype(np.int32) - 16384, signed=True)  # padding becomes 16383 ... as stored
    ds.BitsStored, ds.HighBit = 16, 15
    ds.add_new(0x00280120, "US", 16383)
    img = _read(to_bytes(ds))
    assert (img.pixels[pad] == 0).all() and img.meta["padding_fraction"] == pytest.approx(pad.mean())


# ---- 4. LUT descriptors in Implicit VR ---------------------------------------------------------


def _signed_voi_lut(tmp_path, entries=32768, first=-16384, bits=16, table=None):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = rg1_dataset()
    set_pixels(ds, rg1_pixels().astype(np.int32) - 16384, bits_stored=16, signed=True)
    del ds.WindowCenter, ds.WindowWidth
    table = np.rint(np.linspace(0, 2**bits - 1, entries) ** 1.0) if table is None else table
    item = Dataset()
    item.add_new(0x00283002, "SS", [entries, first, bits])  # "US or SS": SS for signed pixels
    item.add_new(0x00283006, "US", [int(v) for v in table])
    ds.VOILUTSequence = Sequence([item])
    path = save(ds, tmp_path / "voi_implicit.dcm", implicit=True)
    v = rg1_pixels().astype(np.int64) - 16384
    ref = 1.0 - (table[np.clip(v - first, 0, entries - 1)] / (2**bits - 1))  # PS3.3 C.11.2.1.1, MONOCHROME1
    return path, ref


def test_implicit_vr_lut_descriptor_first_value_is_unsigned(tmp_path):
    path, ref = _signed_voi_lut(tmp_path)
    assert pydicom.dcmread(path).VOILUTSequence[0].LUTDescriptor[0] == -32768  # how pydicom reads it
    img = _read(path)
    assert img.meta["window_source"] == "voi_lut"
    np.testing.assert_allclose(img.pixels, ref, atol=1e-6)


def test_gap_pydicom_apply_voi_lut_fails_on_the_implicit_descriptor(tmp_path):
    from pydicom.pixels import apply_voi_lut

    path, ref = _signed_voi_lut(tmp_path)
    ds = pydicom.dcmread(path)
    try:
        out = 1.0 - apply_voi_lut(ds.pixel_array, ds) / 65535.0
    except Exception:
        return  # raises (IndexError today)
    assert not np.allclose(out, ref, atol=1e-6)


def test_gap_pydicom_apply_voi_wraps_an_8_bit_lut_with_4096_entries(tmp_path):
    from pydicom.pixels import apply_voi_lut

    table = np.rint(np.linspace(0, 255, 4096))
    path, ref = _signed_voi_lut(tmp_path, entries=4096, first=-2048, bits=8, table=table)
    np.testing.assert_allclose(_read(path).pixels, ref, atol=1e-6)
    ds = pydicom.dcmread(path)
    ds.VOILUTSequence[0].LUTDescriptor = [4096, -2048, 8]
    out = 1.0 - apply_voi_lut(ds.pixel_array, ds) / 255.0
    assert not np.allclose(out, ref, atol=1e-3)  # pydicom indexes with uint8: entries above 255 wrap


def test_implicit_vr_modality_lut_sequence_uses_pydicom_with_the_unsigned_descriptor(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut
    from pydicom.sequence import Sequence

    ds = rg1_dataset()
    v = rg1_pixels().astype(np.int32) - 16384
    set_pixels(ds, v, bits_stored=16, signed=True)
    table = np.arange(32768) + 1000  # modality value = stored + 17384 over the LUT's range
    item = Dataset()
    item.add_new(0x00283002, "SS", [32768, -16384, 16])
    item.add_new(0x00283006, "US", [int(x) for x in table])
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    path = save(ds, tmp_path / "mlut_implicit.dcm", implicit=True)
    img = _read(path)
    np.testing.assert_array_equal(img.raw, table[np.clip(v + 16384, 0, 32767)])
    raw_ds = pydicom.dcmread(path)
    with pytest.raises(Exception):  # noqa: B017  GAP: pydicom's own reading of the descriptor (-32768 entries)
        apply_modality_lut(raw_ds.pixel_array, raw_ds)


def test_rescale_equals_pydicom_apply_modality_lut():
    from pydicom.pixels import apply_modality_lut

    ds = rg1_dataset()
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024"
    ds.WindowCenter, ds.WindowWidth = 15000 * 0.5 - 1024, 30000 * 0.5
    img = _read(to_bytes(ds))
    ref_ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(to_bytes(ds)))
    np.testing.assert_allclose(img.raw, apply_modality_lut(ref_ds.pixel_array, ref_ds), atol=1e-3)


# ---- 5. refusal codes that name the real cause -------------------------------------------------


def test_missing_photometric_interpretation_is_not_colour():
    ds = rg1_dataset()
    del ds.PhotometricInterpretation
    err = _refusal(to_bytes(ds))
    assert err.code == "missing_attribute" and "Photometric Interpretation" in str(err)


@pytest.mark.parametrize(
    "photometric,code", [("RGB", "colour"), ("PALETTE COLOR", "colour"), ("MONOCHROME3", "unsupported")]
)
def test_photometric_codes(photometric, code):
    ds = rg1_dataset()
    ds.PhotometricInterpretation = photometric
    assert _refusal(to_bytes(ds)).code == code


def test_decode_failed_keeps_the_codec_message_on_one_line():
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEG2000Lossless

    ds = rg1_dataset()
    ds.compress(JPEG2000Lossless)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:60] + bytes(200) + frame[260:]])  # a damaged J2K header
    err = _refusal(to_bytes(ds))
    text = str(err)
    assert err.code == "decode_failed" and "\n" not in text
    assert "pylibjpeg: Error decoding the J2K data: failed to read the header" in text  # the cause, not line 1
    assert not any(s in text for s in PHI_STRINGS)


def test_auto_window_ignores_excluded_pixels():
    raw = np.arange(100, dtype=np.float32).reshape(10, 10)
    mask = raw >= 50
    c, w = auto_window(raw, mask)
    lo, hi = np.percentile(np.arange(50), [0.5, 99.5])
    assert (c, w) == pytest.approx(((lo + hi) / 2, hi - lo))
    assert auto_window(raw, np.ones_like(mask)) is None


def test_readme_lists_every_reason_code():
    from pathlib import Path

    from medxray.dicom.codes import REASON_CODES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What the DICOM reader supports and refuses", 1)[1].split("\n## ", 1)[0]
    for code in REASON_CODES:
        assert f"| `{code}` |" in section, code


def test_unusable_voi_lut_falls_back_to_the_window_with_a_warning(reference):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = rg1_dataset()  # keeps RG1's window 15000/30000
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])
    item.add_new(0x00283006, "US", list(range(100)))  # 100 entries where the descriptor says 4096
    ds.VOILUTSequence = Sequence([item])
    img = _read(to_bytes(ds))
    np.testing.assert_array_equal(img.pixels, reference.pixels)
    assert img.meta["window_source"] == "file"
    assert any(w.startswith("VOI LUT not used: a LUT holds 100 entries") for w in img.warnings)
