"""Issue 20: the reader's output pixels are pinned bit for bit (refactors must not move a grey level).

The digests were computed with the reader as it was before its decode steps became a table of
named stages (:data:`medxray.dicom.reader.STAGES`) and before MONOCHROME1 inversion and the
[0, 1] -> uint8 conversion were each written once; they hold the float32 display image, its
8-bit form (:meth:`DicomImage.display_uint8`) and a re-windowed image (:func:`rewindow`, which
inverts MONOCHROME1 too). Inputs: pydicom-data's RG1 chest CR in its four encodings (native,
JPEG 2000 lossless and lossy; full size and ``reduce_to=224``, the J2K resolution-level path),
files with padding, a Modality LUT Sequence, a VOI LUT Sequence and big-endian pixels, and the
distinct images of the generated corpus (tests/dicom_corpus.py), full and reduced.

A codec upgrade that changes the lossy JPEG 2000 decode (RG1_J2KI, RG1_UNCI is its decompressed
twin) would change those digests: compare against RG1_UNCI before re-pinning.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest

from medxray.dicom import read_dicom, rewindow

pydicom_data = pytest.importorskip("pydicom.data")


def digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def outputs(path, reduce_to: int | None) -> tuple[str, str, str]:
    """(pixels, display_uint8, rewindow at 0.7 x the width) digests; 'None' when there is no window."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = read_dicom(path, allowed_modalities=None, reduce_to=reduce_to)
    rw = "None"
    if img.window is not None:
        func = img.meta.get("voi_lut_function") or "LINEAR"
        rw = digest(rewindow(img, img.window[0], img.window[1] * 0.7, func))
    return digest(img.pixels), digest(img.display_uint8()), rw


# (pydicom-data file, reduce_to) -> digests
PYDICOM_DATA: dict[tuple[str, int | None], tuple[str, str, str]] = {
    ("RG1_UNCR.dcm", None): ("c7a7991c434e193c", "a5e0e708d3e39371", "21e880704791b9f2"),
    ("RG1_UNCR.dcm", 224): ("c3529a4689cc632b", "ef84e6aeee86bc13", "9a66835e3f0aacd8"),
    ("RG1_UNCI.dcm", None): ("0718f36a8b78baa1", "f8e6dea08c84311f", "b3bdffe580bc5d3e"),
    ("RG1_UNCI.dcm", 224): ("e0ed0bda306bf1e2", "fb4c7e8c88c9697c", "6f18c34c047e4e89"),
    ("RG1_J2KR.dcm", None): ("c7a7991c434e193c", "a5e0e708d3e39371", "21e880704791b9f2"),
    ("RG1_J2KR.dcm", 224): ("83eda5647e79bf1e", "206f16dd0ea99da6", "3cb0cecd06a07dd3"),
    ("RG1_J2KI.dcm", None): ("0718f36a8b78baa1", "f8e6dea08c84311f", "b3bdffe580bc5d3e"),
    ("RG1_J2KI.dcm", 224): ("eb120e433b008cdc", "5edece601c9c298c", "c529fc4d007c3735"),
    ("CT_small.dcm", None): ("0cfd6ae1dd8ac77e", "5674e368a7dc41d0", "3288a2fd53ef0f63"),
    ("693_UNCR.dcm", None): ("b80564b35aaa3b69", "b272033022bb7908", "a14f3e2e8a36eaf0"),
    ("mlut_18.dcm", None): ("f3a253e5d3a6ef9f", "8200b9c59f525665", "d8c546a76143f876"),
    ("vlut_04.dcm", None): ("5ee064055ed87ea6", "90cbbf1836266936", "None"),
    ("MR_small_bigendian.dcm", None): ("36f7c1257ea1a43b", "554f0c5d3b42caad", "0904df02c94e050c"),
    ("RG3_UNCI.dcm", None): ("596764f88a531388", "e4256750a53bb4b9", "dd68a962692af6bb"),
}

# (generated corpus file, reduce_to) -> digests (files the corpus says are the same picture are left out)
CORPUS: dict[tuple[str, int | None], tuple[str, str, str]] = {
    ("ok/mono2_12bit.dcm", None): ("2abc835e102def4d", "0d36109221c94be4", "81858e2f2f6afd26"),
    ("ok/mono2_12bit.dcm", 32): ("90af9e19d2b620c8", "79c6dcbe3dd3c4e1", "60185be6a8e2b48a"),
    ("ok/mono1_12bit.dcm", None): ("d90c09d6de7388da", "008e7e4c6962eed4", "f0bff184b001259b"),
    ("ok/mono1_12bit.dcm", 32): ("370dcedcf32bf030", "e8a0ecc59b23cd9d", "bc8cec69ac83e242"),
    ("ok/dx_8bit_odd_size.dcm", None): ("e5e5e52f901e84e7", "f28e144fb4dd417d", "a7fbef140a08fb70"),
    ("ok/dx_8bit_odd_size.dcm", 32): ("088a3f5f8dccb095", "b37b355d58f69d38", "42a4ad5c81f171ec"),
    ("ok/jpeg2000_lossless.dcm", 32): ("40bdc08bcd028f57", "a02e524c8cb6ec6e", "b8681356feb338ae"),
    ("ok/no_window.dcm", None): ("22bdc3f9d2e735c5", "c664808c33748f60", "065d90c05e30e677"),
    ("ok/no_window.dcm", 32): ("4aca575a6f078403", "19028e6685036dbe", "065d90c05e30e677"),
    ("ok/rescale_slope_intercept.dcm", None): ("1ca2fcb9012880c8", "d99cfe32216e7404", "427c83662b67c337"),
    ("ok/rescale_slope_intercept.dcm", 32): ("4077237efd21c8a9", "c81801d7d89a8cf4", "c8eedb89d7c95be5"),
    ("ok/sigmoid_window.dcm", None): ("415accefa3121633", "4f8a8db94d7e20fb", "3de277dd04147c97"),
    ("ok/sigmoid_window.dcm", 32): ("e2b4e05a25d8ae5a", "2bc5f7382e8e3a1a", "3de277dd04147c97"),
    ("ok/signed16.dcm", None): ("40a9c01c36513df0", "dd7d63f54856a06a", "f8d3033cb42de0b1"),
    ("ok/signed16.dcm", 32): ("b7102459ec0608c2", "e0112cfff2c5b42b", "480d99dbe6c4e0a0"),
    ("ok/voi_lut_sequence.dcm", None): ("f7334bbbf33b1310", "c9b6a593e455f8f1", "None"),
    ("ok/voi_lut_sequence.dcm", 32): ("f96b17e1ffc1ac48", "28a16d7e8fed34f6", "None"),
}


@pytest.mark.parametrize(("name", "reduce_to"), sorted(PYDICOM_DATA, key=str))
def test_pydicom_data_outputs_are_pinned(name, reduce_to):
    path = pydicom_data.get_testdata_file(name)
    assert path is not None, f"{name} missing: pydicom-data must be installed"
    assert outputs(path, reduce_to) == PYDICOM_DATA[(name, reduce_to)]


def test_corpus_outputs_are_pinned(dicom_corpus):
    root, _expect = dicom_corpus
    got = {key: outputs(root / key[0], key[1]) for key in CORPUS}
    assert {k: v for k, v in got.items() if v != CORPUS[k]} == {}
