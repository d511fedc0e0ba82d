"""The DICOM reader runs a table of named stages, and a refusal says which stage refused.

``medxray.dicom.reader.DECODE_STAGES`` (read, parse, header, ..., grey_levels) is iterated by
:func:`read_dicom`; a refusal keeps its code and ends ``[stage: name]``. Checked on the generated
corpus (every refusal, each with the stage expected for its code) and on RG1 variants refused by
the later stages. That the table leaves every output pixel where it was is
tests/test_dicom_pinned.py's job; MONOCHROME1 and the uint8 rounding being one function each is
checked here too.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from dicom_rg1 import rg1_dataset, rg1_pixels, set_pixels

from medxray.dicom import read_dicom
from medxray.dicom.reader import DECODE_STAGES
from medxray.dicom.voi import invert_monochrome1
from medxray.display import to_uint8
from medxray.errors import DicomError

_STAGE = re.compile(r" \[stage: (\w+)\]$")

# refusal code of the generated corpus -> the stage that must have refused it
CORPUS_STAGE = {
    "not_dicom": "read",
    "truncated": "parse",
    "colour": "header",
    "modality": "header",
    "multi_frame": "header",
    "no_pixel_data": "header",
    "unsupported": "header",
    "too_large": "header",
    "decode_failed": "decompress",
    "short_pixel_data": "decompress",
}


def _refusal(data, **kw) -> DicomError:
    with pytest.raises(DicomError) as info:
        read_dicom(data, **kw)
    err = info.value
    assert str(err).startswith(f"{err.code}: ") and "\n" not in str(err)
    return err


def _stage(err: DicomError) -> str:
    m = _STAGE.search(str(err))
    assert m, f"no stage named in {err}"
    return m.group(1)


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_the_stage_table_is_in_decoding_order_with_unique_documented_names():
    names = [s.name for s in DECODE_STAGES]
    assert len(names) == len(set(names))
    assert names[:3] == ["read", "parse", "header"] and names[-1] == "grey_levels"
    # the LUT chain in the standard's order (PS3.3 C.11): modality LUT, VOI LUT / window, then presentation
    order = [names.index(n) for n in ("decompress", "stored_values", "modality_lut", "voi_lut", "window")]
    assert order == sorted(order) and names.index("monochrome1") > names.index("window")
    assert all((s.run.__doc__ or "").strip() for s in DECODE_STAGES)


def test_every_corpus_refusal_names_the_stage_that_refused(dicom_corpus):
    root, expect = dicom_corpus
    seen = set()
    for rel, exp in sorted(expect.items()):
        if exp.status != "error":
            continue
        err = _refusal(root / rel)
        assert _stage(err) == CORPUS_STAGE[err.code], (rel, str(err))
        seen.add(_stage(err))
    assert seen == {"read", "parse", "header", "decompress"}


def test_later_stages_name_themselves():
    # a Modality LUT with 20-bit entries: refused before any pixel is decoded
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = rg1_dataset()
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 20])
    item.add_new(0x00283006, "US", list(range(256)))
    ds.ModalityLUTSequence = Sequence([item])
    err = _refusal(_bytes(ds))
    assert (err.code, _stage(err)) == ("unsupported", "lut_parameters")

    # noise in all 16 bits under Bits Stored 12: the stored values cannot be located
    ds = rg1_dataset()
    set_pixels(ds, np.random.default_rng(0).integers(0, 65536, rg1_pixels().shape), bits_stored=12)
    err = _refusal(_bytes(ds))
    assert (err.code, _stage(err)) == ("bit_depth_mismatch", "stored_values")

    # every pixel is padding and there is no window: the automatic window has nothing to look at
    ds = rg1_dataset()
    set_pixels(ds, np.full_like(rg1_pixels(), 5000))
    del ds.WindowCenter, ds.WindowWidth
    ds.add_new(0x00280120, "US", 5000)  # Pixel Padding Value
    err = _refusal(_bytes(ds))
    assert (err.code, _stage(err)) == ("flat_image", "window") and "every pixel is padding" in str(err)

    # a blank image: refused by the grey-level count at the end, with the same message as before
    del ds.PixelPaddingValue
    err = _refusal(_bytes(ds))
    assert (err.code, _stage(err)) == ("flat_image", "grey_levels")
    assert re.search(r"has 1 grey level\(s\); .* window hides it \[stage: grey_levels\]$", str(err))


def test_monochrome1_and_uint8_are_one_function_each():
    x = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    assert invert_monochrome1(x.copy(), "MONOCHROME2").tolist() == x.tolist()
    y = x.copy()
    assert invert_monochrome1(y, "MONOCHROME1") is y and y.tolist() == [[1.0, 0.75, 0.0]]
    # clip, then round half to even: 0.5/255 -> 0, 1.5/255 -> 2, 2.5/255 -> 2; out of range clipped
    v = np.array([-0.2, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.6, 1.7], dtype=np.float32)
    assert to_uint8(v).tolist() == [0, 0, 2, 2, 153, 255] and to_uint8(v).dtype == np.uint8
    img = read_dicom(_bytes(rg1_dataset()))  # MONOCHROME1: the display image is the inverted window
    assert img.meta["photometric"] == "MONOCHROME1"
    np.testing.assert_array_equal(img.display_uint8(), to_uint8(img.pixels))
