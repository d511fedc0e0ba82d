"""Decoding at the size the model needs: JPEG 2000 resolution levels and integer box reduction.

The model sees a 224x224 (generally S x S) area resize of the display image, so decoding a
2000 x 2000 radiograph at full resolution and then averaging it down wastes most of the work.
Two cheaper routes give (within a stated tolerance, tests/test_speed_reduce.py) the same picture:

* JPEG 2000 (transfer syntaxes 1.2.840.10008.1.2.4.90/.91): the codestream is a wavelet
  pyramid, and OpenJPEG can stop the inverse transform ``r`` levels early (its ``reduce``
  factor, ISO/IEC 15444-1 Annex F). :func:`decode_j2k_reduced` picks the largest ``r`` (at most
  the codestream's decomposition levels and :data:`MAX_J2K_LEVEL`) whose image keeps a short side >= S. The binding is
  glymur (``Jp2kr[::2**r, ::2**r]``), which handles 16-bit grayscale. Checked, and not used:
  pylibjpeg-openjpeg 2.6 ``decode``/``decode_pixel_data`` take no reduce option; Pillow 13's
  ``Jpeg2KImageFile.reduce`` computes the reduced size by rounding instead of OpenJPEG's
  ceiling, so it fails ("broken data stream") on RG1's 1841 columns for every ``r >= 2``.
* then, for every transfer syntax, :func:`area_reduce`: the deterministic list's area resize
  to S x S (adaptive average pooling bins) computed on the stored integers with integer sums
  (one slice sum per output row, then per column), before any float work. A plain integer box mean followed
  by a second resize was tried and rejected: resampling twice blurs edges differently
  (max abs diff 0.17 on RG1 for an 8x box) while the exact bins cost no more.

When reducing before the LUTs is equivalent (:func:`affine_window`): the modality rescale is
affine, and a LINEAR (width > 1) or LINEAR_EXACT window is ``clamp(affine)``, so the box mean of
the windowed values is the window of the box mean of the stored values clipped to the window's
affine part; :func:`area_reduce_clipped` computes that clip exactly with integer sums and two
per-bin counts (issue 19: without the clip, boxes straddling a clip point differed by up to 0.19 on
pydicom's MR2 and CT files). A Modality LUT Sequence, a VOI LUT Sequence, a SIGMOID window and Pixel
Padding are not affine, and the automatic window (no usable window in the file) needs full-size
percentiles: for those the reader reduces the float display image after the LUTs instead, which
is exactly the box-average of what the full path produces.

A JPEG 2000 resolution level has no such choice: it already averaged the stored values (with the
wavelet's low-pass, not a box). So the reader uses it only when the chain is affine, the
codestream's sign agrees with Pixel Representation (else the full decode reinterprets the samples
and a low-pass of the other reading is meaningless: J2K_pixelrep_mismatch), the reduced values stay
inside the window's affine part (else it decodes in full) and ``r <= MAX_J2K_LEVEL``. The stated
tolerance (max 0.25 / mean 0.01) is checked file by file in tests/test_dicom_reduce_equivalence.py.

Must not import the reader (which imports this), torch or MONAI (only :mod:`medxray.dicom.voi` and
:mod:`medxray.dicom.codestream`); glymur is imported lazily.
Failures of the reduced JPEG 2000 route return None (the reader then decodes in full, inside its
own refusal net), so nothing but the reader's errors ever leaves.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from typing import Any

import numpy as np

from medxray.dicom.codestream import declared_size, j2k_signed
from medxray.dicom.voi import window_from_file, window_problem

log = logging.getLogger(__name__)

#: JPEG 2000 Image Compression (Lossless Only) and JPEG 2000 Image Compression (PS3.5 A.4.4).
J2K_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})


#: Most resolution levels skipped. A level's low-pass over 2**r x 2**r pixels smooths away the extremes a
#: window clips: at r = 4 MR2_J2KI's largest value comes out 516 instead of 600, under the window's top
#: (530) although the full image crosses it, and the picture differs by up to 0.53. Up to r = 3 every JPEG 2000
#: file of the corpora keeps the stated tolerance (tests/test_dicom_reduce_equivalence.py).
MAX_J2K_LEVEL = 3


def can_reduce(shape: tuple[int, int], size: int | None) -> bool:
    """True when an (H, W) image is larger than size x size on some side and >= it on both."""
    return bool(size) and min(shape) >= int(size) and max(shape) > int(size)  # type: ignore[arg-type]


def j2k_levels(codestream: bytes) -> int | None:
    """Decomposition levels of a JPEG 2000 codestream's main header (the smallest over COD and COC).

    ISO/IEC 15444-1 A.6.1 (COD) / A.6.2 (COC): the SPcod/SPcoc byte after the style fields.
    Returns None when the main header cannot be walked (the caller then decodes in full).
    """
    b = codestream
    if b[:2] != b"\xff\x4f":  # SOC
        return None
    pos, levels, csiz = 2, [], 0
    while pos + 4 <= len(b):
        marker = b[pos : pos + 2]
        if marker == b"\xff\x90":  # SOT: end of the main header
            break
        length = int.from_bytes(b[pos + 2 : pos + 4], "big")
        if length < 2 or b[pos] != 0xFF:
            return None
        body = b[pos + 4 : pos + 2 + length]
        if marker == b"\xff\x51" and len(body) >= 36:  # SIZ: Csiz decides the COC component field size
            csiz = int.from_bytes(body[34:36], "big")
        elif marker == b"\xff\x52" and len(body) >= 6:  # COD: Scod, SGcod (4 bytes), SPcod levels
            levels.append(body[5])
        elif marker == b"\xff\x53":  # COC: Ccoc (1 or 2 bytes), Scoc, SPcoc levels
            off = 2 if csiz >= 257 else 1
            if len(body) > off + 1:
                levels.append(body[off + 1])
        pos += 2 + length
    return min(levels) if levels else None


def j2k_reduce_level(rows: int, cols: int, min_side: int, levels: int) -> int:
    """Largest r <= levels whose reduced image (ceil(side / 2**r), OpenJPEG's rule) keeps min side >= min_side."""
    r = 0
    while r < levels and min(math.ceil(rows / 2 ** (r + 1)), math.ceil(cols / 2 ** (r + 1))) >= min_side:
        r += 1
    return r


def decode_j2k_reduced(ds: Any, min_side: int) -> np.ndarray | None:
    """The stored values of a single-frame JPEG 2000 data set at a reduced resolution level, or None.

    Shape (ceil(Rows / 2**r), ceil(Columns / 2**r)) with the largest r <= :data:`MAX_J2K_LEVEL` that
    keeps the short side >= ``min_side`` (see the module docstring); the codec's integer container type. None
    when the file is not JPEG 2000, when no level can be skipped, when glymur or its OpenJPEG
    library is missing, or when the reduced decode fails or disagrees with the header: the
    caller then decodes at full resolution (and refuses broken data there, with its reason).
    """
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if ts not in J2K_TRANSFER_SYNTAXES:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    try:
        from pydicom.encaps import get_frame

        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
        size = declared_size(frame)
        if size is None or size[0] * size[1] * max(size[2], 1) > rows * cols:
            return None  # a codestream larger than the header: the full route refuses it before decoding
        signed = j2k_signed(frame)
        if signed is not None and signed != (int(ds.get("PixelRepresentation", 0) or 0) == 1):
            # the full decode reinterprets the samples by Pixel Representation (pydicom); a low-pass
            # level of the codestream's own reading averages values that wrap there: not the same picture
            return None
        levels = j2k_levels(frame)
        r = j2k_reduce_level(rows, cols, min_side, min(levels or 0, MAX_J2K_LEVEL))
        if r == 0:
            return None
        import glymur

        arr = _glymur_read(glymur, frame, r)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # no glymur/OpenJPEG, or a codestream the reduced route cannot read
        log.debug("reduced JPEG 2000 decode not used (%s); decoding in full", type(exc).__name__)
        return None
    want = (math.ceil(rows / 2**r), math.ceil(cols / 2**r))
    if arr.ndim != 2 or arr.shape != want or not np.issubdtype(arr.dtype, np.integer):
        log.debug("reduced JPEG 2000 decode gave %s %s, expected %s; decoding in full", arr.shape, arr.dtype, want)
        return None
    return arr


def _glymur_read(glymur: Any, frame: bytes, r: int) -> np.ndarray:
    """glymur reads files only: the codestream goes to a private temporary file (tmpfs when present)."""
    tmpdir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(suffix=".j2k", dir=tmpdir)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(frame)
        step = 2**r
        return np.asarray(glymur.Jp2kr(path)[::step, ::step])
    finally:
        os.unlink(path)


def _axis_bins(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive-average-pooling bins along one axis: [lo_i, hi_i), lo = floor(i*n/S), hi = ceil((i+1)*n/S)."""
    i = np.arange(size, dtype=np.int64)
    return (i * n) // size, -((-(i + 1) * n) // size)


def _axis_sums(x: np.ndarray, n: int, size: int, axis: int, acc: Any) -> tuple[np.ndarray, np.ndarray]:
    """Sums over the pooling bins of one axis (n >= size), in ``acc``; and the bin lengths.

    One contiguous slice sum per bin: for 16-bit data with a 32-bit accumulator this runs at
    memory speed (``np.add.reduceat`` casts element by element and is ~5x slower here).
    """
    lo, hi = _axis_bins(n, size)
    if axis == 0:
        sums = np.stack([x[a:b].sum(axis=0, dtype=acc) for a, b in zip(lo, hi)])
    else:
        sums = np.stack([x[:, a:b].sum(axis=1, dtype=acc) for a, b in zip(lo, hi)], axis=1)
    return sums, hi - lo


def _accumulator(dtype: np.dtype, terms: int) -> Any:
    """The narrowest exact accumulator for ``terms`` values of ``dtype`` (floats: float64)."""
    if not np.issubdtype(dtype, np.integer):
        return np.float64
    info = np.iinfo(dtype)
    if info.min >= 0 and info.max * terms < 2**32:
        return np.uint32
    if max(abs(info.min), info.max) * terms < 2**31:
        return np.int32
    return np.int64


def _box_sums(arr: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``arr`` over the S x S area bins (integers summed exactly, floats in float64), and the bin sizes."""
    h, w = arr.shape
    rows, n_r = _axis_sums(arr, h, s, 0, _accumulator(arr.dtype, -(-h // s) + 1))
    wide = np.int64 if np.issubdtype(rows.dtype, np.integer) else np.float64
    sums, n_c = _axis_sums(rows, w, s, 1, wide)
    return sums, n_r[:, None] * n_c[None, :]


def area_reduce(arr: np.ndarray, size: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Area resize (H, W) -> (size, size) float32 for H, W >= size, on the values as given.

    The bins are those of ``torch.nn.functional.interpolate(mode="area")`` (adaptive average
    pooling), so on the display image this IS the deterministic list's resize; on stored
    integers it is that resize moved before an affine LUT. Separable: rows then columns, integers
    summed exactly in integers, floats in float64. ``exclude`` (boolean, e.g. padding)
    comes back as "every pixel of the cell excluded". Raises ValueError when a side is < size.
    """
    h, w = arr.shape
    s = int(size)
    if h < s or w < s:
        raise ValueError(f"area_reduce shrinks only: {h}x{w} is smaller than {s}x{s}")
    if (h, w) == (s, s):
        return np.asarray(arr, dtype=np.float32), exclude
    sums, counts = _box_sums(arr, s)
    out = (sums / counts).astype(np.float32)
    red = None
    if exclude is not None:
        ex, _ = _box_sums(exclude.view(np.uint8) if exclude.dtype == bool else exclude, s)
        red = ex == counts
    return out, red


def area_reduce_clipped(arr: np.ndarray, size: int, lo: float, hi: float) -> np.ndarray | None:
    """The area resize of ``clip(arr, lo, hi)`` for an integer ``arr``, summed in integers; float32 (size, size).

    A LINEAR / LINEAR_EXACT window is ``clamp(affine(x))``: the box mean of the windowed values is
    the window of the box mean of the values clipped to the window's affine part ``[lo, hi]``
    (stored units), exactly. With ``L = ceil(lo)``, ``H = floor(hi)``, an integer clipped to
    [L, H] differs from the real clip only where it was below L (by ``lo - L``) or above H (by
    ``hi - H``), so the bins' sums get those two corrections from per-bin counts. None when the
    window holds no whole stored value (``L > H``) or all values lie on one side of it: the
    caller then reduces the display image. Same shape rules as :func:`area_reduce`.
    """
    vmin, vmax = int(arr.min()), int(arr.max())
    if lo <= vmin and vmax <= hi:
        return area_reduce(arr, size)[0]
    low, high = math.ceil(lo), math.floor(hi)
    if low > high or low > vmax or high < vmin:
        return None
    s = int(size)
    clipped = np.clip(arr, max(low, vmin), min(high, vmax))
    sums, counts = _box_sums(clipped, s)
    total = sums.astype(np.float64)
    if vmin < low:
        below, _ = _box_sums((arr < low).view(np.uint8), s)
        total += (lo - low) * below
    if vmax > high:
        above, _ = _box_sums((arr > high).view(np.uint8), s)
        total += (hi - high) * above
    return (total / counts).astype(np.float32)


def affine_window(ds: Any, modality_lut: Any, padding: tuple[int, int] | None) -> tuple[float, float] | None:
    """The stored values ``[lo, hi]`` over which the file's LUT chain is affine, or None when it is not affine.

    Affine modality rescale, a LINEAR (width > 1) or LINEAR_EXACT window in the file that the
    standard defines (PS3.3 C.11.2.1.2/3), no VOI LUT Sequence, no pixel padding. Outside
    ``[lo, hi]`` the window clamps to 0 or 1. Without a file window the automatic window's
    percentiles must come from the full-size pixels, so that case is not affine here.
    """
    if modality_lut[0] != "rescale" or padding is not None or ds.get("VOILUTSequence", None):
        return None
    stored = window_from_file(ds)
    if stored is None or stored[2] not in ("LINEAR", "LINEAR_EXACT") or window_problem(*stored) is not None:
        return None
    center, width, func = stored
    if func == "LINEAR":
        if width <= 1.0:  # width 1 is a threshold (a step), not affine anywhere
            return None
        r0, r1 = center - 0.5 - (width - 1.0) / 2.0, center - 0.5 + (width - 1.0) / 2.0
    else:
        r0, r1 = center - width / 2.0, center + width / 2.0
    _, slope, intercept = modality_lut
    a, b = (r0 - intercept) / slope, (r1 - intercept) / slope
    return (a, b) if a <= b else (b, a)
