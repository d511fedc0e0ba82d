"""Decoding at the size the model needs: JPEG 2000 resolution levels and integer box reduction.

The model sees a 224x224 (generally S x S) area resize of the display image, so decoding a
2000 x 2000 radiograph at full resolution and then averaging it down wastes most of the work.
Two cheaper routes give (within a stated tolerance, tests/test_speed_reduce.py) the same picture:

* JPEG 2000 (transfer syntaxes 1.2.840.10008.1.2.4.90/.91): the codestream is a wavelet
  pyramid, and OpenJPEG can stop the inverse transform ``r`` levels early (its ``reduce``
  factor, ISO/IEC 15444-1 Annex F). :func:`decode_j2k_reduced` picks the largest ``r`` (at most
  the codestream's decomposition levels) whose image keeps a short side >= S. The binding is
  glymur (``Jp2kr[::2**r, ::2**r]``), which handles 16-bit grayscale. Checked, and not used:
  pylibjpeg-openjpeg 2.6 ``decode``/``decode_pixel_data`` take no reduce option; Pillow 13's
  ``Jpeg2KImageFile.reduce`` computes the reduced size by rounding instead of OpenJPEG's
  ceiling, so it fails ("broken data stream") on RG1's 1841 columns for every ``r >= 2``.
* then, for every transfer syntax, :func:`area_reduce`: the deterministic list's area resize
  to S x S (adaptive average pooling bins) computed on the stored integers with integer sums
  (one slice sum per output row, then per column), before any float work. A plain integer box mean followed
  by a second resize was tried and rejected: resampling twice blurs edges differently
  (max abs diff 0.17 on RG1 for an 8x box) while the exact bins cost no more.

When reducing before the LUTs is equivalent: the modality rescale is affine, so the box mean of
rescaled values is the rescale of the box mean (:func:`linear_chain`); a LINEAR or LINEAR_EXACT
window is affine between its clip points, so only boxes straddling a clip point differ. A
Modality LUT Sequence, a VOI LUT Sequence, a SIGMOID window and Pixel Padding are not
affine, and the automatic window (no usable window in the file) needs full-size percentiles: for those the reader reduces the float display image after the LUTs instead, which is
exactly the box-average of what the full path produces (JPEG 2000 has no such choice: its
reduced level already averaged the stored values; the tests bound the error).

Must not import the reader (which imports this), torch or MONAI (only :mod:`medxray.dicom.voi`); glymur is imported lazily.
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

from medxray.dicom.voi import window_from_file, window_problem

log = logging.getLogger(__name__)

#: JPEG 2000 Image Compression (Lossless Only) and JPEG 2000 Image Compression (PS3.5 A.4.4).
J2K_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})


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
        marker = b[pos:pos + 2]
        if marker == b"\xff\x90":  # SOT: end of the main header
            break
        length = int.from_bytes(b[pos + 2:pos + 4], "big")
        if length < 2 or b[pos] != 0xFF:
            return None
        body = b[pos + 4:pos + 2 + length]
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

    Shape (ceil(Rows / 2**r), ceil(Columns / 2**r)) with the largest r that keeps the short
    side >= ``min_side`` (see the module docstring); the codec's integer container type. None
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
        levels = j2k_levels(frame)
        r = j2k_reduce_level(rows, cols, min_side, levels or 0)
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


def area_reduce(arr: np.ndarray, size: int, exclude: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Area resize (H, W) -> (size, size) float32 for H, W >= size, on the values as given.

    The bins are those of ``torch.nn.functional.interpolate(mode="area")`` (adaptive average
    pooling), so on the display image this IS the deterministic list's resize; on stored
    integers it is that resize moved before an affine LUT. Separable: rows then columns, integers summed exactly in integers, floats in float64. ``exclude`` (boolean, e.g. padding)
    comes back as "every pixel of the cell excluded". Raises ValueError when a side is < size.
    """
    h, w = arr.shape
    s = int(size)
    if h < s or w < s:
        raise ValueError(f"area_reduce shrinks only: {h}x{w} is smaller than {s}x{s}")
    if (h, w) == (s, s):
        return np.asarray(arr, dtype=np.float32), exclude
    rows, n_r = _axis_sums(arr, h, s, 0, _accumulator(arr.dtype, -(-h // s) + 1))
    wide = np.int64 if np.issubdtype(rows.dtype, np.integer) else np.float64
    sums, n_c = _axis_sums(rows, w, s, 1, wide)
    counts = n_r[:, None] * n_c[None, :]
    out = (sums / counts).astype(np.float32)
    red = None
    if exclude is not None:
        ex_rows, _ = _axis_sums(exclude.view(np.uint8) if exclude.dtype == bool else exclude, h, s, 0, np.int64)
        ex, _ = _axis_sums(ex_rows, w, s, 1, np.int64)
        red = ex == counts
    return out, red


def linear_chain(ds: Any, modality_lut: Any, padding: tuple[int, int] | None) -> bool:
    """True when area-resizing the stored values first gives the same picture up to window clipping.

    Affine modality rescale, a usable LINEAR/LINEAR_EXACT window in the file, no VOI LUT
    Sequence, no pixel padding. Without a file window the automatic window's percentiles must
    come from the full-size pixels, so that case (like every non-affine one) reduces after the LUTs.
    """
    if modality_lut[0] != "rescale" or padding is not None or ds.get("VOILUTSequence", None):
        return False
    stored = window_from_file(ds)
    return stored is not None and stored[2] in ("LINEAR", "LINEAR_EXACT") and window_problem(*stored) is None
