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
called), :func:`read_dicom`/:class:`DicomImage`, and the reader's steps as a table of named stages,
:data:`DECODE_STAGES` (as pydicom names its processing steps); a refusal's message ends with the
stage that refused, ``[stage: name]``. Sniffing, size-limited loading and parsing
live in :mod:`medxray.dicom.source`, where the stored bits are in :mod:`medxray.dicom.bits`,
header checks in :mod:`medxray.dicom.header`, the LUTs and windows in
:mod:`medxray.dicom.voi`, refusal codes in :mod:`medxray.dicom.codes`. Must not import the
writers (:mod:`medxray.dicom.sr`) nor anything of medxray outside this package,
:mod:`medxray.errors`, :mod:`medxray.limits` (the pixel limit) and :mod:`medxray.display` (the
one [0, 1] -> uint8 rounding); only :class:`DicomError` may leave it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

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
    invert_monochrome1,
    modality_lut_params,
    window_from_file,
    window_problem,
)
from medxray.display import to_uint8
from medxray.errors import DicomError
from medxray.limits import DEFAULT_MAX_PIXELS as SHARED_DEFAULT_MAX_PIXELS
from medxray.limits import pixel_limit

log = logging.getLogger(__name__)

__all__ = [
    "DECODE_STAGES",
    "DEFAULT_ALLOWED_MODALITIES",
    "DecodeStage",
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
        return to_uint8(self.pixels)


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
    Raises :class:`DicomError` (with ``.code``) for anything it refuses; its message ends with the
    stage that refused, ``[stage: name]`` (:data:`DECODE_STAGES`).
    """
    return _run_stages(_Decoding(source, allowed_modalities, pixel_limit(max_pixels), keep_raw, reduce_to))


# ---------------------------------------------------------------------------------------------
# the reader's stages: a file -> DicomImage, one named step at a time
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Decoding:
    """What the reader's stages hand on to each other for one file (private; one per call)."""

    source: DicomSource
    allowed_modalities: Iterable[str] | None
    max_pixels: int
    keep_raw: bool
    reduce_to: int | None
    data: bytes | None = None
    kind: str = ""
    ds: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    warns: list[str] = field(default_factory=list)
    bits_allocated: int = 0
    padding: tuple[int, int] | None = None
    modality_lut: Any = None
    # reduce_to: the stored values' range over which the LUT chain is affine (None: not affine)
    affine: tuple[float, float] | None = None
    container: np.ndarray | None = None
    stored: np.ndarray | None = None
    pad_mask: np.ndarray | None = None
    shrink: bool = False
    early: bool = False
    lateral: bool = False
    raw: np.ndarray | None = None
    pixels: np.ndarray | None = None
    window: tuple[float, float] | None = None

    def need(self, name: str) -> np.ndarray:
        """The array an earlier stage made (a stage table out of order is a programming error)."""
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"decode stage order: {name} is not computed yet")
        return value


def _read(st: _Decoding) -> None:
    """The file's bytes, size-limited before anything is read into memory (Rows x Columns limit x 4
    bytes + 64 MiB of header), recognised as DICOM by content (PS3.10 7.1 preamble and ``DICM``, or a
    data set without preamble): :mod:`medxray.dicom.source`."""
    max_bytes = st.max_pixels * _MAX_FILE_BYTES_PER_PIXEL + _MAX_HEADER_BYTES
    data, _name = read_source(st.source, max_bytes)
    if not data:
        raise refusal(NOT_DICOM, "the file is empty (0 bytes)")
    kind = sniff_dicom(data[:132])
    if kind is None:
        raise refusal(NOT_DICOM, "not a DICOM file (no DICM marker and no DICOM data set at the start)")
    st.data, st.kind = data, kind


def _parse(st: _Decoding) -> None:
    """The data set, parsed by pydicom (:func:`~medxray.dicom.source.parse_dataset`: damage and
    truncation are refusals); the file's bytes are let go."""
    data, st.data = st.data, None
    st.ds = parse_dataset(data, st.kind, st.max_pixels)  # type: ignore[arg-type]


def _header(st: _Decoding) -> None:
    """Refuse what is not one 2-D grayscale image of an allowed modality and size before any
    pixel is decoded (PS3.3 C.7.6.3 Image Pixel Module: :func:`~medxray.dicom.header.check_image`);
    read the allow-listed, non-identifying metadata (:func:`~medxray.dicom.header.safe_meta`)."""
    check_image(st.ds, st.allowed_modalities, st.max_pixels)
    st.meta = safe_meta(st.ds, st.ds.file_meta.TransferSyntaxUID)
    st.bits_allocated = int(st.ds.BitsAllocated)


def _lut_parameters(st: _Decoding) -> None:
    """Pixel Padding Value / Range Limit (PS3.3 C.7.5.1.1.2) and the Modality LUT (C.11.1), read
    before any pixel; with ``reduce_to``, the stored range over which the LUT chain is affine
    (:func:`~medxray.dicom.reduce.affine_window`)."""
    st.padding = padding_range(st.ds)
    st.modality_lut = modality_lut_params(st.ds)
    st.affine = affine_window(st.ds, st.modality_lut, st.padding) if st.reduce_to else None


def _decompress(st: _Decoding, *, reduced: bool | None = None) -> None:
    """The pixel container (PS3.5 A.4 encapsulated or native, :func:`decode_stored`): a JPEG 2000
    resolution level instead (:func:`~medxray.dicom.reduce.decode_j2k_reduced`) when ``reduce_to``
    is asked and the LUT chain is affine. ``reduced=False``: the whole frame whatever."""
    if reduced is None:
        reduced = st.affine is not None
    container = decode_j2k_reduced(st.ds, st.reduce_to) if reduced else None  # type: ignore[arg-type]
    st.container = decode_stored(st.ds) if container is None else container


def _locate_bits(st: _Decoding) -> tuple[np.ndarray, str | None]:
    return locate_stored_bits(
        st.need("container"),
        int_attr(st.ds, "BitsStored", st.bits_allocated) or st.bits_allocated,
        int_attr(st.ds, "HighBit"),
        st.meta["pixel_representation"] == 1,
        compressed=bool(st.ds.file_meta.TransferSyntaxUID.is_compressed),
    )


def _stored_values(st: _Decoding) -> None:
    """Bits Stored / High Bit / Pixel Representation applied to the container and checked against
    its values (PS3.3 C.7.6.3.1; PS3.5 8.1.1; :func:`~medxray.dicom.bits.locate_stored_bits`).

    A resolution level averages the stored values before the LUTs: the same picture only when the
    window clips nothing, so a reduced frame with values outside the affine range is decoded again
    in full.
    """
    stored, note = _locate_bits(st)
    if (
        st.affine is not None
        and stored.shape != (int(st.ds.Rows), int(st.ds.Columns))
        and (int(stored.min()) < st.affine[0] or int(stored.max()) > st.affine[1])
    ):
        _decompress(st, reduced=False)
        stored, note = _locate_bits(st)
    st.container = None
    st.stored = stored
    if note:
        st.warns.append(note)


def _padding_mask(st: _Decoding) -> None:
    """The stored values that are padding (PS3.3 C.7.5.1.1.2), or None when no pixel is."""
    if st.padding is None:
        return
    stored = st.need("stored")
    mask = (stored >= st.padding[0]) & (stored <= st.padding[1])
    st.pad_mask = mask if mask.any() else None


def _reduce_stored(st: _Decoding) -> None:
    """``reduce_to``: area-resize the stored integers now when the LUT chain is affine, clipped to
    the window's affine part, which is exact (:func:`~medxray.dicom.reduce.area_reduce_clipped`);
    otherwise the display image is resized at the end (:func:`_reduce_display`)."""
    stored = st.need("stored")
    st.shrink = can_reduce(stored.shape, st.reduce_to)
    if st.shrink and st.affine is not None:
        small = area_reduce_clipped(stored, st.reduce_to, *st.affine)  # type: ignore[arg-type]
        if small is not None:
            st.stored, st.early = small, True


def _view(st: _Decoding) -> None:
    """Lateral projection or not (View Position, PS3.3 C.8.11.5; View Code Sequence; descriptions)."""
    st.lateral = is_lateral_view(st.ds, st.meta)


def _modality_lut(st: _Decoding) -> None:
    """Stored values -> modality values (PS3.3 C.11.1: Rescale Slope/Intercept or the LUT Sequence)."""
    st.raw = apply_modality_lut(st.need("stored"), st.modality_lut)


def _voi_lut(st: _Decoding) -> None:
    """The VOI LUT Sequence, when the file has one (PS3.3 C.11.2.1.1); a table that cannot be used
    is a warning, and the window stage decides instead."""
    if not st.ds.get("VOILUTSequence", None):
        return
    try:
        st.pixels = apply_voi_lut_seq(st.need("raw"), st.ds)
        st.meta["window_source"] = "voi_lut"
    except DicomError as exc:
        st.warns.append(voi_lut_ignored_warning(str(exc).split(": ", 1)[-1]))


def _window(st: _Decoding) -> None:
    """Without a VOI LUT: the file's Window Center/Width with its VOI LUT Function (PS3.3 C.11.2.1.2,
    C.11.2.1.3) when the standard defines it, else the 0.5-99.5 percentile window of the pixels that
    are not padding (a warning says why); refuses an image that is all padding."""
    if st.pixels is not None:
        return
    raw, meta = st.need("raw"), st.meta
    from_file = window_from_file(st.ds)
    problem = window_problem(*from_file) if from_file is not None else None
    if from_file is not None and problem is None:
        center, width, func = from_file
        meta["window_source"] = "file"
    else:
        if from_file is not None:
            st.warns.append(window_undefined_warning(*from_file, problem or ""))
        auto = auto_window(raw, st.pad_mask)
        if auto is None:
            raise refusal(FLAT_IMAGE, "every pixel is padding (Pixel Padding Value / Range Limit): no image left")
        (center, width), func = auto, "LINEAR_EXACT"
        meta["window_source"] = "percentile"
    meta["voi_lut_function"] = func
    st.window = (float(center), float(width))
    st.pixels = apply_window(raw, center, width, func, out=None if st.keep_raw else raw)


def _monochrome1(st: _Decoding) -> None:
    """MONOCHROME1 inverted so that air is dark (PS3.3 C.7.6.3.1.2; :func:`~medxray.dicom.voi.invert_monochrome1`)."""
    invert_monochrome1(st.need("pixels"), st.meta["photometric"])


def _padding(st: _Decoding) -> None:
    """Padding shown black whatever the Photometric Interpretation (PS3.3 C.7.5.1.1.2); the display
    image made contiguous float32."""
    pixels = np.ascontiguousarray(st.need("pixels"), dtype=np.float32)
    if st.pad_mask is not None:
        pixels[st.pad_mask] = 0.0
        st.meta["padding_fraction"] = float(st.pad_mask.mean())
    st.pixels = pixels


def _reduce_display(st: _Decoding) -> None:
    """``reduce_to`` when the stored values could not be resized: area-resize the display image
    (:func:`~medxray.dicom.reduce.area_reduce`, the padding mask with it)."""
    if st.shrink and not st.early:
        st.pixels, st.pad_mask = area_reduce(st.need("pixels"), st.reduce_to, st.pad_mask)  # type: ignore[arg-type]


def _grey_levels(st: _Decoding) -> None:
    """Refuse an image with fewer than :data:`~medxray.dicom.voi.MIN_GREY_LEVELS` 8-bit grey levels
    outside the padding (``flat_image``: blank, or a window that hides it)."""
    levels = grey_levels(st.need("pixels"), st.pad_mask)
    if levels < MIN_GREY_LEVELS:
        w = st.window
        shown = f"window {w[0]:g}/{w[1]:g} {st.meta['voi_lut_function']}" if w else "the VOI LUT"
        raise refusal(
            FLAT_IMAGE,
            f"after the LUTs and {shown} the image has {levels} grey level(s); "
            f"a radiograph has many: the image is blank or the window hides it",
        )


@dataclass(frozen=True)
class DecodeStage:
    """One named step of :func:`read_dicom`; ``run`` reads and fills the reader's state and raises
    :class:`DicomError` to refuse (the refusal's message then ends ``[stage: name]``)."""

    name: str
    run: Callable[[_Decoding], None]


#: The reader's steps in order (as pydicom keeps its processing steps in a named list). Output pixels
#: are pinned bit for bit by tests/test_dicom_pinned.py.
DECODE_STAGES: tuple[DecodeStage, ...] = (
    DecodeStage("read", _read),
    DecodeStage("parse", _parse),
    DecodeStage("header", _header),
    DecodeStage("lut_parameters", _lut_parameters),
    DecodeStage("decompress", _decompress),
    DecodeStage("stored_values", _stored_values),
    DecodeStage("padding_mask", _padding_mask),
    DecodeStage("reduce_stored", _reduce_stored),
    DecodeStage("view", _view),
    DecodeStage("modality_lut", _modality_lut),
    DecodeStage("voi_lut", _voi_lut),
    DecodeStage("window", _window),
    DecodeStage("monochrome1", _monochrome1),
    DecodeStage("padding", _padding),
    DecodeStage("reduce_display", _reduce_display),
    DecodeStage("grey_levels", _grey_levels),
)


def _at_stage(exc: DicomError, stage: str) -> DicomError:
    """``exc`` with the stage that refused named at the end of its message (same code)."""
    code = getattr(exc, "code", None) or UNREADABLE
    text = str(exc)
    text = text[len(code) + 2 :] if text.startswith(code + ": ") else text
    return refusal(code, f"{text} [stage: {stage}]")


def _unreadable(exc: Exception, ds: Any, stage: str) -> DicomError:
    """``unreadable`` for a damaged attribute that surfaced (lazily, in pydicom) as ``exc`` in ``stage``;
    the exception's text is shown with the file's patient identifiers blanked (none before parsing)."""
    text = one_line(scrub_phi(str(exc), ds), 160) if ds is not None else ""
    what = f"{type(exc).__name__}{': ' + text if text else ''}"
    return refusal(UNREADABLE, f"a header attribute cannot be interpreted ({what}) [stage: {stage}]")


def _run_stages(st: _Decoding) -> DicomImage:
    """Run :data:`DECODE_STAGES` (see :func:`read_dicom`): every failure but KeyboardInterrupt and
    SystemExit becomes a :class:`DicomError` whose message names the stage."""
    for stage in DECODE_STAGES:
        try:
            stage.run(st)
        except DicomError as exc:
            raise _at_stage(exc, stage.name) from None
        except MemoryError:
            raise refusal(TOO_LARGE, f"not enough memory to decode this image [stage: {stage.name}]") from None
        except Exception as exc:  # a damaged attribute surfaces lazily in pydicom, in many types
            raise _unreadable(exc, st.ds, stage.name) from None
    if st.lateral:
        st.warns.append(LATERAL_WARNING)
    raw, pixels = st.need("raw"), st.need("pixels")
    return DicomImage(
        pixels=pixels,
        meta=st.meta,
        window=st.window,
        warnings=st.warns,
        is_lateral=st.lateral,
        _stored=st.stored if st.keep_raw else None,
        _modality_lut=st.modality_lut,
        _raw=raw if st.keep_raw and raw is not pixels else None,
    )
