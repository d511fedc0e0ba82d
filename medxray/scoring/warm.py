"""What a long-lived caller keeps between scoring runs: the decode workers, the checkpoint, the Predictor.

A scoring run (:func:`medxray.scoring.score_directory`) on its own spawns its decode workers,
reads the checkpoint and builds the Predictor (model, OpenVINO compilation), and drops them all at
the end: right for one ``score-dicom`` call, wasteful for the DICOM node, which runs the engine
once per series that goes idle, often for one or two images. Given a :class:`WarmEngine`, a run
takes these from it and leaves them in it for the next run:

* the decode pool, when the next run wants as many workers and the pool still works (a pool a
  killed worker broke is replaced, as the engine replaces it during a run);
* the loaded checkpoint, while the file's content hash (:func:`medxray.inference.checkpoint_identity`)
  is the same: a model registry's promotion or a replaced file is read again;
* the Predictor, while the checkpoint and the options that build it (device, backend, precision,
  batch size, threads) are the same.

Measured on 2 cores (``serve-dicom``, one RG1 image per study with its maps, 1 s series-idle
wait, studies 2-5 of a node's life): the SR reached Orthanc 3.95-4.43 s after each send with a
fresh pool and Predictor per series, 2.57-3.38 s with this (the scoring run of the one file:
1.0-1.5 s). Not thread-safe: one scoring run at a time uses it. :meth:`WarmEngine.close`
shuts the workers down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class WarmEngine:
    """The decode pool, checkpoint and Predictor kept from one scoring run to the next (see module doc)."""

    pool: ProcessPoolExecutor | None = None
    pool_workers: int = 0
    checkpoint_id: str = ""
    checkpoint: Any = None
    predictor_key: Hashable = None
    predictor: Any = None
    reused: dict[str, int] = field(default_factory=lambda: {"pool": 0, "checkpoint": 0, "predictor": 0})

    def decode_pool(self, workers: int, new_pool: Callable[[int], ProcessPoolExecutor]) -> ProcessPoolExecutor:
        """The kept pool when it has ``workers`` workers and still takes work, else a new one
        (``new_pool(workers)``), which is then the kept one."""
        if self.pool is not None and self.pool_workers == workers:
            from medxray.scoring.workers import ping

            try:
                self.pool.submit(ping)  # raises at once on a broken pool
                self.reused["pool"] += 1
                return self.pool
            except (BrokenExecutor, RuntimeError):  # broken, or shut down
                log.info("the kept decode workers are gone; starting new ones")
        self.drop_pool()
        self.pool, self.pool_workers = new_pool(workers), workers
        return self.pool

    def keep_pool(self, pool: ProcessPoolExecutor | None, workers: int) -> None:
        """After a run: the pool the engine ended with (it may have replaced a broken one), of
        ``workers`` workers."""
        if pool is not self.pool:
            self.drop_pool()
        self.pool, self.pool_workers = pool, (workers if pool is not None else 0)

    def drop_pool(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool, self.pool_workers = None, 0

    def load_checkpoint(self, path: str | Path) -> tuple[Any, str]:
        """(the checkpoint at ``path``, its content identity): the kept one while the content is
        the same. Raises what :func:`medxray.checkpoint.load_checkpoint` raises."""
        from medxray.checkpoint import load_checkpoint
        from medxray.inference import checkpoint_identity

        ident = checkpoint_identity(path)
        if ident != self.checkpoint_id or self.checkpoint is None:
            self.checkpoint = load_checkpoint(path)
            self.checkpoint_id = ident
            self.predictor, self.predictor_key = None, None  # built from another checkpoint
        else:
            self.reused["checkpoint"] += 1
        return self.checkpoint, ident

    def get_predictor(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The kept Predictor when it was built for ``key`` (checkpoint identity + options), else ``build()``."""
        if self.predictor is None or self.predictor_key != key:
            self.predictor, self.predictor_key = None, None
            self.predictor = build()
            self.predictor_key = key
        else:
            self.reused["predictor"] += 1
        return self.predictor

    def close(self) -> None:
        """Shut the decode workers down and drop the model."""
        self.drop_pool()
        self.checkpoint = self.predictor = None
        self.checkpoint_id, self.predictor_key = "", None
