"""Scoring the spool's inbox with THE batch engine, and turning finished rows into result objects.

Holds :func:`score_inbox` (``medxray.scoring.score_directory`` on ``inbox/`` -> ``scored/``:
the same one-row-per-file journal, reasons and modality policy as ``score-dicom``; resumable
after a kill) and :func:`queue_results` (for each new ``ok`` row: the Comprehensive SR and the
CAM Secondary Captures, written by :mod:`medxray.dicom.sr` / :mod:`medxray.dicom.sc`, moved
into the outbox). A row is marked in ``queued.log`` only after all its objects are in the
outbox; result UIDs are deterministic, so redoing a half-queued row cannot duplicate anything.
A result's identity is the scored file's: its Study + Series + SOP Instance UIDs and, for a
changed re-send (a ``<sop>.v<digest16>.dcm`` file, :mod:`medxray.pacs.spool`), its data set's
SHA-256 (:func:`medxray.dicom.sr.result_uid`): two studies sharing a SOP Instance UID get two SRs,
and a new version gets its own SR / SCs describing its own pixels.
Error rows produce no object. Must not import pynetdicom.
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import BrokenExecutor, Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medxray.display import DISPLAY_LONG_SIDE
from medxray.errors import DicomError
from medxray.pacs.spool import Spool, is_version_name

if TYPE_CHECKING:
    from medxray.scoring.warm import WarmEngine

log = logging.getLogger(__name__)

NODE_OVERLAY_MAX_SIDE = DISPLAY_LONG_SIDE  # SC overlays of a 2k CR at 1024 px: ~3 MB each instead of ~12 MB


@dataclass
class ResultPolicy:
    """What goes back to the PACS for each scored image."""

    deidentified_sr: bool = False
    secondary_capture: bool = True
    sc_max_findings: int = 3
    scoring: dict[str, Any] = field(default_factory=dict)  # extra ScoreConfig options


def score_inbox(spool: Spool, checkpoint: str, policy: ResultPolicy, warm: WarmEngine | None = None) -> Any:
    """Run the batch engine over ``spool.inbox`` (files with a row are skipped); returns its summary.

    ``warm``: the node's decode workers, checkpoint and Predictor kept between runs
    (:class:`medxray.scoring.warm.WarmEngine`)."""
    from medxray.scoring import ScoreConfig, score_directory

    sc = policy.secondary_capture and policy.sc_max_findings > 0
    opts = {
        "cams": "positive" if sc else "none",
        # maps only for the findings that get a Secondary Capture (an overlay nobody receives is waste)
        "max_maps": policy.sc_max_findings if sc else None,
        "overlay_max_side": NODE_OVERLAY_MAX_SIDE,
        **policy.scoring,
    }
    cfg = ScoreConfig(input_dir=spool.inbox, checkpoint=checkpoint, out=spool.scored, sr=False, progress=False, **opts)
    summary = score_directory(cfg, warm)
    log.info("scored: %s", summary.line())
    return summary


def unscored(spool: Spool) -> list[str]:
    """Inbox files without a row in ``scored/results.csv``."""
    from medxray.scoring import read_results

    done: set[str] = set()
    path = spool.scored / "results.csv"
    if path.exists():
        _, rows, _ = read_results(path)
        done = {r[0] for r in rows}
    return [f for f in spool.inbox_files() if f not in done]


def result_rows(spool: Spool) -> list[dict[str, str]]:
    from medxray.scoring import read_results

    path = spool.scored / "results.csv"
    if not path.exists():
        return []
    header, rows, _ = read_results(path)
    return [dict(zip(header, r)) for r in rows]


@dataclass(frozen=True)
class ObjectJob:
    """One ``ok`` row's result objects to write; picklable, so a worker process can do it.

    ``src``: the scored inbox file (its header gives the patient and study modules); ``row``: its
    results row; ``content_sha256``: the data set digest of a changed re-send ("" otherwise);
    ``scored``: the engine's output folder (the CAM overlay PNGs); ``tmp_dir``: where objects
    are written before they move into the outbox."""

    src: str
    row: dict[str, str]
    content_sha256: str
    policy: ResultPolicy
    scored: str
    tmp_dir: str


@dataclass(frozen=True)
class ObjectResult:
    """What :func:`build_objects` wrote: ``objects`` (SOP Instance UID, temp file) in order, or
    ``refused`` (a DicomError: the source cannot be referenced, so no result), or ``os_error``
    (disk trouble: nothing kept, the row is retried on the next pass)."""

    objects: tuple[tuple[str, str], ...] = ()
    refused: str = ""
    os_error: str = ""


def queue_results(spool: Spool, policy: ResultPolicy, pool: Executor | None = None) -> int:
    """Write SR (+ SC) objects of every ok row not queued yet into the outbox; returns objects queued.

    ``pool``: an executor (the node's result workers) that writes the rows' objects in parallel
    (:func:`build_objects`; 0.27 core-s per file with an SR and three SCs, measured on RG1);
    None writes them here, one row after another. Rows move into the outbox in results order."""
    n, _ = queue_some(spool, policy, pool, None)
    return n


def queue_some(spool: Spool, policy: ResultPolicy, pool: Executor | None, max_rows: int | None) -> tuple[int, bool]:
    """:func:`queue_results` for at most ``max_rows`` of the rows not queued yet (None: all), the
    earliest first; returns (objects queued, whether rows are left). A row whose objects could
    not be written for disk trouble stays unqueued (retried on a later call) and does not count
    as left over."""
    pending = [row for row in result_rows(spool) if row["path"] not in spool.queued]
    more = max_rows is not None and len(pending) > max_rows
    if more:
        pending = pending[:max_rows]
    jobs = [_job(spool, row, policy) for row in pending if row["status"] == "ok"]
    built = dict(zip((j.row["path"] for j in jobs), _build_all(jobs, pool)))
    n = 0
    for row in pending:
        key = row["path"]
        res = built.get(key)
        if res is not None and res.os_error:  # disk trouble: leave the row unqueued, retry on the next pass
            log.error("cannot write result objects for %s: %s", key, res.os_error)
            more = False  # not in this call's loop: it would fail again at once
            continue
        if res is not None and res.refused:  # e.g. invalid_uid: the source cannot be referenced
            spool.record(
                {
                    "path": key,
                    "status": "no_result",
                    "reason": res.refused,
                    "sop_instance_uid": row.get("sop_instance_uid", ""),
                }
            )
            log.warning("%s: no result object (%s)", key, res.refused.split(":", 1)[0])
        elif res is not None:
            n += sum(spool.put_outbox(uid, Path(tmp)) is not None for uid, tmp in res.objects)
        spool.queued.add(key)
    return n, more


RESULT_WORKERS_MAX = 4  # result-object writers: SR + SC building is pure Python (highdicom, pydicom)


def new_results_pool(workers: int | None = None) -> Executor:
    """The node's result workers: spawned processes (at most :data:`RESULT_WORKERS_MAX`, default
    one per core) that write rows' objects in parallel (:func:`queue_results`); each exits with
    the node. Shut it down with ``shutdown(cancel_futures=True)``."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    n = workers or max(1, min(RESULT_WORKERS_MAX, os.cpu_count() or 1))
    return ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"), initializer=_results_worker_init)


def _results_worker_init() -> None:
    """Tie the worker's life to the node's; silence pydicom's per-file warnings in the worker."""
    import warnings

    from medxray.procutil import exit_with_parent

    exit_with_parent()
    warnings.simplefilter("ignore")


def _job(spool: Spool, row: dict[str, str], policy: ResultPolicy) -> ObjectJob:
    src = spool.inbox / row["path"]
    # a changed re-send: its own result objects, named by its content
    digest = spool.content_digest(row["path"]) if is_version_name(src.name) else ""
    return ObjectJob(str(src), dict(row), digest, policy, str(spool.scored), str(spool.tmp_dir()))


def _build_all(jobs: list[ObjectJob], pool: Executor | None) -> list[ObjectResult]:
    """:func:`build_objects` of every job, on ``pool`` when there is more than one. A pool that
    broke (a worker killed, e.g. by the OOM killer) is not fatal: the jobs it did not finish are
    done here, one after another, now and on every later call (the node keeps serving)."""
    if pool is None or len(jobs) < 2:
        return [build_objects(j) for j in jobs]
    futures: list[Future[ObjectResult] | None] = []
    for job in jobs:
        try:
            futures.append(pool.submit(build_objects, job))
        except BrokenExecutor:
            futures.append(None)
    out = []
    for job, fut in zip(jobs, futures):
        try:
            if fut is None:
                raise BrokenExecutor("the result workers are gone")
            out.append(fut.result())
        except BrokenExecutor:
            log.warning("result workers unavailable; writing %s's result objects in the node itself", job.row["path"])
            out.append(build_objects(job))
    return out


def build_objects(job: ObjectJob) -> ObjectResult:
    """Write one row's Comprehensive SR and CAM Secondary Captures (at most
    ``policy.sc_max_findings``, most probable positive findings first) to temp files.

    Never raises a DicomError or an OSError: they come back as ``refused`` / ``os_error`` (temp
    files already written are removed). Result UIDs are deterministic (:func:`result_uid`)."""
    written: list[tuple[str, str]] = []
    try:
        _write_objects(job, written)
    except DicomError as exc:
        _discard(written)
        return ObjectResult(refused=str(exc))
    except OSError as exc:
        _discard(written)
        return ObjectResult(os_error=str(exc))
    return ObjectResult(objects=tuple(written))


def _discard(written: list[tuple[str, str]]) -> None:
    for _, tmp in written:
        Path(tmp).unlink(missing_ok=True)


def _write_objects(job: ObjectJob, written: list[tuple[str, str]]) -> None:
    import numpy as np
    from pydicom import dcmread

    from medxray.dicom.sc import write_cam_sc
    from medxray.dicom.sr import result_uid, write_sr

    row, policy = job.row, job.policy
    header = dcmread(job.src, stop_before_pixels=True)
    source = {
        "sop_class_uid": str(header.get("SOPClassUID", "")),
        "sop_instance_uid": str(header.get("SOPInstanceUID", "")),
        "study_instance_uid": str(header.get("StudyInstanceUID", "")),
        "series_instance_uid": str(header.get("SeriesInstanceUID", "")),
        "modality": str(header.get("Modality", "")),
    }
    if job.content_sha256:
        source["content_sha256"] = job.content_sha256
    keep = None if policy.deidentified_sr else header
    labels = [c[2:] for c in row if c.startswith("p_")]
    probs = [float(row[f"p_{n}"]) for n in labels]
    positives = [p for p in row.get("positive_findings", "").split(";") if p]
    model, version = row.get("model", ""), row.get("model_version", "")

    def tmp() -> Path:
        return Path(job.tmp_dir) / f"{uuid.uuid4().hex}.dcm"

    path = tmp()
    write_sr(
        path,
        source=source,
        label_names=labels,
        probabilities=probs,
        positives=positives,
        model_name=model,
        model_version=version,
        thresholds={},
        source_dataset=keep,
    )
    written.append((result_uid(source, version, "sr"), str(path)))
    if not (policy.secondary_capture and row.get("cam_dir")):
        return
    from PIL import Image

    def overlay_png(finding: str) -> Path:
        return Path(job.scored) / row["cam_dir"] / f"{finding}.png"

    # the most probable positives that have an overlay (the engine drew at most sc_max_findings)
    drawn = [f for f in sorted(positives, key=lambda f: -probs[labels.index(f)]) if overlay_png(f).is_file()]
    for i, finding in enumerate(drawn[: policy.sc_max_findings], start=1):
        png = overlay_png(finding)
        with Image.open(png) as im:
            rgb = np.asarray(im.convert("RGB"))
        path = tmp()
        write_cam_sc(
            path,
            overlay_rgb=rgb,
            source=source,
            finding=finding,
            probability=probs[labels.index(finding)],
            model_name=model,
            model_version=version,
            instance_number=i,
            source_dataset=keep,
        )
        written.append((result_uid(source, version, f"sc:{finding}"), str(path)))
