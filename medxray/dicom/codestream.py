"""Image size a compressed frame declares, read from its codestream before any decoding.

A JPEG 2000 codestream (SIZ marker, ISO/IEC 15444-1 A.5.1) or a JPEG / JPEG-LS one (SOFn /
SOF55 frame header, ISO/IEC 10918-1 B.2.2, 14495-1 C.2.2) states its own width, height and
component count. A codec allocates what the codestream says, not what the DICOM header says: a
512x512 header over a codestream declaring 37000x39000 makes the decoder ask for gigabytes
(found by `make fuzz`). :func:`declared_size` reads those numbers so the reader can refuse a
frame that declares more samples than Rows x Columns x Samples per Pixel before decoding it.

Must not import anything of medxray (pure byte parsing); pydicom is not needed here.
"""

from __future__ import annotations

import struct

_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # + JPEG-LS SOF55
_SEARCH_BYTES = 1 << 16


def declared_size(frame: bytes) -> tuple[int, int, int] | None:
    """(columns, rows, components) the codestream declares, or None when it has no JPEG/J2K header."""
    head = bytes(frame[:_SEARCH_BYTES])
    at = head.find(_J2K_SOC_SIZ)
    if at >= 0 and len(head) >= at + 42:
        # SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", head[at + 8 : at + 24])
        (csiz,) = struct.unpack(">H", head[at + 40 : at + 42])
        return max(xsiz - xo, 0), max(ysiz - yo, 0), csiz
    at = head.find(b"\xff\xd8")
    if at < 0:
        return None
    pos = at + 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            pos += 1
            continue
        marker = head[pos + 1]
        if marker == 0xFF or marker == 0x00 or 0xD0 <= marker <= 0xD8 or marker == 0x01:
            pos += 1 if marker == 0xFF else 2
            continue
        (length,) = struct.unpack(">H", head[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS and pos + 10 <= len(head):
            rows, cols = struct.unpack(">HH", head[pos + 5 : pos + 9])
            return cols, rows, head[pos + 9]
        if marker == 0xDA or length < 2:  # start of scan before a frame header: nothing to read
            return None
        pos += 2 + length
    return None


def j2k_signed(frame: bytes) -> bool | None:
    """Whether a JPEG 2000 codestream's first component is signed (SIZ Ssiz bit 7, ISO/IEC 15444-1 A.5.1).

    None when the frame has no SIZ marker segment at its start.
    """
    head = bytes(frame[:_SEARCH_BYTES])
    at = head.find(_J2K_SOC_SIZ)
    if at < 0 or len(head) < at + 43:
        return None
    return bool(head[at + 42] & 0x80)
