"""Recognising and loading a DICOM file: content sniffing, size-limited reading, parsing, truncation.

* :func:`sniff_dicom` / :func:`is_dicom_file`: DICOM by content (the ``DICM`` marker after the
  128-byte preamble, or a raw data set starting with group 0002/0008), never by extension;
* :func:`read_source`: the bytes of a path, bytes object or binary stream, with a size limit;
* :func:`parse_dataset`: pydicom's parse inside the refusal net, the Transfer Syntax UID checked,
  a file cut short found from the element offsets pydicom recorded (:func:`check_not_truncated`).

* a Deflated Explicit VR Little Endian body is inflated under a ceiling first
  (:mod:`medxray.dicom.inflate`), never by pydicom.

Must not import the reader, the VOI code or the writers; only :mod:`medxray.dicom.codes`,
:mod:`medxray.dicom.header`, :mod:`medxray.dicom.inflate`, :mod:`medxray.limits` and
:mod:`medxray.errors` of medxray.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from pathlib import Path
from typing import IO, Any, Union

from medxray.dicom.codes import TOO_LARGE, TRUNCATED, UNREADABLE, UNSUPPORTED, one_line, refusal
from medxray.dicom.header import scrub_phi, transfer_syntax
from medxray.errors import DicomError

log = logging.getLogger(__name__)

DicomSource = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes]]

_UNDEFINED = 0xFFFFFFFF
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)

# recognising and reading
# ---------------------------------------------------------------------------------------------


def sniff_dicom(head: bytes) -> str | None:
    """Tell from the first bytes whether this is DICOM: ``"part10"``, ``"raw"`` (no preamble) or None.

    Raw data sets (older modalities, some archives) start directly with an element of group
    0002 or 0008; explicit-VR ones have a VR after the tag, implicit ones a small length.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "part10"
    if len(head) < 8:
        return None
    for endian in "<>":
        group, _elem = struct.unpack(endian + "HH", head[:4])
        if group not in (0x0002, 0x0008):
            continue
        if head[4:6] in _VRS:
            return "raw"
        (length,) = struct.unpack(endian + "I", head[4:8])
        if length <= 0x4000:
            return "raw"
    return None


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Cheap content check (reads 132 bytes); used to tell DICOM from other files in a folder."""
    try:
        with open(path, "rb") as fh:
            return sniff_dicom(fh.read(132)) is not None
    except OSError:
        return False


def read_source(source: DicomSource, max_bytes: int) -> tuple[bytes, str]:
    """Return the file content and a display name (never the patient: the caller's path)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = "<bytes>"
    elif isinstance(source, (str, os.PathLike)):
        p = Path(source)
        try:
            size = p.stat().st_size
        except OSError as exc:
            raise refusal(UNREADABLE, f"cannot open the file ({exc.strerror or type(exc).__name__})") from None
        if size > max_bytes:
            raise refusal(TOO_LARGE, f"the file is {size / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit")
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise refusal(UNREADABLE, f"cannot read the file ({exc.strerror or type(exc).__name__})") from None
        name = p.name
    elif hasattr(source, "read"):
        if hasattr(source, "seek"):
            try:
                source.seek(0)
            except (OSError, ValueError):
                pass
        data = source.read(max_bytes + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("read_dicom needs a binary file object")
        if len(data) > max_bytes:
            raise refusal(TOO_LARGE, f"the upload is above the {max_bytes / 2**20:.0f} MiB limit")
        data = bytes(data)
        name = str(getattr(source, "name", "<stream>"))
    else:
        raise TypeError(f"read_dicom takes a path, bytes or a binary file object, not {type(source).__name__}")
    if len(data) > max_bytes:
        raise refusal(
            TOO_LARGE, f"the data is {len(data) / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit"
        )
    return data, name


def element_end(el: Any) -> int | None:
    """File offset just past a raw element, or None when pydicom no longer knows it."""
    tell = getattr(el, "value_tell", None)
    length = getattr(el, "length", None)
    if tell is None or length is None:
        return None
    if length == _UNDEFINED:
        value = getattr(el, "value", None)
        if not isinstance(value, (bytes, bytearray)):
            return None
        return tell + len(value) + 8  # + the sequence delimitation item
    return tell + length


def check_not_truncated(ds: Any, size: int, kind: str) -> None:
    """pydicom reads a cut file silently; find the cut from the element offsets it recorded."""
    meta = getattr(ds, "file_meta", None)
    if kind == "part10" and meta is not None:
        group_len = meta.get("FileMetaInformationGroupLength")
        if group_len is not None and not isinstance(group_len, int):
            raise refusal(
                UNREADABLE,
                "the File Meta Information Group Length (0002,0000) is not one number "
                f"(a {type(group_len).__name__}: wrong VR or a damaged header)",
            )
        if group_len is not None and size < 132 + 12 + int(group_len):
            raise refusal(TRUNCATED, "the file ends inside its DICOM header (it was cut short or damaged)")
    if len(ds) == 0:
        raise refusal(TRUNCATED, "the file ends before its data set is complete (cut short or damaged)")
    ends: dict[Any, int | None] = {}
    for tag in ds.keys():
        end = element_end(ds.get_item(tag))
        if end is not None and end > size:
            raise refusal(TRUNCATED, f"the file ends inside element {tag} (it was cut short or damaged)")
        ends[tag] = end
    known = [e for e in ends.values() if e is not None]
    last_tag = max(ends)
    if known and ends[last_tag] is not None and max(known) < size:
        # pydicom stops quietly at a partial element header or an unterminated sequence.
        raise refusal(
            TRUNCATED, f"the file ends {size - max(known)} bytes into an incomplete element (cut short or damaged)"
        )


def parse_dataset(data: bytes, kind: str, max_pixels: int | None = None) -> Any:
    """Parse ``data`` (sniffed as ``kind``) with pydicom; header damage and truncation are refusals.

    A Deflated Explicit VR Little Endian data set (PS3.5 A.5) is inflated here under the ceiling
    of :func:`medxray.dicom.inflate.inflate_deflated` (``max_pixels``: the pixel limit, None for
    :func:`medxray.limits.pixel_limit`) before pydicom sees it: pydicom's own reading inflates the
    whole stream first, whatever it holds.
    """
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    body_size = len(data)
    try:
        deflated = _read_deflated(data, kind, max_pixels)
        if deflated is not None:
            ds, body_size = deflated
        else:
            ds = pydicom.dcmread(io.BytesIO(data), force=(kind == "raw"))
    except DicomError:
        raise
    except Exception as exc:  # pydicom raises many types for damaged headers
        raise refusal(
            UNREADABLE, f"the file looks like DICOM but its header cannot be parsed ({type(exc).__name__})"
        ) from None
    try:
        meta = ds.file_meta
        transfer_syntax(ds)
        # a deflated body's offsets are offsets into the inflated bytes: checked against their length
        check_not_truncated(ds, body_size, "raw" if deflated is not None else kind)
    except DicomError:
        raise
    except Exception as exc:  # pydicom converts values lazily: damage surfaces here
        raise refusal(
            UNREADABLE,
            f"the header cannot be interpreted ({type(exc).__name__}: {one_line(scrub_phi(str(exc), ds), 160)})",
        ) from None
    if "TransferSyntaxUID" not in meta:
        # Raw data sets carry no meta group: the encoding pydicom detected defines the syntax.
        el = ds.get_item("PixelData") if "PixelData" in ds else None
        if el is not None and getattr(el, "length", 0) == _UNDEFINED:
            raise refusal(UNSUPPORTED, "compressed pixel data without a transfer syntax; the codec is unknown")
        implicit, little = getattr(ds, "original_encoding", (True, True))
        implicit = True if implicit is None else implicit
        little = True if little is None else little
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    return ds


# ---------------------------------------------------------------------------------------------


def _read_deflated(data: bytes, kind: str, max_pixels: int | None) -> tuple[Any, int] | None:
    """(data set, inflated body size) for a Deflated Explicit VR Little Endian file, else None.

    The File Meta group is read the way ``dcmread`` reads it (pydicom's ``read_preamble`` and
    ``_read_file_meta_info``: the same decision on what the transfer syntax is), the body is
    inflated by :func:`~medxray.dicom.inflate.inflate_deflated` and parsed from memory.
    """
    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

    from medxray.dicom.inflate import DEFLATED_TS, inflate_deflated
    from medxray.limits import pixel_limit

    fp: Any = DicomBytesIO(data)  # pydicom's readers are typed for BinaryIO; DicomBytesIO is one at run time
    preamble = read_preamble(fp, kind == "raw")
    file_meta = _read_file_meta_info(fp)
    ts = file_meta.get("TransferSyntaxUID", None)
    if not isinstance(ts, str) or ts.strip("\x00 ") != DEFLATED_TS:
        return None
    body, report = inflate_deflated(memoryview(data)[fp.tell() :], pixel_limit(max_pixels))
    log.debug(
        "deflated data set: %d bytes inflated to %d (ceiling %d)",
        report.compressed_bytes,
        report.inflated_bytes,
        report.ceiling_bytes,
    )
    body_fp: Any = DicomBytesIO(body)
    dataset = read_dataset(body_fp, is_implicit_VR=False, is_little_endian=True)
    ds = FileDataset("", dataset, preamble=preamble, file_meta=file_meta, is_implicit_VR=False, is_little_endian=True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds, len(body)


def read_header_bounded(path: str | os.PathLike, max_pixels: int | None = None, defer_size: int | None = None) -> Any:
    """A file's pydicom data set for header checks, with a deflated body inflated under the reader's ceiling.

    For code outside the reader that needs a header from an untrusted file (the DICOM node checks
    Rows/Columns at receipt): ``pydicom.dcmread(path, defer_size=defer_size)`` for every transfer
    syntax but Deflated Explicit VR Little Endian, whose body ``dcmread`` would inflate whole; that
    one is inflated by :func:`medxray.dicom.inflate.inflate_deflated` (``max_pixels``: the pixel
    limit, None for :func:`medxray.limits.pixel_limit`). Raises :class:`DicomError` (``too_large``,
    ``truncated``, ``unreadable``) for a deflated body past its ceiling or damaged; pydicom's own
    exceptions otherwise, as ``dcmread`` does.
    """
    import pydicom

    with open(path, "rb") as fh:
        head = fh.read(132)
        kind = sniff_dicom(head) or "part10"
        fh.seek(0)
        if not _meta_says_deflated(fh, kind):
            return pydicom.dcmread(path, defer_size=defer_size, force=(kind == "raw"))
    data = Path(path).read_bytes()
    deflated = _read_deflated(data, kind, max_pixels)
    if deflated is None:  # the meta changed between the two reads: parse what is there now
        return pydicom.dcmread(io.BytesIO(data), force=(kind == "raw"))
    return deflated[0]


def _meta_says_deflated(fh: Any, kind: str) -> bool:  # a binary file object (IO[bytes])
    """Whether the File Meta group at the start of ``fh`` names Deflated Explicit VR Little Endian."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    from medxray.dicom.inflate import DEFLATED_TS

    try:
        read_preamble(fh, kind == "raw")
        ts = _read_file_meta_info(fh).get("TransferSyntaxUID", None)
    except Exception:  # no meta group we can read: dcmread decides (and finds no deflate either)
        return False
    return isinstance(ts, str) and ts.strip("\x00 ") == DEFLATED_TS
