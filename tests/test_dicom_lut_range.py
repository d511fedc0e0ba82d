"""LUT entries whose range disagrees with the LUT Descriptor (issue 19, "the reader, one more wrong-but-ok kind").

Built from pydicom-data's RG1 chest CR (4x downsampled, tests/dicom_rg1.py): its window 15000/30000
written as a VOI LUT Sequence of 12-bit entries. An Agfa CR says 16 bits per entry in the descriptor
for such a table; scaled by 2**16 - 1 the picture came out near white (display 0.945-0.998, status ok).
The reader now scales by the entries' real range (Cornerstone, Horos, dicom-rs), so the 16-bit
descriptor gives the same picture as the correct 12-bit one. The Modality LUT's family: a descriptor
saying 12 bits (not 8 or 16) over 16-bit words, or 8 bits over 16-bit words, reads the words.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pydicom")
from dicom_rg1 import rg1_dataset, rg1_pixels, to_bytes  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from medxray.dicom import read_dicom  # noqa: E402
from medxray.dicom.voi import lut_output_max  # noqa: E402

CENTER, WIDTH = 15000.0, 30000.0  # RG1's own window (LINEAR)
ENTRIES = 32768  # covers RG1's stored values (874..26479, 15 bits)


def _window_table(out_bits: int) -> np.ndarray:
    """RG1's LINEAR window (PS3.3 C.11.2.1.2) as a LUT with ``out_bits``-bit entries, first value mapped 0."""
    x = np.arange(ENTRIES, dtype=np.float64)
    y = np.clip((x - (CENTER - 0.5)) / (WIDTH - 1.0) + 0.5, 0.0, 1.0)
    return np.rint(y * (2**out_bits - 1)).astype(np.int64)


def _with_voi_lut(table: np.ndarray, descriptor_bits: int, as_words: bool = True) -> bytes:
    ds = rg1_dataset()
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.LUTDescriptor = [ENTRIES, 0, descriptor_bits]
    if as_words:
        item.LUTData = table.astype("<u2").tobytes()
        item["LUTData"].VR = "OW"
    else:
        item.add_new(0x00283006, "US", [int(v) for v in table])
    ds.VOILUTSequence = Sequence([item])
    return to_bytes(ds)


@pytest.fixture(scope="module")
def windowed():
    """RG1 with its window: the picture a correct VOI LUT must reproduce."""
    return read_dicom(to_bytes(rg1_dataset())).pixels


@pytest.mark.filterwarnings("ignore:The value for the data element:UserWarning")  # 64 KB of US: pydicom writes UN
@pytest.mark.parametrize("as_words", [True, False], ids=["OW", "US"])
def test_12_bit_entries_under_a_16_bit_descriptor_show_the_right_picture(windowed, as_words):
    table = _window_table(12)
    agfa = read_dicom(_with_voi_lut(table, 16, as_words))
    right = read_dicom(_with_voi_lut(table, 12, as_words))
    assert agfa.meta["window_source"] == "voi_lut" and not agfa.warnings
    np.testing.assert_array_equal(agfa.pixels, right.pixels)
    # not washed out: RG1 (MONOCHROME1, air dark) has a mid-grey mean, like the windowed image
    assert 0.2 < float(agfa.pixels.mean()) < 0.8 and abs(float(agfa.pixels.mean() - windowed.mean())) < 0.01
    assert np.corrcoef(agfa.pixels.ravel(), windowed.ravel())[0, 1] > 0.99
    assert np.abs(agfa.pixels - windowed).max() <= 1.0 / 4095 + 1e-6  # the 12-bit table's quantisation


def test_a_lut_that_uses_its_descriptors_bits_is_scaled_by_them(windowed):
    img = read_dicom(_with_voi_lut(_window_table(16), 16))
    assert np.abs(img.pixels - windowed).max() <= 1.0 / 65535 + 1e-6
    assert lut_output_max(np.array([0.0, 4095.0])) == 4095.0
    assert lut_output_max(np.array([0.0, 65535.0])) == 65535.0
    assert lut_output_max(np.array([0.0, 300.0])) == 511.0  # wider entries than an 8-bit descriptor: 9 bits
    assert lut_output_max(np.zeros(4)) == 1.0


@pytest.mark.parametrize("descriptor_bits", [12, 8, 16])
def test_modality_lut_words_are_read_whatever_bits_the_descriptor_states(descriptor_bits):
    """A Modality LUT of 16-bit words (stored + 1000) under a descriptor of 12, 8 or 16 bits:
    pydicom's apply_modality_lut fails on the first two (uint12 is no type; uint8 overflows)."""
    ds = rg1_dataset()
    table = np.arange(ENTRIES, dtype=np.int64) + 1000
    item = Dataset()
    item.LUTDescriptor = [ENTRIES, 0, descriptor_bits]
    item.LUTData = table.astype("<u2").tobytes()
    item["LUTData"].VR = "OW"
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    ds.WindowCenter = CENTER + 1000
    img = read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(img.raw, rg1_pixels() + 1000)
    np.testing.assert_allclose(img.pixels, read_dicom(to_bytes(rg1_dataset())).pixels, atol=1e-6)


def test_modality_lut_of_bytes_under_a_16_bit_descriptor():
    """8-bit entries (one byte each) under a descriptor saying 16: the bytes are the entries."""
    ds = rg1_dataset()
    table = np.rint(np.linspace(0, 255, ENTRIES)).astype(np.uint8)
    item = Dataset()
    item.LUTDescriptor = [ENTRIES, 0, 16]
    item.LUTData = table.tobytes()
    item["LUTData"].VR = "OW"
    ds.ModalityLUTSequence = Sequence([item])
    ds.WindowCenter, ds.WindowWidth = 127.5, 256
    img = read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(img.raw, table[rg1_pixels()].astype(np.float32))
