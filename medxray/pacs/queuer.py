"""The node's result thread: scored rows become SR / SC objects while the engine is still scoring.

The engine writes a file's row to ``scored/results.csv`` only once its CAM overlays are on disk
(:mod:`medxray.scoring.engine`), so a row can be turned into result objects as soon as it
appears. :class:`ResultQueuer` does that on a thread of its own: while a scoring run is in
progress (:meth:`ResultQueuer.scoring`) it takes the new rows every ``period_s`` seconds, in
passes of at most ``max_rows`` rows (:func:`medxray.pacs.results.queue_some`), and wakes the
outbox sender after each pass that queued something. The objects of the first files of a round
then reach the PACS while the rest of the round is scored, instead of all of them after the
round: on 2 cores, 40 RG1 files pushed to the node left 12 s of result writing and sending after
the last file was scored.

Only this thread calls :func:`~medxray.pacs.results.queue_some` on its spool (the ledger of
queued rows is its alone). A pass that raises is logged and retried on the next kick or period:
the thread never dies while the node serves. Must not import pynetdicom.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager

from medxray.pacs.results import ResultPolicy, queue_some
from medxray.pacs.spool import Spool

log = logging.getLogger(__name__)

QUEUE_PERIOD_S = 1.0  # how often new rows are looked for while a scoring run is in progress
QUEUE_MAX_ROWS = 8  # rows per pass: objects reach the outbox early, and a stop never waits on a backlog


class ResultQueuer:
    """A thread turning new ``ok`` rows of ``spool`` into result objects in its outbox.

    ``pool``: the node's result workers (None: written on this thread); ``on_queued``: called
    after each pass that put objects in the outbox (the sender's wake-up). :meth:`start` makes a
    first pass at once (rows a killed run scored but never queued); after that a pass runs on
    :meth:`kick`, and every ``period_s`` seconds inside :meth:`scoring`. :meth:`stop` ends the
    thread after the pass in progress (rows left over are queued by the next start).
    """

    def __init__(
        self,
        spool: Spool,
        policy: ResultPolicy,
        pool: Executor | None,
        on_queued: Callable[[], None],
        *,
        period_s: float = QUEUE_PERIOD_S,
        max_rows: int = QUEUE_MAX_ROWS,
    ) -> None:
        self.spool, self.policy, self.pool, self.on_queued = spool, policy, pool, on_queued
        self.period_s, self.max_rows = float(period_s), max(1, int(max_rows))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._scoring = threading.Event()
        self._idle = threading.Event()  # set while no pass is running or due
        self._lock = threading.Lock()  # kick() vs the thread marking itself idle
        self._thread: threading.Thread | None = None
        self.queued = 0  # objects this thread put in the outbox
        self.passes = 0  # passes that found rows to queue

    def start(self) -> ResultQueuer:
        self._wake.set()
        self._thread = threading.Thread(target=self._run, name="medxray-results", daemon=True)
        self._thread.start()
        return self

    def kick(self) -> None:
        """Ask for a pass now (e.g. after a scoring run ended)."""
        with self._lock:
            self._idle.clear()
            self._wake.set()

    @contextmanager
    def scoring(self) -> Iterator[None]:
        """Around a scoring run: new rows are queued every ``period_s`` while it runs, and once
        more when it ends."""
        self._scoring.set()
        self.kick()
        try:
            yield
        finally:
            self._scoring.clear()
            self.kick()

    def wait_idle(self, timeout: float) -> bool:
        """True once every kicked pass has run and found nothing more to queue (False at ``timeout``)."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """End the thread after the pass in progress (waits at most ``timeout`` seconds)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.period_s if self._scoring.is_set() else None)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._drain()
            except Exception as exc:  # e.g. a damaged results file mid-write: try again on the next pass
                log.error("writing result objects failed (%s: %s); retrying", type(exc).__name__, exc)
                self._stop.wait(self.period_s)
                self._wake.set()
                continue
            with self._lock:
                if not self._scoring.is_set() and not self._wake.is_set():
                    self._idle.set()

    def _drain(self) -> None:
        """Passes of at most ``max_rows`` rows until none is left (or a stop is asked)."""
        while not self._stop.is_set():
            n, more = queue_some(self.spool, self.policy, self.pool, self.max_rows)
            if n:
                self.queued += n
                self.passes += 1
                self.on_queued()
            if not more:
                return
