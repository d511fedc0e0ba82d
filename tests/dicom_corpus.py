"""A generated corpus of odd and broken DICOM files, one per case the decoder must handle.

``build_corpus(root)`` writes the files and returns ``{relative path: Expect}``; tests of the
decoder (tests/test_dicom*.py) and of the batch scorer (tests/test_scoring*.py) share it. Every
DICOM carries the PHI strings below so tests can prove they never reach an output.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PHI_NAME = "Zzyzxphi^Quintessa"
PHI_ID = "PHIID-7741-QX"
PHI_BIRTH = "19230417"
PHI_STRINGS = (PHI_NAME, "Zzyzxphi", "Quintessa", PHI_ID, PHI_BIRTH)

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SIZE = 64
WINDOW = (2048.0, 4096.0)


@dataclass(frozen=True)
class Expect:
    status: str  # "ok" | "error"
    code: str | None = None  # refusal code for errors (set of acceptable codes joined by "|")
    same_as: str | None = None  # an ok file whose pixels must be identical
    inverse_of: str | None = None  # an ok file whose pixels must be 1 - these
    lateral: bool = False

    def accepts(self, code: str | None) -> bool:
        return self.code is None or (code is not None and code in self.code.split("|"))


def phantom(size: int = SIZE, bits: int = 12) -> np.ndarray:
    """A chest-like phantom: bright body, two dark lungs, a heart shadow; integers in [0, 2**bits)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = 0.15 + 0.65 * (((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.48) ** 2 < 1)
    for cx in (0.32, 0.68):
        img -= 0.45 * (((xx - cx) / 0.14) ** 2 + ((yy - 0.48) / 0.3) ** 2 < 1)
    img += 0.3 * np.exp(-(((xx - 0.55) / 0.1) ** 2 + ((yy - 0.62) / 0.1) ** 2))
    img += 0.04 * np.sin(23 * xx) * np.cos(17 * yy)
    top = 2**bits - 1
    return np.clip(np.rint(img * top), 0, top).astype(np.int64)


def _uid(name: str, kind: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[name, kind])


def make_dataset(
    name: str,
    arr: np.ndarray | None = None,
    *,
    modality: str | None = "CR",
    photometric: str = "MONOCHROME2",
    bits_allocated: int = 16,
    bits_stored: int = 12,
    signed: bool = False,
    window: tuple | None = WINDOW,
    view: str = "PA",
    transfer_syntax: str | None = None,
    pixel_bytes: bytes | None = None,
) -> "object":
    """A single-frame grayscale radiograph data set with PHI in the patient module."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    arr = phantom(bits=min(bits_stored, 12)) if arr is None else arr
    ds = Dataset()
    sop_class = {"DX": DX_STORAGE, "CT": CT_STORAGE}.get(modality or "", CR_STORAGE)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(name, "sop")
    ds.file_meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _uid(name, "sop")
    ds.StudyInstanceUID = _uid("study", "study")
    ds.SeriesInstanceUID = _uid(name, "series")
    ds.PatientName = PHI_NAME
    ds.PatientID = PHI_ID
    ds.PatientBirthDate = PHI_BIRTH
    ds.OtherPatientIDs = PHI_ID
    ds.AccessionNumber = "ACC" + PHI_ID[-6:]
    if modality is not None:
        ds.Modality = modality
    ds.ViewPosition = view
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    dtype = f"<{'i' if signed else 'u'}{bits_allocated // 8}"
    data = pixel_bytes if pixel_bytes is not None else np.asarray(arr).astype(dtype).tobytes()
    if len(data) % 2:
        data += b"\x00"
    ds.PixelData = data
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    return ds


def _save(ds, path: Path, *, implicit: bool = False) -> None:
    from pydicom.uid import ImplicitVRLittleEndian

    path.parent.mkdir(parents=True, exist_ok=True)
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _png_bytes() -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(range(16)) for _ in range(16))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def build_corpus(root: Path) -> dict[str, Expect]:
    """Write the corpus under ``root``; return {posix relative path: Expect}."""
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import JPEG2000, JPEG2000Lossless, RLELossless

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    exp: dict[str, Expect] = {}
    base = phantom()

    def put(rel: str, ds, expect: Expect, **kw) -> None:
        _save(ds, root / rel, **kw)
        exp[rel] = expect

    def put_bytes(rel: str, data: bytes, expect: Expect) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        exp[rel] = expect

    # ---- images that must score --------------------------------------------------------
    put("ok/mono2_12bit.dcm", make_dataset("mono2"), Expect("ok"))
    put(
        "ok/mono1_12bit.dcm",
        make_dataset("mono1", photometric="MONOCHROME1"),
        Expect("ok", inverse_of="ok/mono2_12bit.dcm"),
    )
    high = base | (rng.integers(0, 16, base.shape) << 12)  # overlay garbage above BitsStored
    put("ok/unsigned12_high_bits.dcm", make_dataset("highbits", high), Expect("ok", same_as="ok/mono2_12bit.dcm"))
    signed = base - 2048
    put(
        "ok/signed16.dcm",
        make_dataset("signed16", signed * 8, bits_stored=16, signed=True, window=(0.0, 32768.0)),
        Expect("ok"),
    )
    put(
        "ok/signed12.dcm",
        make_dataset("signed12", signed, bits_stored=12, signed=True, window=(0.0, 4096.0)),
        Expect("ok"),
    )
    garbage = (signed & 0x0FFF) | (rng.integers(0, 16, base.shape) << 12)  # two's complement 12 bit + junk
    put(
        "ok/signed12_junk_high_bits.dcm",
        make_dataset(
            "signed12junk", garbage.astype(np.uint16).view(np.int16), bits_stored=12, signed=True, window=(0.0, 4096.0)
        ),
        Expect("ok", same_as="ok/signed12.dcm"),
    )
    ds = make_dataset("rescale", base // 2, window=(0.0, 4096.0))
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-2048"  # raw = 2*stored - 2048 (~ base - 2048)
    put("ok/rescale_slope_intercept.dcm", ds, Expect("ok"))
    ds = make_dataset("voilut", window=None)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", [int(v) for v in np.rint(65535 * (np.arange(4096) / 4095) ** 0.5)])
    item.LUTExplanation = "gamma 0.5"
    ds.VOILUTSequence = Sequence([item])
    put("ok/voi_lut_sequence.dcm", ds, Expect("ok"))
    ds = make_dataset("multiwin", window=None)
    ds.WindowCenter, ds.WindowWidth = [WINDOW[0], 1000.0], [WINDOW[1], 500.0]
    put("ok/multi_valued_window.dcm", ds, Expect("ok", same_as="ok/mono2_12bit.dcm"))
    put("ok/no_window.dcm", make_dataset("nowin", window=None), Expect("ok"))
    ds = make_dataset("sigmoid")
    ds.VOILUTFunction = "SIGMOID"
    put("ok/sigmoid_window.dcm", ds, Expect("ok"))
    put("ok/implicit_vr.dcm", make_dataset("implicit"), Expect("ok", same_as="ok/mono2_12bit.dcm"), implicit=True)
    # Raw implicit-VR data set: no preamble, no DICM, no file meta, no extension.
    ds = make_dataset("rawimplicit")
    del ds.file_meta
    buf = io.BytesIO()
    import pydicom

    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    put_bytes("ok/deeper/RAWIMPLICIT0001", buf.getvalue(), Expect("ok", same_as="ok/mono2_12bit.dcm"))
    ds = make_dataset("rle")
    ds.compress(RLELossless)
    put("ok/rle_lossless.dcm", ds, Expect("ok", same_as="ok/mono2_12bit.dcm"))
    ds = make_dataset("j2k")
    ds.compress(JPEG2000Lossless)
    put("ok/jpeg2000_lossless.dcm", ds, Expect("ok", same_as="ok/mono2_12bit.dcm"))
    odd = phantom(size=SIZE, bits=8)[:63, :61]
    put(
        "ok/dx_8bit_odd_size.dcm",
        make_dataset("dx8", odd, modality="DX", bits_allocated=8, bits_stored=8, window=(128.0, 256.0)),
        Expect("ok"),
    )
    put("ok/lateral.dcm", make_dataset("lateral", view="LL"), Expect("ok", lateral=True))
    put("nested/a/b/c/deep.dcm", make_dataset("deep"), Expect("ok", same_as="ok/mono2_12bit.dcm"))
    put("nested/IM000001", make_dataset("noext"), Expect("ok", same_as="ok/mono2_12bit.dcm"))
    put("nested/a/UPPER.DCM", make_dataset("upper", modality="DX"), Expect("ok"))

    # ---- everything the decoder must refuse, with the right reason ---------------------
    put_bytes("bad/zero_bytes.dcm", b"", Expect("error", "not_dicom"))
    put_bytes(
        "bad/random_bytes.dcm", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), Expect("error", "not_dicom")
    )
    put_bytes("bad/random_noext", rng.integers(0, 256, 300, dtype=np.uint8).tobytes(), Expect("error", "not_dicom"))
    put_bytes("bad/png_renamed.dcm", _png_bytes(), Expect("error", "not_dicom"))
    put_bytes("bad/notes.txt", b"Patient list: nothing here\n", Expect("error", "not_dicom"))
    put_bytes(
        "bad/dicm_then_garbage.dcm",
        b"\x00" * 128 + b"DICM" + rng.integers(0, 256, 600, dtype=np.uint8).tobytes(),
        Expect("error", "unreadable|truncated"),
    )
    good = _bytes(make_dataset("trunc"))
    put_bytes("bad/truncated_in_pixels.dcm", good[: len(good) - 1000], Expect("error", "truncated"))
    put_bytes("bad/truncated_in_header.dcm", good[:400], Expect("error", "truncated"))
    ds = make_dataset("j2ktrunc")
    ds.compress(JPEG2000Lossless)
    j2k = _bytes(ds)
    put_bytes("bad/truncated_jpeg2000.dcm", j2k[: len(j2k) // 2], Expect("error", "truncated"))
    ds = make_dataset("nopix")
    del ds.PixelData
    put("bad/no_pixel_data.dcm", ds, Expect("error", "no_pixel_data"))
    put(
        "bad/short_pixel_data.dcm",
        make_dataset("short", pixel_bytes=base.astype("<u2").tobytes()[: SIZE * SIZE]),
        Expect("error", "short_pixel_data"),
    )
    ds = make_dataset("multiframe", pixel_bytes=np.concatenate([base.ravel()] * 3).astype("<u2").tobytes())
    ds.NumberOfFrames = 3
    put("bad/multi_frame.dcm", ds, Expect("error", "multi_frame"))
    rgb = np.stack([phantom(bits=8)] * 3, axis=-1).astype(np.uint8)
    ds = make_dataset("rgb", rgb[..., 0], photometric="RGB", bits_allocated=8, bits_stored=8, pixel_bytes=rgb.tobytes())
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    put("bad/colour_rgb.dcm", ds, Expect("error", "colour"))
    put("bad/modality_ct.dcm", make_dataset("ct", modality="CT"), Expect("error", "modality"))
    put("bad/modality_missing.dcm", make_dataset("nomod", modality=None), Expect("error", "modality"))
    ds = make_dataset("huge")
    ds.Rows, ds.Columns = 9000, 9000  # 81 MP claimed, 8 KB present: refused before any decoding
    put("bad/too_many_pixels.dcm", ds, Expect("error", "too_large"))
    ds = make_dataset("badj2k", transfer_syntax=JPEG2000)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + rng.integers(0, 256, 400, dtype=np.uint8).tobytes()])
    ds["PixelData"].VR = "OB"
    put("bad/corrupt_jpeg2000.dcm", ds, Expect("error", "decode_failed"))
    ds = make_dataset("onebit", bits_allocated=16, bits_stored=12)
    ds.BitsAllocated = 1
    put("bad/one_bit.dcm", ds, Expect("error", "unsupported"))
    return exp
