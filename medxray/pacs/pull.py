"""``medxray score-pacs --orthanc URL``: pull mode for sites that will not push.

Orthanc's REST change log (``GET /changes?since=N``, every stored instance is a ``NewInstance``
change with a growing ``Seq``) is the cursor. :func:`score_pacs` reads the changes after the
stored cursor, downloads new CR/DX instances (``GET /instances/{id}/file``) straight into the
spool's inbox, saves the cursor (atomically, only after the files are on disk), scores the
inbox with the same engine as ``score-dicom`` and the node, and stores the SR / SC objects back
with ``POST /instances``. Killed at any point, the next run resumes: downloads are idempotent
(file name = SOP Instance UID), the engine's journal skips scored files, the outbox keeps
unsent objects. medxray's own result objects (Manufacturer "medxray") are never pulled.
(Orthanc's DICOMweb plugin would allow QIDO-RS/STOW-RS instead; the REST API needs no plugin.)
Must not import pynetdicom.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from medxray.dicom.sr import MANUFACTURER
from medxray.errors import ConfigError, DataError
from medxray.fileio import atomic_write_text
from medxray.pacs.results import ResultPolicy, queue_results, score_inbox, unscored
from medxray.pacs.sender import OrthancRestDestination, OutboxSender
from medxray.pacs.spool import Spool

log = logging.getLogger(__name__)

CURSOR_NAME = "cursor.json"


@dataclass
class PullSummary:
    changes_seen: int = 0
    downloaded: int = 0
    ignored: int = 0  # other modalities, medxray's own objects, deleted instances
    sent: int = 0
    queued_left: int = 0
    cursor: int = 0

    def line(self) -> str:
        return (
            f"{self.downloaded} instance(s) pulled ({self.ignored} ignored of {self.changes_seen} changes), "
            f"{self.sent} result object(s) stored back, {self.queued_left} still queued; cursor {self.cursor}"
        )


class OrthancClient:
    """The few Orthanc REST calls pull mode needs (stdlib HTTP; loopback or a trusted network)."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"--orthanc must be an http(s) URL such as http://127.0.0.1:8042, got {url!r}")
        self.url, self.timeout = url.rstrip("/"), timeout

    def _get(self, path: str) -> bytes:
        try:
            with urllib.request.urlopen(self.url + path, timeout=self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError) as exc:
            raise DataError(
                f"cannot reach Orthanc at {self.url} ({getattr(exc, 'reason', exc)}); "
                "check the URL and that Orthanc is running"
            ) from None

    def get_json(self, path: str) -> Any:
        return json.loads(self._get(path))

    def changes(self, since: int, limit: int = 100) -> dict[str, Any]:
        return self.get_json(f"/changes?since={int(since)}&limit={int(limit)}")

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        return self.get_json(f"/instances/{orthanc_id}/simplified-tags")

    def instance_file(self, orthanc_id: str) -> bytes:
        return self._get(f"/instances/{orthanc_id}/file")


def read_cursor(work: Path, url: str) -> int:
    path = work / CURSOR_NAME
    if not path.exists():
        return 0
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(
            f"{path} is damaged; delete it to pull every instance again (results are not duplicated)"
        ) from None
    if state.get("url") != url:
        raise ConfigError(f"{work} holds the cursor of another PACS ({state.get('url')}); use another --work folder")
    return int(state.get("since", 0))


def pull_new_instances(
    client: OrthancClient, spool: Spool, modalities: Sequence[str] | None, summary: PullSummary, page: int = 100
) -> None:
    """Download every new instance of ``modalities`` after the stored cursor into the inbox."""
    since = read_cursor(spool.work, client.url)
    wanted = {m.upper() for m in modalities} if modalities else None
    while True:
        answer = client.changes(since, page)
        for change in answer.get("Changes", []):
            summary.changes_seen += 1
            if change.get("ChangeType") != "NewInstance":
                continue
            oid = str(change.get("ID", ""))
            try:
                tags = client.instance_tags(oid)
                if (wanted is not None and str(tags.get("Modality", "")).upper() not in wanted) or str(
                    tags.get("Manufacturer", "")
                ) == MANUFACTURER:
                    summary.ignored += 1
                    continue
                data = client.instance_file(oid)
            except urllib.error.HTTPError as exc:  # deleted since: nothing to score
                log.info("instance %s: HTTP %d, ignored", oid, exc.code)
                summary.ignored += 1
                continue
            spool.store(
                data,
                tags.get("StudyInstanceUID"),
                tags.get("SeriesInstanceUID"),
                tags.get("SOPInstanceUID"),
                direct=True,
            )
            summary.downloaded += 1
        since = int(answer.get("Last", since))
        atomic_write_text(spool.work / CURSOR_NAME, json.dumps({"url": client.url, "since": since}) + "\n")
        if answer.get("Done", True) or not answer.get("Changes"):
            break
    summary.cursor = since


def score_pacs(
    url: str,
    checkpoint: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    policy: ResultPolicy | None = None,
    send_timeout_s: float = 120.0,
) -> PullSummary:
    """Pull new CR/DX instances from Orthanc, score them, store the results back; resumable.

    Raises ConfigError / DataError (exit 2) for a bad URL, an unreachable Orthanc or an
    unusable checkpoint. Objects Orthanc does not take within ``send_timeout_s`` stay in the
    outbox and go on the next run.
    """
    policy = policy or ResultPolicy()
    if not Path(checkpoint).is_file():
        raise ConfigError(f"checkpoint {checkpoint} does not exist (check the path)")
    client = OrthancClient(url)
    client.get_json("/system")  # fail early, with one message, when Orthanc is not there
    spool = Spool(work_dir)
    summary = PullSummary()
    from medxray.dicom import DEFAULT_ALLOWED_MODALITIES

    modalities = policy.scoring.get("allowed_modalities", DEFAULT_ALLOWED_MODALITIES)
    pull_new_instances(client, spool, modalities, summary)
    if unscored(spool):
        score_inbox(spool, str(checkpoint), policy)
    queue_results(spool, policy)
    sender = OutboxSender(spool, OrthancRestDestination(client.url), retry_initial_s=1.0, retry_max_s=10.0)
    sender.drain(send_timeout_s)
    summary.sent = sender.sent_count
    summary.queued_left = len(spool.outbox_files())
    log.info("score-pacs: %s", summary.line())
    return summary
