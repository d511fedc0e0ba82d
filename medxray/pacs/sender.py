"""Sending result objects from the on-disk outbox to the PACS, with retry and exponential back-off.

Holds the two destinations (:class:`CStoreDestination`, a pynetdicom C-STORE SCU, PS3.4 B.2,
over DICOM TLS with mutual authentication when ``destination.tls`` is set (PS3.15 B.9,
:mod:`medxray.pacs.tls`; a PACS whose certificate does not chain to the configured CA, or does
not match ``peer_subject``, is treated as down and logged); :class:`OrthancRestDestination`,
Orthanc's ``POST /instances``) and :class:`OutboxSender`.
An object leaves the outbox only after the destination confirmed it (C-STORE status Success or
Warning; Orthanc "Success"/"AlreadyStored"): first its SOP Instance UID goes into ``sent.log``,
then the file is removed, so a kill between the two re-sends nothing. A destination that is
down keeps the queue on disk and is retried after 2, 4, 8 ... seconds (capped); an object the
destination refuses for good (e.g. an unsupported SOP class) moves to ``outbox/failed/``.
Must not import torch or the scoring engine.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from medxray.pacs.config import Destination
from medxray.pacs.spool import Spool
from medxray.pacs.tls import client_context, describe_peer, peer_matches

log = logging.getLogger(__name__)

SENT, RETRY, REFUSED = "sent", "retry", "refused"


class DestinationDown(ConnectionError):
    """The destination cannot be reached or refused the association: keep the queue, retry later."""


class CStoreDestination:
    """C-STORE every file to one AE over one association per batch."""

    def __init__(self, dest: Destination, calling_aet: str) -> None:
        self.dest, self.calling_aet = dest, calling_aet
        self.lanes = max(1, int(dest.associations))  # associations OutboxSender uses at once

    def describe(self) -> str:
        return self.dest.describe()

    def send(self, paths: list[Path]) -> Iterator[tuple[Path, str, str]]:
        from pydicom import dcmread
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        contexts: dict[str, set[str]] = {}
        files: list[tuple[Path, Any]] = []
        for p in paths:
            try:
                ds = dcmread(p, stop_before_pixels=False)
            except Exception as exc:  # damaged outbox file (cannot happen with atomic writes): set aside
                yield p, REFUSED, f"unreadable ({type(exc).__name__})"
                continue
            cls = str(ds.SOPClassUID)
            if cls not in contexts and len(contexts) >= 60:
                break  # 128 presentation contexts at most; the rest go in the next batch
            contexts.setdefault(cls, set()).update(
                {str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian}
            )
            files.append((p, ds))
        if not files:
            return
        for cls, syntaxes in contexts.items():
            ae.add_requested_context(cls, sorted(syntaxes))
        tls = self.dest.tls
        tls_args = (client_context(tls), None) if tls else None
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            raise DestinationDown(
                f"association with {self.describe()} "
                f"{'rejected' if assoc.is_rejected else 'failed'}"
                + (" (TLS: check certificates and CA)" if tls and not assoc.is_rejected else "")
            )
        if tls and tls.peer_subject is not None:
            sock = getattr(assoc.dul.socket, "socket", None)
            cert = sock.getpeercert() if sock is not None else None
            if not peer_matches(cert, tls.peer_subject):
                assoc.abort()
                raise DestinationDown(
                    f"{self.describe()} presented a certificate for {describe_peer(cert)}, "
                    "which does not match destination.tls.peer_subject"
                )
        try:
            for p, ds in files:
                try:
                    status = assoc.send_c_store(ds)
                except (RuntimeError, ValueError) as exc:  # no accepted context for this object
                    yield p, REFUSED, f"not accepted by the destination ({str(exc)[:120]})"
                    continue
                if not status or "Status" not in status:
                    raise DestinationDown(f"{self.describe()} did not answer a C-STORE (connection lost)")
                code = int(status.Status)
                if code == 0x0000 or code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
                    yield p, SENT, f"status 0x{code:04X}"
                elif 0xA700 <= code <= 0xA7FF:  # out of resources: transient
                    yield p, RETRY, f"status 0x{code:04X} (out of resources)"
                else:
                    yield p, REFUSED, f"status 0x{code:04X}"
        finally:
            if assoc.is_established:
                assoc.release()


class OrthancRestDestination:
    """POST each file to Orthanc's REST API (``/instances``)."""

    def __init__(self, url: str, timeout: float = 60.0, lanes: int = 2) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout
        self.lanes = max(1, int(lanes))  # POSTs in flight at once (Orthanc serves several HTTP threads)

    def describe(self) -> str:
        return self.url

    def send(self, paths: list[Path]) -> Iterator[tuple[Path, str, str]]:
        for p in paths:
            req = urllib.request.Request(
                f"{self.url}/instances",
                data=p.read_bytes(),
                method="POST",
                headers={"Content-Type": "application/dicom"},
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    answer = json.loads(r.read() or b"{}")
            except urllib.error.HTTPError as exc:
                if exc.code >= 500:
                    raise DestinationDown(f"{self.url} answered HTTP {exc.code}") from None
                yield p, REFUSED, f"HTTP {exc.code}"
                continue
            except (urllib.error.URLError, OSError) as exc:
                raise DestinationDown(f"{self.url} unreachable ({getattr(exc, 'reason', exc)})") from None
            status = str(answer.get("Status", "")) if isinstance(answer, dict) else ""
            yield (p, SENT, status) if status in ("Success", "AlreadyStored") else (p, REFUSED, status or "?")


class OutboxSender:
    """Drains ``spool.outbox`` into a destination; back-off on failure; :meth:`run` in a thread."""

    def __init__(
        self, spool: Spool, destination: Any, retry_initial_s: float = 2.0, retry_max_s: float = 300.0, batch: int = 50
    ) -> None:
        self.spool, self.dest, self.batch = spool, destination, batch
        self.initial, self.max = float(retry_initial_s), float(retry_max_s)
        self.failures = 0
        self.next_try = 0.0
        self.sent_count = 0
        self._count_lock = threading.Lock()  # the lanes' threads count their sends
        self.stop_event = threading.Event()
        self.wake = threading.Event()

    def delay(self) -> float:
        """Back-off after ``failures`` consecutive failed attempts: initial * 2^(failures-1), capped."""
        return min(self.max, self.initial * 2 ** max(0, self.failures - 1))

    def send_once(self) -> int:
        """One attempt over (up to ``batch``) queued objects; returns how many were sent.

        The objects are dealt over the destination's ``lanes`` (its associations, or HTTP requests,
        at once; one thread each): a PACS confirms an object only once it has stored it, so one
        lane leaves the link idle while the PACS writes. Raises DestinationDown when the
        destination is unreachable (the queue stays as it is; what other lanes sent is recorded).
        """
        files = self.spool.outbox_files()[: self.batch]
        lanes = max(1, min(int(getattr(self.dest, "lanes", 1)), len(files)))
        before = self.sent_count
        if lanes == 1:
            self._send_lane(files)
            return self.sent_count - before
        errors: list[BaseException] = []

        def lane(i: int) -> None:
            try:
                self._send_lane(files[i::lanes])
            except BaseException as exc:  # re-raised below, after every lane ended
                errors.append(exc)

        threads = [threading.Thread(target=lane, args=(i,), name=f"medxray-send-{i}") for i in range(lanes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return self.sent_count - before

    def _send_lane(self, files: list[Path]) -> None:
        """Send ``files`` over one association (or one HTTP connection at a time); settle each as
        its answer comes (:attr:`sent_count` counts it at once, also when a later one fails)."""
        for path, outcome, detail in self.dest.send(files):
            uid = path.stem
            if outcome == SENT:
                self.spool.sent.add(uid)  # first the ledger, then the file: a kill re-sends nothing
                path.unlink(missing_ok=True)
                with self._count_lock:
                    self.sent_count += 1
            elif outcome == REFUSED:
                failed = self.spool.outbox / "failed"
                failed.mkdir(exist_ok=True)
                path.replace(failed / path.name)
                log.error("%s refused %s (%s); moved to %s", self.dest.describe(), uid, detail, failed)
            else:
                log.warning("%s could not store %s now (%s); will retry", self.dest.describe(), uid, detail)

    def step(self) -> bool:
        """Try once if it is time and there is work; returns True when something was sent."""
        if time.monotonic() < self.next_try or not self.spool.outbox_files():
            return False
        try:
            n = self.send_once()
        except DestinationDown as exc:
            self.failures += 1
            wait = self.delay()
            self.next_try = time.monotonic() + wait
            log.warning(
                "destination down: %s; %d object(s) kept in the outbox, retry in %.0f s",
                exc,
                len(self.spool.outbox_files()),
                wait,
            )
            return False
        if self.failures:
            log.info("destination %s is back", self.dest.describe())
        self.failures = 0
        self.next_try = 0.0
        return n > 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                sent = self.step()
            except Exception:  # never let the sender thread die; the queue is on disk
                log.exception("sender: unexpected error; retrying")
                self.failures += 1
                self.next_try = time.monotonic() + self.delay()
                sent = False
            if not sent:
                self.wake.wait(0.5)
                self.wake.clear()

    def drain(self, timeout: float) -> bool:
        """Send until the outbox is empty or ``timeout`` s passed (pull mode); True when empty."""
        deadline = time.monotonic() + timeout
        while self.spool.outbox_files() and time.monotonic() < deadline:
            if not self.step():
                time.sleep(min(0.5, max(0.0, self.next_try - time.monotonic())))
        return not self.spool.outbox_files()

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="medxray-sender", daemon=True)
        t.start()
        return t
