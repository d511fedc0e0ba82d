"""The messages between the scorer's worker processes and its engine: frozen, picklable dataclasses.

A decode job (:func:`medxray.scoring.workers.decode_job`) returns a :class:`DecodedImage` or a
:class:`DecodeFailure`; the engine hands a post job a :class:`PostTask` (with an optional
:class:`SRRequest`) and gets a :class:`PostResult` back. Both sides import these types, so a
renamed or missing field is a ``TypeError`` / ``AttributeError`` where it happens, not an empty
``results.csv`` column, and each message checks its own shapes when it is built.

They cross a process boundary by pickle (``concurrent.futures``), so they hold only numpy arrays,
strings, numbers, tuples and plain mappings. Arrays make equality ambiguous, hence ``eq=False``
where a message holds one.

Must not import torch, the engine, the run or the journal (worker processes import this).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence, Union

import numpy as np

__all__ = ["DecodeFailure", "DecodeResult", "DecodedImage", "PostResult", "PostTask", "SRRequest"]


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """One file read and preprocessed by a decode worker.

    ``x``: the network input (3, S, S) float32 (:func:`medxray.modelinput.model_input`).
    ``meta``: the reader's identifier-free header fields (:attr:`medxray.dicom.DicomImage.meta`:
    UIDs, modality, view position, body part, rows, columns ...). ``window``: (center, width) of
    the VOI LUT the reader applied, or None. ``warnings``: the reader's (and the header gate's)
    one-line warnings. ``is_lateral``: the view is lateral (PS3.3 C.8.11.5 View Position).
    ``display``: the uint8 (H, W) image overlays are drawn on, or None when no overlay is drawn.
    Raises TypeError / ValueError when an array has the wrong type or shape.
    """

    x: np.ndarray
    meta: Mapping[str, Any]
    window: tuple[float, float] | None
    warnings: tuple[str, ...]
    is_lateral: bool
    display: np.ndarray | None

    def __post_init__(self) -> None:
        x = self.x
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 3 or x.shape[0] != 3:
            raise TypeError(f"DecodedImage.x must be a (3, S, S) float32 array, got {_describe(x)}")
        if self.display is not None and (
            not isinstance(self.display, np.ndarray) or self.display.dtype != np.uint8 or self.display.ndim != 2
        ):
            raise TypeError(f"DecodedImage.display must be a 2-D uint8 array or None, got {_describe(self.display)}")
        if not isinstance(self.meta, Mapping):
            raise TypeError(f"DecodedImage.meta must be a mapping, got {type(self.meta).__name__}")
        if self.window is not None and len(self.window) != 2:
            raise ValueError(f"DecodedImage.window must be (center, width) or None, got {self.window!r}")
        object.__setattr__(self, "warnings", _strings("DecodedImage.warnings", self.warnings))
        object.__setattr__(self, "is_lateral", bool(self.is_lateral))

    def with_warnings(self, extra: Sequence[str]) -> DecodedImage:
        """The same image with ``extra`` warnings appended (e.g. the header gate's)."""
        return replace(self, warnings=(*self.warnings, *extra)) if extra else self


@dataclass(frozen=True)
class DecodeFailure:
    """A file that could not be read: ``reason`` is the results row's one-line reason, starting
    with the reader's refusal code (:class:`medxray.errors.DicomError`, e.g. ``not_dicom: ...``)."""

    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason:
            raise ValueError(f"DecodeFailure.reason must be a non-empty string, got {self.reason!r}")


DecodeResult = Union[DecodedImage, DecodeFailure]
"""What a decode job returns (the engine refuses anything else with a TypeError)."""


@dataclass(frozen=True)
class SRRequest:
    """The content of one DICOM Comprehensive SR: the keywords of :func:`medxray.dicom.write_sr`."""

    source: Mapping[str, str]
    label_names: tuple[str, ...]
    probabilities: tuple[float, ...]
    positives: tuple[str, ...]
    model_name: str
    model_version: str
    thresholds: Mapping[str, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_names", _strings("SRRequest.label_names", self.label_names))
        object.__setattr__(self, "positives", _strings("SRRequest.positives", self.positives))
        object.__setattr__(self, "probabilities", tuple(float(p) for p in self.probabilities))
        if len(self.probabilities) != len(self.label_names):
            raise ValueError(
                f"SRRequest: {len(self.probabilities)} probabilities for {len(self.label_names)} label names"
            )

    def keywords(self) -> dict[str, Any]:
        """The keyword arguments of :func:`medxray.dicom.write_sr` (after its path)."""
        return {
            "source": dict(self.source),
            "label_names": list(self.label_names),
            "probabilities": list(self.probabilities),
            "positives": list(self.positives),
            "model_name": self.model_name,
            "model_version": self.model_version,
            "thresholds": dict(self.thresholds),
        }


@dataclass(frozen=True, eq=False)
class PostTask:
    """What a post job writes for one scored image, under ``out`` (the run's OUT folder).

    ``classes`` / ``class_probs``: the findings overlays are drawn for and their probabilities;
    ``cams``: their maps (K, S, S) float32 in [0, 1] (K = ``len(classes)``), None without overlays;
    ``display``: the uint8 image they are drawn on (already at most ``overlay_max_side`` px);
    ``cam_method``: the :data:`medxray.cam.MAP_METHODS` key, shown in each overlay's title;
    ``sr``: the SR to write, or None. Raises ValueError when the overlay fields disagree.
    """

    out: str
    stem: str
    classes: tuple[str, ...] = ()
    class_probs: tuple[float, ...] = ()
    cams: np.ndarray | None = None
    display: np.ndarray | None = None
    cam_method: str = ""
    overlay_max_side: int | None = None
    sr: SRRequest | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", _strings("PostTask.classes", self.classes))
        object.__setattr__(self, "class_probs", tuple(float(p) for p in self.class_probs))
        k = len(self.classes)
        if len(self.class_probs) != k:
            raise ValueError(f"PostTask: {len(self.class_probs)} probabilities for {k} classes")
        if k and (self.cams is None or self.display is None):
            raise ValueError("PostTask: overlays for classes need both cams and display")
        if self.cams is not None and (np.ndim(self.cams) != 3 or np.shape(self.cams)[0] != k):
            raise ValueError(f"PostTask.cams must be ({k}, S, S) for {k} classes, got {_describe(self.cams)}")

    @property
    def draws_overlays(self) -> bool:
        return bool(self.classes)


@dataclass(frozen=True)
class PostResult:
    """What a post job wrote: ``cam_dir`` / ``sr_file`` relative to OUT ("" when not written),
    ``failed`` the outputs that could not be written (``"cams"``, ``"sr"``, ``"outputs"``) and
    ``note`` why, one line without paths (paths may name patients)."""

    cam_dir: str = ""
    sr_file: str = ""
    note: str = ""
    failed: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "failed", _strings("PostResult.failed", self.failed))


def _strings(what: str, values: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{what} must be a sequence of strings, got {values!r}")
    return tuple(values)


def _describe(a: Any) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__
