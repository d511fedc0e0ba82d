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
from dataclasses import dataclass, field
from typing import Any

from medxray.display import DISPLAY_LONG_SIDE
from medxray.errors import DicomError
from medxray.pacs.spool import Spool, is_version_name

log = logging.getLogger(__name__)

NODE_OVERLAY_MAX_SIDE = DISPLAY_LONG_SIDE  # SC overlays of a 2k CR at 1024 px: ~3 MB each instead of ~12 MB


@dataclass
class ResultPolicy:
    """What goes back to the PACS for each scored image."""

    deidentified_sr: bool = False
    secondary_capture: bool = True
    sc_max_findings: int = 3
    scoring: dict[str, Any] = field(default_factory=dict)  # extra ScoreConfig options


def score_inbox(spool: Spool, checkpoint: str, policy: ResultPolicy) -> Any:
    """Run the batch engine over ``spool.inbox`` (files with a row are skipped); returns its summary."""
    from medxray.scoring import ScoreConfig, score_directory

    opts = {
        "cams": "positive" if policy.secondary_capture else "none",
        "overlay_max_side": NODE_OVERLAY_MAX_SIDE,
        **policy.scoring,
    }
    cfg = ScoreConfig(input_dir=spool.inbox, checkpoint=checkpoint, out=spool.scored, sr=False, progress=False, **opts)
    summary = score_directory(cfg)
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


def queue_results(spool: Spool, policy: ResultPolicy) -> int:
    """Write SR (+ SC) objects of every ok row not queued yet into the outbox; returns objects queued."""
    n = 0
    for row in result_rows(spool):
        key = row["path"]
        if key in spool.queued:
            continue
        if row["status"] == "ok":
            try:
                n += _queue_row(spool, row, policy)
            except DicomError as exc:  # e.g. invalid_uid: the source cannot be referenced
                spool.record(
                    {
                        "path": key,
                        "status": "no_result",
                        "reason": str(exc),
                        "sop_instance_uid": row.get("sop_instance_uid", ""),
                    }
                )
                log.warning("%s: no result object (%s)", key, str(exc).split(":", 1)[0])
            except OSError as exc:  # disk trouble: leave the row unqueued, retry on the next pass
                log.error("cannot write result objects for %s: %s", key, exc)
                continue
        spool.queued.add(key)
    return n


def _queue_row(spool: Spool, row: dict[str, str], policy: ResultPolicy) -> int:
    import numpy as np
    from pydicom import dcmread

    from medxray.dicom.sc import write_cam_sc
    from medxray.dicom.sr import result_uid, write_sr

    src_path = spool.inbox / row["path"]
    header = dcmread(src_path, stop_before_pixels=True)
    source = {
        "sop_class_uid": str(header.get("SOPClassUID", "")),
        "sop_instance_uid": str(header.get("SOPInstanceUID", "")),
        "study_instance_uid": str(header.get("StudyInstanceUID", "")),
        "series_instance_uid": str(header.get("SeriesInstanceUID", "")),
        "modality": str(header.get("Modality", "")),
    }
    if is_version_name(src_path.name):  # a changed re-send: its own result objects, named by its content
        source["content_sha256"] = spool.content_digest(row["path"])
    keep = None if policy.deidentified_sr else header
    labels = [c[2:] for c in row if c.startswith("p_")]
    probs = [float(row[f"p_{n}"]) for n in labels]
    positives = [p for p in row.get("positive_findings", "").split(";") if p]
    model, version = row.get("model", ""), row.get("model_version", "")
    n = 0
    sr_uid = result_uid(source, version, "sr")
    if sr_uid not in spool.sent:
        tmp = spool.tmp_path(f"{uuid.uuid4().hex}.dcm")
        write_sr(
            tmp,
            source=source,
            label_names=labels,
            probabilities=probs,
            positives=positives,
            model_name=model,
            model_version=version,
            thresholds={},
            source_dataset=keep,
        )
        n += spool.put_outbox(sr_uid, tmp) is not None
    if policy.secondary_capture and row.get("cam_dir"):
        from PIL import Image

        top = sorted(positives, key=lambda f: -probs[labels.index(f)])[: policy.sc_max_findings]
        for i, finding in enumerate(top, start=1):
            png = spool.scored / row["cam_dir"] / f"{finding}.png"
            uid = result_uid(source, version, f"sc:{finding}")
            if uid in spool.sent or not png.is_file():
                continue
            with Image.open(png) as im:
                rgb = np.asarray(im.convert("RGB"))
            tmp = spool.tmp_path(f"{uuid.uuid4().hex}.dcm")
            write_cam_sc(
                tmp,
                overlay_rgb=rgb,
                source=source,
                finding=finding,
                probability=probs[labels.index(finding)],
                model_name=model,
                model_version=version,
                instance_number=i,
                source_dataset=keep,
            )
            n += spool.put_outbox(uid, tmp) is not None
    return n
