"""Jobs that run in the scorer's spawned worker processes (top-level functions, so they pickle).

* :func:`new_decode_pool`: the process pool (spawned, each worker initialised by :func:`worker_init`);
* :func:`decode_job`: read + preprocess one file; returns a :class:`DecodeFailure` instead of raising;
* :func:`post_job`: write one image's CAM overlays and/or DICOM SR, atomically;

What crosses the process boundary is typed: :mod:`medxray.scoring.messages`.
* :func:`ping`: a no-op used to warm the pool and to prove a fresh worker can run.

Must not import the engine, the run or the journal; DICOM, inference and CAM code is imported
inside the jobs so the parent process does not pay for it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from medxray.dicom import write_sr
from medxray.errors import DicomError
from medxray.scoring.messages import DecodedImage, DecodeFailure, DecodeResult, PostResult, PostTask

if TYPE_CHECKING:
    from medxray.dicom import DicomImage

CAMS_DIR = "cams"
SR_DIR = "sr"


def worker_init(image_size: int | None = None) -> None:
    """Each decode process: the scorer's own CPU priority, quiet warnings, only what decoding needs.

    Decoding imports numpy, pydicom, the codecs and :mod:`medxray.modelinput`, never torch or
    MONAI (a test checks ``sys.modules``), so a worker is ready in well under a second. The
    process runs at the scorer's own priority: inference in the parent runs as single-threaded
    streams (OpenVINO ``NUM_STREAMS``, :mod:`medxray.scoring.mapstreams`), which no longer wait
    at a barrier for a thread a worker preempted, so the kernel's fair share keeps every core
    busy and the bounded buffer (``max_buffer``) stops decoding from running far ahead. Measured
    against the previous background priority (SCHED_IDLE), 2 cores, fresh processes, interleaved:
    with the default maps (48 RG1 files, 2 maps each) 1.8-2.1 vs 0.53-0.58 images/s and the first
    row after 10-12 s vs 56-60 s (the overlay jobs starved behind the map streams); ``--cams none``
    (200 files) steady 32.7-33.6 vs 27.3-30.8 images/s. A CAM/SR job imports torch later, with
    one thread (``OMP_NUM_THREADS=1``: the processes are the parallelism). numpy's BLAS was
    loaded with this module, one thread per core, before that variable is set, so it is limited
    to one thread here too (threadpoolctl): each decode's area resize (a BLAS product) took
    2 threads that spun beside the map streams (40 vs 21 core-ms per uncompressed CR).

    pydicom warns about every oddity of every odd file; in a worker those would flood the
    terminal under the progress bar. This runs only inside our own worker processes. First of
    all the worker ties its life to the scorer's (a ``kill -9`` of the scorer must not leave it
    blocked forever under PID 1).
    """
    import warnings

    from medxray.procutil import exit_with_parent

    exit_with_parent()
    os.environ["OMP_NUM_THREADS"] = "1"  # this worker process only; read when a CAM job imports torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # numpy's BLAS, already loaded with one thread per core
    warnings.simplefilter("ignore")
    import medxray.dicom  # noqa: F401
    from medxray.modelinput import model_input

    if image_size:
        model_input(np.zeros((8, 8), np.float32), image_size)


def new_decode_pool(workers: int, image_size: int | None = None) -> ProcessPoolExecutor:
    """Spawned worker processes (never forked from a process whose thread pools are running)."""
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=mp.get_context("spawn"), initializer=worker_init, initargs=(image_size,)
    )


def ping() -> bool:
    return True


def decode_job(
    path: str,
    image_size: int,
    allowed_modalities: Sequence[str] | None,
    max_pixels: int | None,
    want_display: bool | int,
) -> DecodeResult:
    """Read + preprocess one file: a :class:`DecodedImage`, or a :class:`DecodeFailure` for a bad
    file (never raises for one).

    Without CAM overlays to draw, the file is decoded at the model's size (``reduce_to``:
    :mod:`medxray.dicom.reduce`); the network input is computed with numpy
    (:func:`medxray.modelinput.model_input`, equal to the MONAI list), so no torch here.
    ``want_display``: False, True (the display image at full size) or the display's long side
    in pixels: the image an overlay is drawn on is shrunk here, in the worker, so only a
    display-sized array travels to the scorer and back to :func:`post_job`.
    """
    from medxray.dicom import read_dicom
    from medxray.modelinput import model_input

    try:
        img = read_dicom(
            path,
            allowed_modalities=allowed_modalities,
            max_pixels=max_pixels,
            keep_raw=False,
            reduce_to=None if want_display else image_size,
        )
    except DicomError as exc:
        return DecodeFailure(str(exc))
    except MemoryError:
        return DecodeFailure("too_large: not enough memory to decode this image")
    except Exception as exc:  # a bug or a codec failure we did not anticipate: keep the batch going
        return DecodeFailure(f"decode_failed: unexpected {type(exc).__name__} while decoding")
    return DecodedImage(
        x=model_input(img.pixels, image_size),
        meta=img.meta,
        window=img.window,
        warnings=tuple(img.warnings),
        is_lateral=img.is_lateral,
        display=display_for(img, want_display),
    )


def display_for(img: DicomImage, want_display: bool | int) -> np.ndarray | None:
    """The uint8 display image of a read DICOM at ``want_display``'s long side (see :func:`decode_job`)."""
    if not want_display:
        return None
    from medxray.display import fit_display

    display = img.display_uint8()
    return display if want_display is True else fit_display(display, int(want_display))


def post_job(task: PostTask) -> PostResult:
    """Write CAM overlays and/or the SR for one scored image (atomically); report what was written.

    The :class:`PostResult` names ``cam_dir`` / ``sr_file`` (relative to OUT, empty when not
    written), ``failed`` (the outputs that could not be written, e.g. on a full disk) and
    ``note`` (why, one line).
    """
    out = Path(task.out)
    cam_dir_written = sr_written = ""
    notes, failed = [], []
    if task.draws_overlays and task.cams is not None and task.display is not None:
        try:
            from medxray.display import fit_display
            from medxray.overlay import overlay_with_legend, save_png

            display = fit_display(task.display, task.overlay_max_side)  # already done by decode_job
            cam_dir = Path(CAMS_DIR) / task.stem
            for name, prob, cam in zip(task.classes, task.class_probs, task.cams):
                title = f"{name} p={prob:.2f} ({task.cam_method.upper()})"
                save_png(out / cam_dir / f"{name}.png", overlay_with_legend(display, cam, title, finding=name))
            cam_dir_written = cam_dir.as_posix()
        except Exception as exc:
            notes.append(f"cam overlays failed ({failure_text(exc)})")
            failed.append("cams")
    if task.sr is not None:
        try:
            rel = Path(SR_DIR) / f"{task.stem}.dcm"
            write_sr(out / rel, **task.sr.keywords())
            sr_written = rel.as_posix()
        except Exception as exc:
            notes.append(f"SR failed ({failure_text(exc)})")
            failed.append("sr")
    return PostResult(cam_dir=cam_dir_written, sr_file=sr_written, note="; ".join(notes), failed=tuple(failed))


def failure_text(exc: BaseException) -> str:
    """One line for a failed write: the OS's words for an OSError (no path: paths may name patients)."""
    if isinstance(exc, OSError) and exc.errno:
        return f"{type(exc).__name__}: {os.strerror(exc.errno)}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}" if str(exc) else type(exc).__name__


def mapped_classes(wanted: Sequence[int], probs: Sequence[float], max_maps: int | None) -> list[int]:
    """The classes of ``wanted`` an image gets maps for: all of them, or with ``max_maps`` the
    ``max_maps`` most probable (``probs`` indexed by class; ties by class order), in class order."""
    if max_maps is None or len(wanted) <= int(max_maps):
        return list(wanted)
    top = sorted(wanted, key=lambda c: (-float(probs[c]), c))[: int(max_maps)]
    return sorted(top)


def outputs_missing(row: Mapping[str, str], out: Path, cams: str, sr: bool, max_maps: int | None = None) -> list[str]:
    """Which outputs an ``ok`` results row should have but OUT lacks: ``"cams"`` (an overlay PNG
    per class that ``cams`` selects: every ``p_*`` column for "all", the positive findings for
    "positive"; with ``max_maps``, that many of them) and/or ``"sr"``. A re-run redoes rows with
    missing outputs."""
    if row.get("status") != "ok":
        return []
    missing = []
    if cams != "none":
        names = (
            [c[2:] for c in row if c.startswith("p_")]
            if cams == "all"
            else [n for n in (row.get("positive_findings") or "").split(";") if n]
        )
        cam_dir = row.get("cam_dir") or ""
        # which ones a cap kept is the engine's choice by unrounded probabilities: count, not names
        need = len(names) if max_maps is None else min(len(names), int(max_maps))
        have = sum((out / cam_dir / f"{n}.png").is_file() for n in names) if cam_dir else 0
        if need and have < need:
            missing.append("cams")
    if sr and not (row.get("sr_file") and (out / row["sr_file"]).is_file()):
        missing.append("sr")
    return missing
