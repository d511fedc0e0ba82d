"""``medxray serve-dicom``: the DICOM node's main loop (receive -> batch by series -> score -> send).

:func:`serve` starts the C-STORE SCP (:mod:`medxray.pacs.scp`, a pynetdicom server thread) and
the outbox sender (:mod:`medxray.pacs.sender`, a thread), then loops in the main thread: a
series idle for ``idle_seconds`` moves from ``incoming/`` to ``inbox/``, the batch engine
scores the inbox (:func:`medxray.pacs.results.score_inbox`), and new rows become SR / SC objects
in the outbox while the engine is still scoring (:class:`medxray.pacs.queuer.ResultQueuer`, a
thread), written in parallel by the node's result workers (spawned processes, one per core up to
four, that exit with the node). On start it first finishes what a killed run left (unscored inbox files,
unqueued rows, unsent objects). SIGTERM / SIGINT stop it cleanly; SIGKILL loses nothing either.
Must not be imported by medxray.scoring or medxray.dicom.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from medxray.errors import MedxrayError
from medxray.pacs.config import NodeConfig, is_loopback_host
from medxray.pacs.queuer import ResultQueuer
from medxray.pacs.results import ResultPolicy, new_results_pool, result_rows, score_inbox, unscored
from medxray.pacs.scp import start_scp
from medxray.pacs.sender import CStoreDestination, OutboxSender
from medxray.pacs.spool import Spool

log = logging.getLogger(__name__)

ENGINE_RETRY_S = 10.0  # wait before re-running a scoring run that failed for a reason not the input's


def policy_of(cfg: NodeConfig) -> ResultPolicy:
    return ResultPolicy(
        deidentified_sr=cfg.deidentified_sr,
        secondary_capture=cfg.secondary_capture,
        sc_max_findings=cfg.sc_max_findings,
        scoring=dict(cfg.scoring),
    )


def serve(cfg: NodeConfig, stop: threading.Event | None = None, poll_s: float = 0.5) -> None:
    """Run the node until ``stop`` is set (or SIGTERM/SIGINT when called from the main thread).

    Raises ConfigError (exit 2 at the CLI) when the port cannot be bound or the checkpoint is
    unusable; a destination that is down is not an error (results wait in the outbox).
    """
    stop = stop or threading.Event()
    spool = Spool(cfg.work)
    policy = policy_of(cfg)
    server = start_scp(cfg, spool)
    sender = OutboxSender(spool, CStoreDestination(cfg.destination, cfg.ae_title), cfg.retry_initial_s, cfg.retry_max_s)
    thread = sender.start()
    restore = _install_signal_handlers(stop)
    writers = new_results_pool()  # SR / SC objects of a scored batch written in parallel
    # ... on their own thread, while the engine scores the rest of the batch
    queuer = ResultQueuer(spool, policy, writers, sender.wake.set)
    from medxray.scoring.warm import WarmEngine

    warm = WarmEngine()  # decode workers, checkpoint and model kept from one series to the next
    if cfg.destination.tls is None and not is_loopback_host(cfg.destination.host):
        log.warning(
            "results go to %s over plain TCP (patient data unencrypted on the network); add destination.tls",
            cfg.destination.describe(),
        )
    log.info(
        "node %s ready: results go to %s; series are scored after %.0f s idle",
        cfg.ae_title,
        cfg.destination.describe(),
        cfg.idle_seconds,
    )
    try:
        dirty = bool(unscored(spool))  # a killed run may have left inbox files without a row
        if dirty:
            log.info("resuming: %d received file(s) not scored yet", len(unscored(spool)))
        queuer.start()  # its first pass: rows whose objects never reached the outbox
        while not stop.is_set():
            if spool.promote_idle(cfg.idle_seconds):
                dirty = True
            if dirty:
                dirty = False
                if not unscored(spool):  # e.g. a duplicate send of an already scored instance
                    continue
                try:
                    with queuer.scoring():
                        score_inbox(spool, cfg.checkpoint, policy, warm)
                except MedxrayError:
                    raise  # unusable checkpoint / config: one message, exit 2
                except Exception as exc:  # e.g. decode workers killed by the OOM killer: keep the node up
                    log.error(
                        "scoring run failed (%s: %s); the files stay in the inbox, retrying in %.0f s",
                        type(exc).__name__,
                        exc,
                        ENGINE_RETRY_S,
                    )
                    dirty = True
                    stop.wait(ENGINE_RETRY_S)
                    continue
                continue
            stop.wait(poll_s)
    finally:
        server.shutdown()
        queuer.stop()
        warm.close()
        writers.shutdown(wait=True, cancel_futures=True)
        sender.stop_event.set()
        sender.wake.set()
        thread.join(timeout=60)
        restore()
        log.info("node stopped; %d object(s) still queued in %s", len(spool.outbox_files()), spool.outbox)


def _install_signal_handlers(stop: threading.Event) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping after the current step", signum)
        stop.set()

    for s in previous:
        signal.signal(s, handler)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


def wait_idle(spool: Spool, timeout: float) -> bool:
    """Test/ops helper: True once nothing is incoming, unscored, scored without its result
    objects, or in the outbox (or False at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            not spool.pending_series()
            and not unscored(spool)
            and all(r["path"] in spool.queued for r in result_rows(spool))
            and not spool.outbox_files()
        ):
            return True
        time.sleep(0.2)
    return False
