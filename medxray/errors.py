"""Errors a user can cause.

Every user-facing failure is a :class:`MedxrayError` subclass carrying one message that says
what was wrong and what to do. The CLI prints that message and exits with code 2 instead of
showing a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os


class MedxrayError(Exception):
    """Base class of errors caused by input, configuration or environment (exit code 2)."""

    exit_code = 2


class ConfigError(MedxrayError, ValueError):
    """A bad option, flag, config key or model name."""


class WeightsError(MedxrayError):
    """Pretrained weights that cannot be found, downloaded, or do not fit the model."""


class CheckpointError(MedxrayError):
    """A checkpoint file that is missing, corrupt, unsafe or for another architecture."""


class DataError(MedxrayError):
    """A data root, manifest, label file or image that cannot be used."""


class ImageValueError(DataError, ValueError):
    """An image array whose dtype or value range is not a grayscale radiograph's (:mod:`medxray.modelinput`)."""


class DicomError(MedxrayError):
    """A DICOM file that cannot be turned into a 2-D grayscale image (the reason says why)."""


class InputShapeError(MedxrayError, ValueError):
    """A tensor fed to a model with the wrong number of dimensions or channels."""


class OutputError(MedxrayError):
    """An output folder that cannot be written: read-only, full, or not ours to write."""


# errno values that say the place written to is the problem (not the data, not a bug)
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
NOT_WRITABLE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def output_error(exc: OSError, folder: str | os.PathLike) -> OutputError | None:
    """The one-line :class:`OutputError` for a failed write into ``folder``, or None when ``exc``
    is not about the place written to (then it stays what it is).

    ENOSPC / EDQUOT / EFBIG: "no space left on FOLDER: free space and re-run the same command";
    EROFS / EACCES / EPERM: "output folder FOLDER is not writable (...)".
    """
    why = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    if exc.errno in NO_SPACE_ERRNOS:
        return OutputError(f"no space left on {folder}: free space and re-run the same command ({why})")
    if exc.errno in NOT_WRITABLE_ERRNOS:
        return OutputError(
            f"output folder {folder} is not writable ({why}); make it writable or choose another "
            "output folder, then re-run the same command"
        )
    return None
