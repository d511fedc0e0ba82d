"""Deflated Explicit VR Little Endian data sets (PS3.5 A.5) inflated under a stated ceiling.

pydicom inflates a deflated data set whole (one ``zlib.decompress``) inside ``dcmread``: a 1 MB
file of deflated zeros becomes 1 GiB in memory before any check can look at its header
(issue 19 item 1). :func:`inflate_deflated` inflates the body in steps instead
(``zlib.decompressobj`` with ``max_length``) and stops at a ceiling taken from the header it
has inflated so far:

* until the top-level Pixel Data (7FE0,0010) element starts, at most :data:`METADATA_BUDGET`
  bytes (a chest CR header is a few KB; vendors' private blocks rarely reach 1 MB);
* from there, the image the header declares, Rows x Columns x Samples per Pixel x
  Number of Frames x Bits Allocated / 8 bytes, plus :data:`METADATA_BUDGET` again for what
  follows the pixels (padding, digital signatures).

So nothing inflated ever exceeds ``2 x METADATA_BUDGET + the declared image size``, and the
declared image is itself bounded by the pixel limit (:func:`medxray.limits.pixel_limit`): an
image whose samples exceed it is refused before its pixel data is inflated. Past a ceiling the
data set is refused with ``too_large``; a deflate stream that stops early is ``truncated``;
one that is not deflate, or a body this walk cannot follow, is ``unreadable``.

The walk reads element headers only (tag, VR, length; PS3.5 7.1.2 for explicit VR, 7.5 for
sequences and items of undefined length, implicit VR inside undefined-length UN, PS3.5 6.2.2),
and the few Image Pixel attributes it needs (PS3.3 C.7.6.3). The inflated bytes are then parsed
by pydicom (:func:`medxray.dicom.source.parse_dataset`).

Must not import anything of medxray but :mod:`medxray.dicom.codes`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from medxray.dicom.codes import TOO_LARGE, TRUNCATED, UNREADABLE, refusal

#: Deflated Explicit VR Little Endian (PS3.5 A.5).
DEFLATED_TS = "1.2.840.10008.1.2.1.99"
#: Inflated bytes allowed for the elements before the pixel data, and again for those after it.
METADATA_BUDGET = 8 << 20
_IN_CHUNK = 1 << 16  # compressed bytes fed per step
_OUT_STEP = 1 << 20  # inflated bytes asked for per step
_MAX_DEPTH = 64  # nested sequences followed (the reader's parse refuses deeper damage itself)
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
# Image Pixel attributes the ceiling is computed from (US, except Number of Frames: IS).
_ROWS, _COLUMNS, _SAMPLES, _BITS, _FRAMES = 0x00280010, 0x00280011, 0x00280002, 0x00280100, 0x00280008
_WANTED = frozenset({_ROWS, _COLUMNS, _SAMPLES, _BITS, _FRAMES})


class _NeedMore(Exception):
    """The inflated bytes so far end inside the element being walked."""


@dataclass(frozen=True)
class InflateReport:
    """What :func:`inflate_deflated` did: bytes in and out, and the ceiling it enforced."""

    compressed_bytes: int
    inflated_bytes: int
    ceiling_bytes: int


def _header(buf: bytearray, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element at ``pos``."""
    if pos + 8 > len(buf):
        raise _NeedMore
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = group << 16 | elem
    if group == 0xFFFE or implicit:
        return tag, None, struct.unpack_from("<I", buf, pos + 4)[0], pos + 8
    vr = bytes(buf[pos + 4 : pos + 6])
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _NeedMore
        return tag, vr, struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
    if not (vr.isalpha() and vr.isupper()):
        raise ValueError(f"no VR at element ({group:04X},{elem:04X})")
    return tag, vr, struct.unpack_from("<H", buf, pos + 6)[0], pos + 8


def _past(buf: bytearray, end: int) -> int:
    if end > len(buf):
        raise _NeedMore
    return end


def _skip_undefined(buf: bytearray, pos: int, implicit: bool, depth: int) -> int:
    """Offset just past the Sequence Delimitation Item closing the undefined-length value at ``pos``."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"sequences nested more than {_MAX_DEPTH} deep")
    while True:
        tag, _, length, pos = _header(buf, pos, implicit)
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise ValueError(f"element {tag:08X} where a sequence item was expected")
        if length != _UNDEFINED:
            pos = _past(buf, pos + length)
            continue
        while True:  # an item of undefined length: elements up to the Item Delimitation Item
            tag, vr, length, pos = _header(buf, pos, implicit)
            if tag == _ITEM_END:
                break
            if length == _UNDEFINED:
                pos = _skip_undefined(buf, pos, implicit or vr == b"UN", depth + 1)
            else:
                pos = _past(buf, pos + length)


def _value(buf: bytearray, tag: int, start: int, end: int) -> int | None:
    raw = bytes(buf[start:end])
    try:
        if tag == _FRAMES:
            return int(raw.decode("ascii").strip("\x00 ").split("\\")[0] or "1")
        return struct.unpack_from("<H", raw)[0] if len(raw) >= 2 else None
    except (ValueError, UnicodeDecodeError):
        return None


class _Walk:
    """Top-level elements of the inflated body, walked as bytes arrive, up to the Pixel Data."""

    def __init__(self) -> None:
        self.pos = 0
        self.attrs: dict[int, int] = {}
        self.pixel: tuple[int, int] | None = None  # (value offset, value length)

    def advance(self, buf: bytearray) -> None:
        while self.pixel is None:
            try:
                tag, vr, length, vpos = _header(buf, self.pos, False)
                if tag == _PIXEL_DATA:
                    self.pixel = (vpos, length)
                    return
                if length == _UNDEFINED:
                    end = _skip_undefined(buf, vpos, vr == b"UN", 0)
                else:
                    end = _past(buf, vpos + length)
            except _NeedMore:
                return
            if tag in _WANTED:
                value = _value(buf, tag, vpos, end)
                if value is not None:
                    self.attrs[tag] = value
            self.pos = end

    def image_bytes(self) -> tuple[int, int]:
        """(samples, bytes) of the image the header declares (all frames)."""
        a = self.attrs
        samples = a.get(_ROWS, 0) * a.get(_COLUMNS, 0) * max(a.get(_SAMPLES, 1), 1) * max(a.get(_FRAMES, 1), 1)
        return samples, samples * max(-(-a.get(_BITS, 16) // 8), 1)


def inflate_deflated(
    body: bytes | memoryview, max_pixels: int, budget: int = METADATA_BUDGET
) -> tuple[bytes, InflateReport]:
    """Inflate a deflated data set body (the bytes after the File Meta group) under a ceiling.

    ``body``: raw deflate (RFC 1951, no zlib header), as PS3.5 A.5 specifies. ``max_pixels``:
    the pixel limit; an image whose Rows x Columns x Samples x Frames exceeds it is refused
    before its pixel data is inflated. ``budget``: bytes allowed before and after the pixel data
    (:data:`METADATA_BUDGET`). Returns the inflated bytes (Explicit VR Little Endian) and an
    :class:`InflateReport`. Raises :class:`~medxray.errors.DicomError` ``too_large`` past the
    ceiling, ``truncated`` for a stream that ends early, ``unreadable`` for one that is not deflate.
    """
    src = memoryview(body)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    walk = _Walk()
    ceiling = budget
    fed = 0
    while not inflater.eof:
        if inflater.unconsumed_tail:
            data: bytes | memoryview = inflater.unconsumed_tail
        elif fed < len(src):
            data = src[fed : fed + _IN_CHUNK]
            fed += len(data)
        else:
            break
        try:
            piece = inflater.decompress(data, max(1, min(_OUT_STEP, ceiling + 1 - len(out))))
        except zlib.error as exc:
            raise refusal(UNREADABLE, f"the deflated data set is not a valid deflate stream ({exc})") from None
        out += piece
        if len(out) > ceiling:
            where = "its pixel data" if walk.pixel is not None else "the elements before its pixel data"
            raise refusal(
                TOO_LARGE,
                f"the deflated data set inflates past {ceiling / 2**20:.1f} MiB ({where}: "
                f"the header's image plus {budget / 2**20:.0f} MiB for other elements); "
                "not inflated further (a decompression bomb or a damaged file)",
            )
        if walk.pixel is None:
            try:
                walk.advance(out)
            except ValueError as exc:
                raise refusal(UNREADABLE, f"the inflated data set cannot be walked ({exc})") from None
            if walk.pixel is not None:
                ceiling = _pixel_ceiling(walk, max_pixels, budget)
    if not inflater.eof:
        raise refusal(
            TRUNCATED,
            f"the deflated data set ends before its deflate stream does "
            f"({len(out)} bytes inflated): the file was cut short or damaged",
        )
    return bytes(out), InflateReport(fed - len(inflater.unused_data), len(out), ceiling)


def _pixel_ceiling(walk: _Walk, max_pixels: int, budget: int) -> int:
    """The inflation ceiling once the Pixel Data element's header is reached; refuses early what cannot pass."""
    assert walk.pixel is not None
    start, length = walk.pixel
    samples, nbytes = walk.image_bytes()
    if samples > max_pixels:
        a = walk.attrs
        raise refusal(
            TOO_LARGE,
            f"the image is {a.get(_COLUMNS, 0)}x{a.get(_ROWS, 0)} x {max(a.get(_SAMPLES, 1), 1)} "
            f"samples x {max(a.get(_FRAMES, 1), 1)} frames = {samples / 1e6:.1f} M samples, "
            f"above the {max_pixels / 1e6:.1f} MP limit (not inflated)",
        )
    if length != _UNDEFINED and length > nbytes + budget:
        raise refusal(
            TOO_LARGE,
            f"the pixel data element declares {length} bytes but the header's image needs "
            f"{nbytes}; not inflated (a decompression bomb or a damaged file)",
        )
    return start + nbytes + budget
