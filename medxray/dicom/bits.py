"""Where the stored bits are: Bits Stored / High Bit checked against the decoded values.

DICOM PS3.5 8.1.1 / PS3.3 C.7.6.3.1: a stored value occupies ``BitsStored`` bits ending at
``HighBit`` inside ``BitsAllocated``. Writers get this wrong in two ways that give a plausible
but wrong picture when the header is trusted blindly:

* the values are wider than Bits Stored (a JPEG 2000 codestream with 16-bit samples under a
  header saying 12): masking to 12 bits wraps the image into bands;
* the bits above Bits Stored hold overlay planes or junk (old files): those must be masked.

:func:`locate_stored_bits` decides by evidence, on the decoded values: if nothing lies outside
the header's range the header is right; otherwise the reading with far fewer neighbour jumps
larger than half the stored range wins (masked wide values wrap into bands, overlay planes or
junk make the unmasked values jump). When neither reading is clearly smoother it refuses with
``bit_depth_mismatch``. A High Bit above ``BitsStored - 1`` moves the stored bits up (shifted
down here); if the low bits under it are not empty, the values sit low and High Bit is wrong.

Must not import the reader, the VOI code, pydicom, or anything of medxray outside
:mod:`medxray.dicom.codes`.
"""

from __future__ import annotations

import numpy as np

from medxray.dicom.codes import BIT_DEPTH_MISMATCH, bit_depth_warning, high_bit_warning, refusal

# One reading must have this many times fewer jumps than the other to be chosen.
_EVIDENCE_RATIO = 4.0
_SAMPLE_PIXELS = 250_000


def _sample(arr: np.ndarray) -> np.ndarray:
    step = max(1, int(np.sqrt(arr.size / _SAMPLE_PIXELS)))
    return arr[::step, ::step].astype(np.int64)


def jump_fraction(values: np.ndarray, jump: int) -> float:
    """Fraction of horizontal and vertical neighbour pairs of a 2-D int array differing by more than ``jump``."""
    if values.shape[0] < 2 or values.shape[1] < 2:
        return 0.0
    dx = np.abs(np.diff(values, axis=1)) > jump
    dy = np.abs(np.diff(values, axis=0)) > jump
    return float(dx.sum() + dy.sum()) / float(dx.size + dy.size)


def _mask(values: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """The low ``bits`` bits of ``values`` (sign-extended when signed)."""
    if signed:
        shift = 64 - bits
        return (values.astype(np.int64) << shift) >> shift
    return values & ((1 << bits) - 1)


def _bits_needed(values: np.ndarray, signed: bool) -> int:
    lo, hi = int(values.min()), int(values.max())
    if signed:
        return max(int(max(hi, -lo - 1)).bit_length() + 1, 1)
    return max(hi.bit_length(), 1)


def locate_stored_bits(
    arr: np.ndarray, bits_stored: int, high_bit: int | None, signed: bool, compressed: bool
) -> tuple[np.ndarray, str | None]:
    """Stored values of ``arr`` (decoded integers, 2-D) and a warning text, or a refusal.

    ``compressed`` says the values came out of a codec (no overlay bits can ride along there,
    so values past Bits Stored can only be real samples); native values get the smoothness
    test. Raises :class:`~medxray.errors.DicomError` ``bit_depth_mismatch`` when the evidence is
    ambiguous. The returned array has the input's dtype family (int64 only when values were
    shifted or sign-extended from the sample width).
    """
    container = arr.dtype.itemsize * 8
    warning: str | None = None
    high_bit = bits_stored - 1 if high_bit is None else high_bit
    shift = high_bit + 1 - bits_stored
    if 0 < shift and high_bit < container:
        low = arr & np.array((1 << shift) - 1, dtype=arr.dtype)
        if not low.any():
            arr = arr >> shift  # arithmetic for signed dtypes: the sign bit is High Bit
        elif _bits_needed(arr, signed) <= bits_stored:
            warning = high_bit_warning(high_bit, bits_stored)
        else:
            raise refusal(
                BIT_DEPTH_MISMATCH,
                f"High Bit {high_bit} with Bits Stored {bits_stored} leaves bits 0-{shift - 1} empty, "
                "but they hold values; the header does not say where the stored bits are",
            )
    if bits_stored >= container:
        return arr, warning
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    vmin, vmax = int(arr.min()), int(arr.max())
    if lo <= vmin and vmax <= hi:
        return arr, warning
    if signed:
        above = arr >> bits_stored  # 0 or -1 where the bits above are empty or a sign extension
        if int(above.min()) >= -1 and int(above.max()) <= 0:
            # PS3.5 8.1.1: bits above High Bit carry nothing; writers that leave them 0 for negative
            # values are common and conformant: sign-extend from Bits Stored.
            return _mask(arr, bits_stored, True).astype(arr.dtype, copy=False), warning
    needed = _bits_needed(arr, signed)
    if compressed:
        evidence = f"the codestream decodes to values {vmin}..{vmax}"
        return arr, bit_depth_warning(bits_stored, needed, evidence)
    # Masking wide values wraps them: neighbours then jump by about 2**BitsStored where the true
    # image crosses a multiple of it. Overlay planes or junk above the stored bits make the
    # unmasked values jump instead. Count jumps above half the stored range in both readings.
    sample = _sample(arr)
    half = 1 << (bits_stored - 1)
    full, masked = jump_fraction(sample, half), jump_fraction(_mask(sample, bits_stored, signed), half)
    if masked == 0.0 or masked * _EVIDENCE_RATIO <= full:  # overlay planes or junk: the header is right
        return _mask(arr, bits_stored, signed).astype(arr.dtype, copy=False), warning
    if full * _EVIDENCE_RATIO <= masked:  # the values really are wider than the header says
        evidence = f"values {vmin}..{vmax}; masked to {bits_stored} bits they wrap into bands"
        return arr, bit_depth_warning(bits_stored, needed, evidence)
    raise refusal(
        BIT_DEPTH_MISMATCH,
        f"the pixel values ({vmin}..{vmax}) need {needed} bits but Bits Stored says {bits_stored}, and the "
        "values do not show whether the extra bits are image or overlay; fix Bits Stored / High Bit",
    )
