"""Errors a user can cause.

Every user-facing failure is a :class:`MedxrayError` subclass carrying one message that says
what was wrong and what to do. The CLI prints that message and exits with code 2 instead of
showing a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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


class DicomError(MedxrayError):
    """A DICOM file that cannot be turned into a 2-D grayscale image (the reason says why)."""


class InputShapeError(MedxrayError, ValueError):
    """A tensor fed to a model with the wrong number of dimensions or channels."""
