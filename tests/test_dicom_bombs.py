"""Decompression bombs (issue 19 item 1): a Deflated Explicit VR Little Endian data set is inflated
under a ceiling taken from its own header (medxray/dicom/inflate.py), never whole by pydicom.

The bombs are built here: a small header, then deflated zeros written as one compressed block
repeated (a full flush makes each block independent), so a 1 MB file that inflates to 1 GiB costs
nothing to make. In-process tests bound what the reader allocates with tracemalloc; the CLI test
runs the real ``score-dicom`` on a folder and bounds the peak RSS of the scorer and its decode worker.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from medxray.dicom import read_dicom  # noqa: E402
from medxray.dicom.inflate import METADATA_BUDGET, inflate_deflated  # noqa: E402
from medxray.errors import DicomError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
#: What the reader may allocate (tracemalloc peak) while refusing any of the bombs below:
#: the ceiling (header image + 2 x METADATA_BUDGET) and a copy, with room to spare.
ALLOC_BOUND = 2 * (2 * METADATA_BUDGET + (1 << 20)) + (8 << 20)
#: Peak RSS of `score-dicom` (scorer or decode worker) over the same run without the bomb.
RSS_BOUND_MB = 300


def _el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _us(v: int) -> bytes:
    return struct.pack("<H", v)


def _file_meta() -> bytes:
    body = (
        _el(2, 1, b"OB", b"\x00\x01")
        + _el(2, 2, b"UI", b"1.2.840.10008.5.1.4.1.1.1\x00")
        + _el(2, 3, b"UI", b"1.2.826.0.1.3680043.8.498.1\x00")
        + _el(2, 0x10, b"UI", b"1.2.840.10008.1.2.1.99\x00")
    )
    return b"\x00" * 128 + b"DICM" + _el(2, 0, b"UL", struct.pack("<I", len(body))) + body


def _image_header(rows: int = 512, cols: int = 512) -> bytes:
    return (
        _el(8, 0x16, b"UI", b"1.2.840.10008.5.1.4.1.1.1\x00")
        + _el(8, 0x18, b"UI", b"1.2.826.0.1.3680043.8.498.1\x00")
        + _el(8, 0x60, b"CS", b"CR")
        + _el(0x10, 0x10, b"PN", b"Zzyzxphi^Quintessa")
        + _el(0x28, 2, b"US", _us(1))
        + _el(0x28, 4, b"CS", b"MONOCHROME2 ")
        + _el(0x28, 0x10, b"US", _us(rows))
        + _el(0x28, 0x11, b"US", _us(cols))
        + _el(0x28, 0x100, b"US", _us(16))
        + _el(0x28, 0x101, b"US", _us(12))
        + _el(0x28, 0x102, b"US", _us(11))
        + _el(0x28, 0x103, b"US", _us(0))
    )


def deflate_bomb(kind: str = "pixel_length", inflated: int = GIB) -> bytes:
    """A Part 10 file in Deflated Explicit VR Little Endian whose body inflates to about ``inflated`` bytes.

    ``pixel_length``: a 512x512 header, then a Pixel Data element declaring ``inflated`` bytes of zeros;
    ``trailing``: a 512x512 image with the right Pixel Data length, then Data Set Trailing Padding of zeros;
    ``before_pixels``: a private OB element of zeros before the Pixel Data;
    ``undefined_item``: a sequence of undefined length whose one item is a huge OB.
    """
    if kind == "pixel_length":
        head, tail = _image_header() + struct.pack("<HH2sHI", 0x7FE0, 0x10, b"OW", 0, inflated), b""
    elif kind == "trailing":
        head = _image_header() + _el(0x7FE0, 0x10, b"OW", bytes(512 * 512 * 2))
        head += struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, inflated)
        tail = b""
    elif kind == "before_pixels":
        head = _image_header() + struct.pack("<HH2sHI", 0x0029, 0x1010, b"OB", 0, inflated)
        tail = _el(0x7FE0, 0x10, b"OW", bytes(16))
    elif kind == "undefined_item":
        head = (
            _image_header()
            + struct.pack("<HH2sHI", 0x0040, 0x0275, b"SQ", 0, 0xFFFFFFFF)
            + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
            + struct.pack("<HH2sHI", 0x0029, 0x1010, b"OB", 0, inflated)
        )
        tail = b""
    else:
        raise ValueError(kind)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(head), comp.flush(zlib.Z_FULL_FLUSH)]
    step = 1 << 20
    block = comp.compress(bytes(step)) + comp.flush(zlib.Z_FULL_FLUSH)  # self-contained after a full flush
    parts += [block] * (inflated // step)
    parts += [comp.compress(tail), comp.flush()]
    return _file_meta() + b"".join(parts)


def deflated_rg1() -> bytes:
    """pydicom-data's RG1_UNCR re-encoded as Deflated Explicit VR Little Endian (pydicom deflates on write)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _refusal(data: bytes) -> tuple[str, int]:
    """(refusal code, tracemalloc peak bytes) of reading ``data``."""
    tracemalloc.start()
    try:
        read_dicom(data)
    except DicomError as exc:
        return exc.code, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    raise AssertionError("the bomb was read")


@pytest.mark.parametrize("kind", ["pixel_length", "trailing", "before_pixels", "undefined_item"])
def test_deflate_bombs_are_refused_too_large_within_the_bound(kind):
    bomb = deflate_bomb(kind)
    assert len(bomb) < 1_100_000  # ~1 MB on disk
    code, peak = _refusal(bomb)
    assert code == "too_large"
    assert peak < ALLOC_BOUND, f"{kind}: the reader allocated {peak / 2**20:.0f} MiB"


def test_pixel_limit_is_applied_before_the_pixels_are_inflated():
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = _image_header(60000, 60000) + struct.pack("<HH2sHI", 0x7FE0, 0x10, b"OW", 0, 0xFFFFFFFE)
    data = _file_meta() + comp.compress(head) + comp.compress(bytes(1 << 20)) + comp.flush()
    with pytest.raises(DicomError, match=r"too_large: .*above the 60.0 MP limit \(not inflated\)"):
        read_dicom(data)


def test_deflated_rg1_reads_like_the_uncompressed_file():
    data = deflated_rg1()
    img = read_dicom(data)
    ref = read_dicom(get_testdata_file("RG1_UNCR.dcm"))
    assert img.meta["transfer_syntax"] == "1.2.840.10008.1.2.1.99"
    np.testing.assert_array_equal(img.pixels, ref.pixels)
    assert img.window == ref.window and img.warnings == ref.warnings
    red = read_dicom(data, keep_raw=False, reduce_to=224)
    np.testing.assert_array_equal(red.pixels, read_dicom(get_testdata_file("RG1_UNCR.dcm"), reduce_to=224).pixels)


def test_inflate_report_and_exact_ceiling():
    data = deflated_rg1()
    (group_length,) = struct.unpack_from("<I", data, 132 + 8)  # (0002,0000) UL: the File Meta group's length
    meta_end = 132 + 12 + group_length
    body, report = inflate_deflated(memoryview(data)[meta_end:], max_pixels=60_000_000)
    assert report.inflated_bytes == len(body)
    assert 0 <= len(data) - meta_end - report.compressed_bytes <= 1  # pydicom pads the stream to an even length
    assert report.inflated_bytes <= report.ceiling_bytes <= report.inflated_bytes + METADATA_BUDGET + 1024
    with pytest.raises(DicomError, match="too_large"):  # a smaller budget than the trailing elements need
        inflate_deflated(memoryview(data)[meta_end:], max_pixels=60_000_000, budget=1)


def test_cut_and_corrupt_deflate_streams_are_refused_with_their_reason():
    data = deflated_rg1()
    with pytest.raises(DicomError, match="^truncated: the deflated data set ends before its deflate stream"):
        read_dicom(data[: len(data) // 2])
    meta = _file_meta()
    with pytest.raises(DicomError, match="^unreadable: the deflated data set is not a valid deflate stream"):
        read_dicom(meta + b"\xff" * 4096)


def test_rle_segments_that_expand_past_the_header_are_refused_within_the_bound():
    """RLE has no size field: 2 bytes (a replicate run) decode to 128. Segments that would decode to
    2 x 128 MiB under a 64 x 64 header are refused; the decoder writes into the header's buffer only."""
    from dicom_corpus import make_dataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    ds = make_dataset("rlebomb", transfer_syntax=RLELossless)
    seg = bytes([0x81, 0x00]) * (1 << 21)  # 4 MiB -> 256 MiB decoded, per segment
    header = struct.pack("<16I", 2, 64, 64 + len(seg), *([0] * 13))
    ds.PixelData = encapsulate([header + seg + seg])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    code, peak = _refusal(buf.getvalue())
    assert code == "decode_failed"
    assert peak < 4 * len(buf.getvalue()) + (16 << 20), f"{peak / 2**20:.0f} MiB"  # the file and its copies, no more


def test_header_reading_for_other_entry_points_is_bounded_too(tmp_path):
    """read_header_bounded: what the DICOM node can use instead of dcmread for its checks at receipt."""
    from medxray.dicom.source import read_header_bounded

    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(deflate_bomb("pixel_length"))
    tracemalloc.start()
    try:
        with pytest.raises(DicomError, match="^too_large: "):
            read_header_bounded(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < ALLOC_BOUND
    rg1 = tmp_path / "rg1.dcm"
    rg1.write_bytes(deflated_rg1())
    assert (
        read_header_bounded(rg1).Rows,
        read_header_bounded(get_testdata_file("RG1_UNCR.dcm"), defer_size=4096).Rows,
    ) == (1955, 1955)


_J2K_BOMB = REPO / "tests/data/fuzz-escapes/dicom/oom-d2e1dfc3b7267e21181e36438e78b3f42dfd888e.bin"
_J2K_BOMB_CHILD = """
import io, sys
import pydicom
from medxray.dicom import read_dicom
from medxray.errors import DicomError
ds = pydicom.dcmread(io.BytesIO(open(sys.argv[1], "rb").read()), force=True)
del ds.PixelPaddingValue  # rescale + LINEAR window, no padding: the chain the reduced level is taken for
buf = io.BytesIO()
ds.save_as(buf)
size = None if sys.argv[2] == "none" else int(sys.argv[2])
try:
    read_dicom(buf.getvalue(), allowed_modalities=None, keep_raw=False, reduce_to=size)
    print("READ")
except DicomError as exc:
    print(str(exc)[:160])
# VmHWM: this process's own peak (ru_maxrss of RUSAGE_SELF would include the forking parent's RSS)
print("MAXRSS_KB", [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0])
"""


@pytest.mark.parametrize("reduce_to", ["none", "224"])
def test_oversized_jpeg_2000_codestream_is_refused_on_the_reduced_route_too(reduce_to):
    """make fuzz's codestream bomb (a 512x512 header over a codestream declaring 2818560x512), given a
    window so the reduced JPEG 2000 route is taken: its declared size is checked before glymur runs, as
    on the full route before its codec (without the check glymur decoded it: 12.6 s, peak RSS 1,495 MB)."""
    r = subprocess.run(
        [sys.executable, "-c", _J2K_BOMB_CHILD, str(_J2K_BOMB), reduce_to],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].startswith("decode_failed: ") and "declares 2818560x512x1" in lines[0], r
    rss_mb = int(lines[-1].split()[1]) / 1024
    assert rss_mb < 500, f"peak RSS {rss_mb:.0f} MB"


# The wrapper's own ru_maxrss includes pytest's RSS (inherited at fork); its children's do not: they start
# from the small wrapper. RUSAGE_CHILDREN is the largest of the scorer and its (waited-for) decode worker.
WRAP = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def _score(folder: Path, out: Path, checkpoint: Path) -> tuple[int, float, str]:
    """Run the real CLI; (exit code, peak RSS in MB of the scorer or any of its workers, stderr)."""
    cmd = [
        sys.executable,
        "-c",
        WRAP,
        sys.executable,
        "-m",
        "medxray.cli",
        "score-dicom",
        str(folder),
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--workers",
        "1",
        "--backend",
        "torch",
        "--cams",
        "none",
        "--no-progress",
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    line = [x for x in r.stdout.splitlines() if x.startswith("MAXRSS_KB")][-1]
    return r.returncode, int(line.split()[1]) / 1024, r.stderr


@pytest.mark.slow
def test_score_dicom_refuses_the_1mb_deflate_bomb_with_bounded_rss(tmp_path, scoring_checkpoint):
    import csv

    base, with_bomb = tmp_path / "base", tmp_path / "bomb"
    for d in (base, with_bomb):
        d.mkdir()
        (d / "rg1_deflated.dcm").write_bytes(deflated_rg1())
    (with_bomb / "bomb.dcm").write_bytes(deflate_bomb("pixel_length"))
    rc0, rss0, err0 = _score(base, tmp_path / "out0", scoring_checkpoint)
    rc1, rss1, err1 = _score(with_bomb, tmp_path / "out1", scoring_checkpoint)
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])  # README: 0 when the run completes
    with open(tmp_path / "out1" / "results.csv", newline="") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert rows["bomb.dcm"]["status"] == "error" and rows["bomb.dcm"]["reason"].startswith("too_large: ")
    assert rows["rg1_deflated.dcm"]["status"] == "ok"
    print(f"score-dicom peak RSS: {rss0:.0f} MB without the bomb, {rss1:.0f} MB with it (+{rss1 - rss0:.0f} MB)")
    assert rss1 - rss0 < RSS_BOUND_MB, (rss0, rss1)
