"""The one pixel limit applied wherever an image is decoded: :func:`pixel_limit`.

Every decoder (the PNG/JPEG decoder :func:`medxray.data.imageio.decode_image` used by training,
evaluation, the cache and the app; the DICOM reader :func:`medxray.dicom.read_dicom` used by the
scorer, the app and the DICOM node) refuses an image whose width x height exceeds the limit,
reading only its header (decompression bombs: a 688 KB PNG can hold 13300 x 13300 RGBA).

How it is set, first match wins:

1. an explicit argument (``max_pixels=`` of the decoders, ``score-dicom --max-pixels``);
2. the environment variable ``MEDXRAY_MAX_PIXELS`` (a positive integer);
3. :data:`DEFAULT_MAX_PIXELS` (60 MP: a 43 x 43 cm detector at 0.1 mm is 18.5 MP, a NIH PNG 1 MP).

Why an environment variable rather than one more option per command: images are decoded in
many processes (spawned decode workers, DataLoader workers, the cache builder's pool, the
Streamlit server) started from many entry points; the environment reaches all of them without
threading an option through datasets, transforms, caches and app settings, and it is read at
each call, so nothing is fixed at import time.

Must not import anything but :mod:`medxray.errors` (decode workers import it; they import no torch).
"""

from __future__ import annotations

import os

from medxray.errors import ConfigError

DEFAULT_MAX_PIXELS = 60_000_000
MAX_PIXELS_ENV = "MEDXRAY_MAX_PIXELS"


def pixel_limit(max_pixels: int | None = None) -> int:
    """The pixel limit (width x height) in force: ``max_pixels`` if given, else
    ``$MEDXRAY_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`.

    Raises :class:`ConfigError` for a value that is not a positive integer.
    """
    if max_pixels is not None:
        source, raw = "max_pixels", max_pixels
    else:
        raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
        if not raw:
            return DEFAULT_MAX_PIXELS
        source = MAX_PIXELS_ENV
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ConfigError(f"{source} must be a positive whole number of pixels (width x height), got {raw!r}")
    return value
