"""Atheris (libFuzzer) harness for the project's two file readers; run by tests/fuzz/run.py.

    python tests/fuzz/harness.py dicom|image [libFuzzer options] CORPUS_DIR [SEED_DIR ...]

Targets: ``dicom`` feeds the bytes to :func:`medxray.dicom.read_dicom` (any modality, so every
input reaches the decoder); ``image`` to :func:`medxray.data.imageio.decode_image`. The
contract under test: the reader's own error type (``DicomError`` / ``DataError``) is the only
exception that leaves it. Any other exception, a codec panic (a BaseException) included, is an
*escape*: the input is saved as ``tests/data/fuzz-escapes/<target>/<sha1>.bin`` (a regression
test from then on) and fuzzing goes on, so one run collects every escape it finds. medxray,
pydicom and PIL are instrumented for coverage.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parents[2]
ESCAPES = REPO / "tests" / "data" / "fuzz-escapes"

with atheris.instrument_imports(include=["medxray", "pydicom", "PIL"]):
    # The readers import pydicom and PIL lazily: import them here so they are instrumented too.
    import PIL.BmpImagePlugin  # noqa: F401
    import PIL.Image  # noqa: F401
    import PIL.ImageOps  # noqa: F401
    import PIL.JpegImagePlugin  # noqa: F401
    import PIL.PngImagePlugin  # noqa: F401
    import PIL.TiffImagePlugin  # noqa: F401
    import pydicom  # noqa: F401
    import pydicom.encaps  # noqa: F401
    import pydicom.pixels  # noqa: F401

    from medxray.data.imageio import decode_image
    from medxray.dicom import read_dicom
    from medxray.errors import DataError, DicomError

_seen: set[str] = set()


def _record(target: str, data: bytes, exc: BaseException) -> None:
    digest = hashlib.sha1(data).hexdigest()
    if digest in _seen:
        return
    _seen.add(digest)
    folder = ESCAPES / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{digest}.bin").write_bytes(data)
    sys.stderr.write(f"\nESCAPE {target} {digest} {type(exc).__name__}: {str(exc)[:200]!r}\n")
    sys.stderr.flush()


def _run(target: str, data: bytes) -> None:
    try:
        if target == "dicom":
            read_dicom(data, allowed_modalities=None)
        else:
            decode_image(data, name="fuzz")
    except (DicomError, DataError):
        pass
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - the escape this harness hunts for
        _record(target, data, exc)


def main() -> None:
    target = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    if target not in ("dicom", "image"):
        sys.exit("usage: harness.py dicom|image [libFuzzer options] CORPUS_DIR [SEED_DIR ...]")
    warnings.simplefilter("ignore")  # pydicom/PIL warn on every oddity; this process only fuzzes
    logging.disable(logging.CRITICAL)
    os.environ.setdefault("RUST_BACKTRACE", "0")
    atheris.Setup(sys.argv, lambda data: _run(target, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
