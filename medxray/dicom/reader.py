"""DICOM file -> display-ready float image in [0, 1] plus safe metadata, or a clear refusal.

What the scorer and the app both need from a radiograph, decided once here:

* files are recognised by content (the ``DICM`` marker after the 128-byte preamble, or a raw
  data set without preamble starting with group 0002/0008), never by extension;
* the modality LUT (rescale slope/intercept, or a Modality LUT Sequence) gives ``raw``; the VOI
  LUT Sequence or the window stored in the file (first value when multi-valued, VOI LUT Function
  honoured) maps it to [0, 1]; a window the standard does not define, or none, gives the
  automatic 0.5-99.5 percentile window over the pixels that are not padding (Pixel Padding
  Value / Range Limit), and padding is shown black; MONOCHROME1 is inverted so that air is
  always dark; BitsStored, HighBit and PixelRepresentation are honoured and checked against the
  decoded values (:mod:`medxray.dicom.bits`);
* anything that is not a single 2-D grayscale image the model can read is refused with a
  :class:`~medxray.errors.DicomError` whose ``code`` names the case and whose message says why;
  so is an image that comes out with fewer than a handful of grey levels (``flat_image``).
  Every failure inside, a codec's panic included (a BaseException), becomes such a refusal;
  only KeyboardInterrupt and SystemExit pass.

Metadata is an allow-list of non-identifying attributes: patient names, IDs and birth dates
never leave this package.

This module holds the decoding of stored values (:func:`decode_stored`, the one place codecs are
called) and :func:`read_dicom`/:class:`DicomImage`. Sniffing, size-limited loading and parsing
live in :mod:`medxray.dicom.source`, where the stored bits are in :mod:`medxray.dicom.bits`,
header checks in :mod:`medxray.dicom.header`, the LUTs and windows in
:mod:`medxray.dicom.voi`, refusal codes in :mod:`medxray.dicom.codes`. Must not import the
writers (:mod:`medxray.dicom.sr`) nor anything of medxray outside this package and
:mod:`medxray.errors`; only :class:`DicomError` may leave it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from medxray.dicom.bits import locate_stored_bits
from medxray.dicom.codes import (
    DECODE_FAILED,
    FLAT_IMAGE,
    LATERAL_WARNING,
    NOT_DICOM,
    SHORT_PIXEL_DATA,
    TOO_LARGE,
    UNREADABLE,
    UNSUPPORTED,
    one_line,
    refusal,
    voi_lut_ignored_warning,
    window_undefined_warning,
)
from medxray.dicom.codestream import declared_size
from medxray.dicom.header import (
    check_image,
    int_attr,
    is_lateral_view,
    padding_range,
    safe_meta,
    scrub_phi,
)
from medxray.dicom.reduce import affine_window, area_reduce, area_reduce_clipped, can_reduce, decode_j2k_reduced
from medxray.dicom.source import DicomSource, is_dicom_file, parse_dataset, read_source, sniff_dicom
from medxray.dicom.voi import (
    MIN_GREY_LEVELS,
    apply_modality_lut,
    apply_voi_lut_seq,
    apply_window,
    auto_window,
    grey_levels,
    modality_lut_params,
    window_from_file,
    window_problem,
)
from medxray.errors import DicomError
from medxray.limits import DEFAULT_MAX_PIXELS as SHARED_DEFAULT_MAX_PIXELS
from medxray.limits import pixel_limit

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ALLOWED_MODALITIES",
    "DEFAULT_MAX_PIXELS",
    "DicomImage",
    "DicomSource",
    "decode_stored",
    "is_dicom_file",
    "read_dicom",
    "sniff_dicom",
]


DEFAULT_ALLOWED_MODALITIES: tuple[str, ...] = ("CR", "DX")
# The pixel limit is shared with the PNG/JPEG decoder (medxray.limits: 60 MP unless $MEDXRAY_MAX_PIXELS
# says otherwise); the largest chest detectors are ~4300x4300 (18.5 MP).
DEFAULT_MAX_PIXELS = SHARED_DEFAULT_MAX_PIXELS
# File-size guard checked before anything is read into memory (uncompressed limit x 4 bytes + header).
_MAX_FILE_BYTES_PER_PIXEL = 4
_MAX_HEADER_BYTES = 64 << 20


@dataclass
class DicomImage:
    """One decoded radiograph.

    ``pixels`` is what the model and a viewer see (float32, [0, 1], air dark). ``raw`` holds the
    modality-LUT values (e.g. for re-windowing in the app); it is computed on first access so the
    batch scorer does not pay for a second full-size float copy it never uses.
    """

    pixels: np.ndarray
    meta: dict[str, Any]
    window: tuple[float, float] | None
    warnings: list[str] = field(default_factory=list)
    is_lateral: bool = False
    _stored: np.ndarray | None = field(default=None, repr=False)
    _modality_lut: Any = field(default=None, repr=False)
    _raw: np.ndarray | None = field(default=None, repr=False)

    @property
    def raw(self) -> np.ndarray:
        """Modality-LUT output (rescaled values, e.g. Hounsfield-like units), float32 2-D."""
        if self._raw is None:
            if self._stored is None:
                raise ValueError("this DicomImage was built without its stored values")
            self._raw = apply_modality_lut(self._stored, self._modality_lut)
        return self._raw

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))

    def display_uint8(self) -> np.ndarray:
        """The display image as 8-bit grayscale (for PNG overlays and thumbnails)."""
        return np.rint(self.pixels * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------


def decode_stored(ds: Any) -> np.ndarray:
    """The pixel container values as a 2-D integer array: a view of native bytes, or the codec's output.

    The one place codecs are called (via pydicom). Bits Stored / High Bit are not applied here
    (:func:`medxray.dicom.bits.locate_stored_bits` does, with evidence). Any codec failure but
    KeyboardInterrupt/SystemExit, a Rust panic included, becomes ``decode_failed`` with the
    codec's message on one line, patient identifiers blanked.
    """
    ts = ds.file_meta.TransferSyntaxUID
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits_alloc = int(ds.BitsAllocated)
    signed = (int_attr(ds, "PixelRepresentation", 0) or 0) == 1
    if not ts.is_compressed:
        # Native pixels (a deflated body is already inflated by the parse): a direct view of the bytes
        # (pydicom's generic path copies several times).
        raw = ds.get_item("PixelData").value
        if raw is None:
            raw = ds.PixelData
        nbytes = bits_alloc // 8
        expected = rows * cols * nbytes
        if len(raw) < expected:
            raise refusal(
                SHORT_PIXEL_DATA,
                f"the pixel data holds {len(raw)} bytes but the header promises {cols}x{rows}x{bits_alloc} bits "
                f"= {expected} bytes",
            )
        dtype = np.dtype(f"{'i' if signed else 'u'}{nbytes}").newbyteorder("<" if ts.is_little_endian else ">")
        arr = np.frombuffer(raw, dtype=dtype, count=rows * cols).reshape(rows, cols)
        arr = arr.astype(dtype.newbyteorder("="), copy=False)
    else:
        check_codestream_size(ds, rows, cols)
        try:
            arr = ds.pixel_array
        except (KeyboardInterrupt, SystemExit):
            raise
        except MemoryError:
            raise refusal(TOO_LARGE, "not enough memory to decode this image") from None
        except BaseException as exc:  # codec errors come in many types; pyo3 panics are BaseExceptions
            text = one_line(scrub_phi(str(exc), ds)) or "no message"
            raise refusal(
                DECODE_FAILED, f"cannot decode the {ts.name} pixel data ({type(exc).__name__}: {text})"
            ) from None
        if arr.ndim != 2 or arr.shape != (rows, cols):
            raise refusal(UNSUPPORTED, f"decoded pixel array has shape {arr.shape}, expected ({rows}, {cols})")
    if not np.issubdtype(arr.dtype, np.integer):
        raise refusal(UNSUPPORTED, f"decoded pixels are {arr.dtype}, expected integers")
    if signed and arr.dtype.kind == "u":  # a codec that returns the container unsigned
        arr = arr.view(arr.dtype.str.replace("u", "i"))
    return arr


def check_codestream_size(ds: Any, rows: int, cols: int) -> None:
    """Refuse a compressed frame whose codestream declares more samples than the header's image.

    A codec allocates what the codestream declares (:mod:`medxray.dicom.codestream`); a frame
    larger than Rows x Columns x Samples per Pixel would make it ask for gigabytes.
    """
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # damaged encapsulation: the decoder reports it with its own message
        return
    size = declared_size(frame)
    spp = int_attr(ds, "SamplesPerPixel", 1) or 1
    if size is not None and size[0] * max(size[1], 1) * max(size[2], 1) > cols * rows * spp:
        raise refusal(
            DECODE_FAILED,
            f"the {ds.file_meta.TransferSyntaxUID.name} codestream declares "
            f"{size[0]}x{size[1]}x{size[2]} samples but the header says "
            f"{cols}x{rows}x{spp}; not decoded (the codec would allocate for the larger)",
        )


# ---------------------------------------------------------------------------------------------
# public entry
# ---------------------------------------------------------------------------------------------


def read_dicom(
    source: DicomSource,
    *,
    allowed_modalities: Iterable[str] | None = DEFAULT_ALLOWED_MODALITIES,
    max_pixels: int | None = None,
    keep_raw: bool = True,
    reduce_to: int | None = None,
) -> DicomImage:
    """Read one DICOM radiograph (path, bytes or binary file object) into a :class:`DicomImage`.

    ``allowed_modalities=None`` accepts any modality (tests, research use). ``max_pixels``: the
    largest Rows x Columns accepted (None: :func:`medxray.limits.pixel_limit`). ``keep_raw=False``
    frees the stored values once the display image exists (the batch scorer never needs ``raw``).
    ``reduce_to=S`` returns ``pixels`` already area-resized to S x S (images larger than S), decoded
    the cheap way: a JPEG 2000 resolution level, integer sums before the LUTs (:mod:`medxray.dicom.reduce`).
    Raises :class:`DicomError` (with ``.code``) for anything it refuses.
    """
    max_pixels = pixel_limit(max_pixels)
    max_bytes = max_pixels * _MAX_FILE_BYTES_PER_PIXEL + _MAX_HEADER_BYTES
    data, _name = read_source(source, max_bytes)
    if not data:
        raise refusal(NOT_DICOM, "the file is empty (0 bytes)")
    kind = sniff_dicom(data[:132])
    if kind is None:
        raise refusal(NOT_DICOM, "not a DICOM file (no DICM marker and no DICOM data set at the start)")
    ds = None
    try:
        ds = parse_dataset(data, kind, max_pixels)
        del data
        return _decode(ds, allowed_modalities, max_pixels, keep_raw, reduce_to)
    except DicomError:
        raise
    except MemoryError:
        raise refusal(TOO_LARGE, "not enough memory to decode this image") from None
    except Exception as exc:  # a damaged attribute surfaces lazily in pydicom, in many types
        text = one_line(scrub_phi(str(exc), ds), 160) if ds is not None else ""
        raise refusal(
            UNREADABLE, f"a header attribute cannot be interpreted ({type(exc).__name__}{': ' + text if text else ''})"
        ) from None


def _decode(
    ds: Any,
    allowed_modalities: Iterable[str] | None,
    max_pixels: int | None,
    keep_raw: bool,
    reduce_to: int | None = None,
) -> DicomImage:
    """Checks, decoding, LUTs and window for a parsed data set (see :func:`read_dicom`)."""
    check_image(ds, allowed_modalities, max_pixels)
    ts = ds.file_meta.TransferSyntaxUID
    meta = safe_meta(ds, ts)
    warns: list[str] = []
    bits_alloc = int(ds.BitsAllocated)
    pad = padding_range(ds)
    mlut = modality_lut_params(ds)
    # reduce_to: the stored values' range over which the LUT chain is affine (None: not affine)
    affine = affine_window(ds, mlut, pad) if reduce_to else None

    def stored_values(reduced: bool) -> tuple[np.ndarray, str | None]:
        container = decode_j2k_reduced(ds, reduce_to) if reduced else None  # type: ignore[arg-type]
        container = decode_stored(ds) if container is None else container
        return locate_stored_bits(
            container,
            int_attr(ds, "BitsStored", bits_alloc) or bits_alloc,
            int_attr(ds, "HighBit"),
            meta["pixel_representation"] == 1,
            compressed=bool(ts.is_compressed),
        )

    # A JPEG 2000 resolution level averages the stored values before the LUTs: the same picture only
    # when the chain is affine and the window clips nothing (the clipped cases decode in full).
    stored, bits_note = stored_values(affine is not None)
    if (
        affine is not None
        and stored.shape != (int(ds.Rows), int(ds.Columns))
        and (int(stored.min()) < affine[0] or int(stored.max()) > affine[1])
    ):
        stored, bits_note = stored_values(False)
    if bits_note:
        warns.append(bits_note)
    pad_mask = ((stored >= pad[0]) & (stored <= pad[1])) if pad is not None else None
    if pad_mask is not None and not pad_mask.any():
        pad_mask = None
    # reduce_to: area-resize the stored integers now (clipped to the window's affine part, which is exact)
    # when the LUT chain is affine, else the display image below
    shrink = can_reduce(stored.shape, reduce_to)
    early = False
    if shrink and affine is not None:
        small = area_reduce_clipped(stored, reduce_to, *affine)  # type: ignore[arg-type]
        if small is not None:
            stored, early = small, True
    lateral = is_lateral_view(ds, meta)

    raw = apply_modality_lut(stored, mlut)
    window: tuple[float, float] | None = None
    pixels: np.ndarray | None = None
    if ds.get("VOILUTSequence", None):
        try:
            pixels = apply_voi_lut_seq(raw, ds)
            meta["window_source"] = "voi_lut"
        except DicomError as exc:
            warns.append(voi_lut_ignored_warning(str(exc).split(": ", 1)[-1]))
    if pixels is None:
        from_file = window_from_file(ds)
        problem = window_problem(*from_file) if from_file is not None else None
        if from_file is not None and problem is None:
            center, width, func = from_file
            meta["window_source"] = "file"
        else:
            if from_file is not None:
                warns.append(window_undefined_warning(*from_file, problem or ""))
            auto = auto_window(raw, pad_mask)
            if auto is None:
                raise refusal(FLAT_IMAGE, "every pixel is padding (Pixel Padding Value / Range Limit): no image left")
            (center, width), func = auto, "LINEAR_EXACT"
            meta["window_source"] = "percentile"
        meta["voi_lut_function"] = func
        window = (float(center), float(width))
        pixels = apply_window(raw, center, width, func, out=None if keep_raw else raw)
    if meta["photometric"] == "MONOCHROME1":
        np.subtract(np.float32(1.0), pixels, out=pixels)
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    if pad_mask is not None:
        pixels[pad_mask] = 0.0  # padding is background: black whatever the photometric interpretation
        meta["padding_fraction"] = float(pad_mask.mean())
    if shrink and not early:
        pixels, pad_mask = area_reduce(pixels, reduce_to, pad_mask)  # type: ignore[arg-type]
    levels = grey_levels(pixels, pad_mask)
    if levels < MIN_GREY_LEVELS:
        shown = f"window {window[0]:g}/{window[1]:g} {meta['voi_lut_function']}" if window else "the VOI LUT"
        raise refusal(
            FLAT_IMAGE,
            f"after the LUTs and {shown} the image has {levels} grey level(s); "
            f"a radiograph has many: the image is blank or the window hides it",
        )
    if lateral:
        warns.append(LATERAL_WARNING)
    return DicomImage(
        pixels=pixels,
        meta=meta,
        window=window,
        warnings=warns,
        is_lateral=lateral,
        _stored=stored if keep_raw else None,
        _modality_lut=mlut,
        _raw=raw if keep_raw and raw is not pixels else None,
    )
