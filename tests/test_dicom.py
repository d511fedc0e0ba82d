"""medxray.dicom: the real RG1 chest CR in four encodings, and the generated odd/broken corpus."""

from __future__ import annotations

import io

import numpy as np
import pytest
from dicom_corpus import PHI_STRINGS, make_dataset, phantom

from medxray import dicom
from medxray.dicom import read_dicom, rewindow, sniff_dicom
from medxray.errors import DicomError

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def rg1(name: str) -> str:
    return get_testdata_file(f"RG1_{name}.dcm")


@pytest.fixture(scope="module")
def rg1_images():
    return {n: read_dicom(rg1(n)) for n in ("UNCR", "J2KR", "UNCI", "J2KI")}


# ---- the real radiograph ---------------------------------------------------------------------


def test_rg1_metadata_and_range(rg1_images):
    img = rg1_images["UNCR"]
    assert img.pixels.shape == (1955, 1841) and img.pixels.dtype == np.float32
    assert 0.0 <= img.pixels.min() and img.pixels.max() <= 1.0
    m = img.meta
    assert (m["modality"], m["view_position"], m["body_part"]) == ("CR", "PA", "CHEST")
    assert (m["rows"], m["columns"], m["bits_stored"], m["photometric"]) == (1955, 1841, 15, "MONOCHROME1")
    assert m["sop_instance_uid"] and m["study_instance_uid"] and m["series_instance_uid"]
    assert img.window == (15000.0, 30000.0) and m["window_source"] == "file"
    assert not img.is_lateral and img.warnings == []
    # No patient attribute leaks into the metadata.
    ds = pydicom.dcmread(rg1("UNCR"), stop_before_pixels=True)
    text = repr(m)
    for kw in ("PatientName", "PatientID", "PatientBirthDate"):
        v = str(ds.get(kw, "") or "")
        if v:
            assert v not in text


def test_rg1_lossless_encodings_identical(rg1_images):
    # pydicom-data's naming: UNCR is the decoded J2KR (reversible), UNCI the decoded J2KI (irreversible).
    np.testing.assert_array_equal(rg1_images["UNCR"].pixels, rg1_images["J2KR"].pixels)
    np.testing.assert_array_equal(rg1_images["UNCR"].raw, rg1_images["J2KR"].raw)
    np.testing.assert_array_equal(rg1_images["UNCI"].pixels, rg1_images["J2KI"].pixels)


def test_rg1_lossy_within_tolerance(rg1_images):
    d = np.abs(rg1_images["UNCR"].pixels - rg1_images["J2KI"].pixels)
    assert 0 < d.max() < 0.05 and d.mean() < 0.002  # lossy, but visually the same image


def test_rg1_window_matches_pydicom_reference(rg1_images):
    """Our LINEAR window + MONOCHROME1 inversion equals pydicom's own VOI implementation."""
    from pydicom.pixels import apply_voi_lut

    ds = pydicom.dcmread(rg1("UNCR"))
    ref = apply_voi_lut(ds.pixel_array.astype(np.float64), ds)
    ref01 = 1.0 - ref / (2**15 - 1)  # pydicom maps the window onto the BitsStored range
    np.testing.assert_allclose(rg1_images["UNCR"].pixels, ref01, atol=2e-5)


def test_rg1_monochrome1_air_is_dark(rg1_images):
    px = rg1_images["UNCR"].pixels
    h, w = px.shape
    lungs = px[h // 4 : h // 2, w // 5 : w // 3].mean()  # right lung field
    spine = px[h // 4 : h // 2, w // 2 - 40 : w // 2 + 40].mean()  # mediastinum
    assert lungs < spine, "MONOCHROME1 must be inverted: air-filled lungs darker than the mediastinum"


def test_sources_path_bytes_filelike_agree():
    p = rg1("UNCR")
    data = open(p, "rb").read()
    a = read_dicom(p).pixels
    np.testing.assert_array_equal(a, read_dicom(data).pixels)
    np.testing.assert_array_equal(a, read_dicom(io.BytesIO(data)).pixels)


def test_keep_raw_false_gives_same_pixels():
    a = read_dicom(rg1("UNCR"))
    b = read_dicom(rg1("UNCR"), keep_raw=False)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    with pytest.raises(ValueError):
        _ = b.raw


def test_rewindow_reproduces_file_window(rg1_images):
    img = rg1_images["UNCR"]
    np.testing.assert_allclose(rewindow(img, *img.window), img.pixels, atol=1e-6)
    narrow = rewindow(img, 15000, 5000)
    assert (narrow == 0).mean() > (img.pixels == 0).mean()


@pytest.mark.parametrize(
    "plain,encoded",
    [
        ("MR_small.dcm", "MR_small_RLE.dcm"),
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
        ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
        ("MR_small.dcm", "MR_small_implicit.dcm"),
        ("MR_small.dcm", "MR_small_bigendian.dcm"),
        ("JPEG2000_UNC.dcm", "JPEG2000.dcm"),
    ],
)
def test_compressed_transfer_syntaxes_decode_identically(plain, encoded):
    a = read_dicom(get_testdata_file(plain), allowed_modalities=None)
    b = read_dicom(get_testdata_file(encoded), allowed_modalities=None)
    np.testing.assert_array_equal(a.raw, b.raw)


@pytest.mark.parametrize(
    "name",
    ["JPGExtended.dcm", "JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEGLSNearLossless_16.dcm", "image_dfl.dcm"],
)
def test_jpeg_family_and_deflate_decode(name):
    img = read_dicom(get_testdata_file(name), allowed_modalities=None)
    assert img.pixels.ndim == 2 and 0 <= img.pixels.min() < img.pixels.max() <= 1


def test_modality_allow_list_is_configurable():
    ct = get_testdata_file("CT_small.dcm")
    with pytest.raises(DicomError) as e:
        read_dicom(ct)
    assert e.value.code == "modality"
    assert read_dicom(ct, allowed_modalities=("CT",)).meta["modality"] == "CT"


# ---- the generated corpus ------------------------------------------------------------------------


def _outcome(path):
    try:
        return "ok", None, read_dicom(path)
    except DicomError as exc:
        return "error", exc.code, exc


def test_corpus_is_big_and_covers_every_refusal(dicom_corpus):
    _, expect = dicom_corpus
    assert len(expect) >= 25
    codes = {c for e in expect.values() if e.code for c in e.code.split("|")}
    for required in (
        "not_dicom",
        "truncated",
        "no_pixel_data",
        "short_pixel_data",
        "multi_frame",
        "colour",
        "modality",
        "too_large",
        "decode_failed",
    ):
        assert required in codes
    names = set(expect)
    assert any("/" in n and n.count("/") >= 3 for n in names), "nested folders"
    assert sum("." not in n.rsplit("/", 1)[-1] for n in names) >= 3, "files without extension"


def test_corpus_each_file_outcome(dicom_corpus):
    root, expect = dicom_corpus
    got = {rel: _outcome(root / rel) for rel in expect}
    for rel, e in expect.items():
        status, code, obj = got[rel]
        assert status == e.status, f"{rel}: expected {e.status}, got {status} ({obj})"
        if status == "error":
            assert e.accepts(code), f"{rel}: expected {e.code}, got {code}: {obj}"
            assert str(obj).startswith(f"{code}: ") and len(str(obj)) > len(code) + 10
        else:
            assert obj.pixels.dtype == np.float32 and 0 <= obj.pixels.min() and obj.pixels.max() <= 1
            assert obj.pixels.max() > obj.pixels.min()
            assert obj.is_lateral == e.lateral
            assert bool(obj.warnings) == e.lateral
            if e.same_as:
                np.testing.assert_array_equal(obj.pixels, got[e.same_as][2].pixels, err_msg=rel)
            if e.inverse_of:
                np.testing.assert_allclose(obj.pixels, 1.0 - got[e.inverse_of][2].pixels, atol=1e-7, err_msg=rel)
            assert not any(s in repr(obj.meta) for s in PHI_STRINGS)


def test_raw_file_has_no_preamble_and_is_recognised(dicom_corpus):
    root, _ = dicom_corpus
    head = (root / "ok/deeper/RAWIMPLICIT0001").read_bytes()[:132]
    assert head[128:132] != b"DICM" and sniff_dicom(head) == "raw"
    assert sniff_dicom((root / "bad/png_renamed.dcm").read_bytes()[:132]) is None


def test_signed_and_rescaled_values(dicom_corpus):
    root, _ = dicom_corpus
    s16 = read_dicom(root / "ok/signed16.dcm")
    np.testing.assert_array_equal(s16.raw, (phantom() - 2048) * 8)
    s12 = read_dicom(root / "ok/signed12.dcm")
    np.testing.assert_array_equal(s12.raw, phantom() - 2048)  # sign-extended from 12 bits
    assert s12.raw.min() < 0 < s12.raw.max()
    resc = read_dicom(root / "ok/rescale_slope_intercept.dcm")
    np.testing.assert_array_equal(resc.raw, (phantom() // 2) * 2 - 2048)  # slope 2, intercept -2048
    np.testing.assert_allclose(resc.pixels, s12.pixels, atol=1.5 / 4095)  # same window in rescaled units


def test_voi_lut_sequence_matches_pydicom(dicom_corpus):
    from pydicom.pixels import apply_voi_lut

    root, _ = dicom_corpus
    p = root / "ok/voi_lut_sequence.dcm"
    ds = pydicom.dcmread(p)
    ref = apply_voi_lut(ds.pixel_array, ds).astype(np.float64) / 65535.0
    img = read_dicom(p)
    assert img.meta["window_source"] == "voi_lut" and img.window is None
    np.testing.assert_allclose(img.pixels, ref, atol=1e-6)


def test_multi_valued_window_uses_first_and_percentile_fallback(dicom_corpus):
    root, _ = dicom_corpus
    assert read_dicom(root / "ok/multi_valued_window.dcm").window == (2048.0, 4096.0)
    nw = read_dicom(root / "ok/no_window.dcm")
    assert nw.meta["window_source"] == "percentile"
    assert (nw.pixels == 0).mean() < 0.05 and (nw.pixels == 1).mean() < 0.05  # 0.5/99.5 percentiles


def test_pixel_limit_is_checked_before_decoding(dicom_corpus, monkeypatch):
    root, _ = dicom_corpus

    def boom(ds):
        raise AssertionError("decoded although the header is over the limit")

    monkeypatch.setattr(dicom.reader, "decode_stored", boom)
    with pytest.raises(DicomError) as e:
        read_dicom(root / "bad/too_many_pixels.dcm")
    assert e.value.code == "too_large"
    with pytest.raises(DicomError) as e:
        read_dicom(root / "ok/mono2_12bit.dcm", max_pixels=1000)  # a configurable limit
    assert e.value.code == "too_large"


def test_refusal_for_in_memory_datasets(tmp_path):
    ds = make_dataset("inmem", modality="MG")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(DicomError, match="modality MG"):
        read_dicom(buf.getvalue())
    assert read_dicom(buf.getvalue(), allowed_modalities=["mg"]).meta["modality"] == "MG"
    with pytest.raises(DicomError) as e:
        read_dicom(tmp_path / "missing.dcm")
    assert e.value.code == "unreadable"
