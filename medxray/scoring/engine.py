"""The scoring engine: a decode pool feeding batched inference, and post-processing jobs,
with crash isolation (a file that kills a worker gets an error row, the batch goes on).

:class:`ScoringEngine` takes :class:`WorkItem` s, writes one journal row per item and knows
nothing about folders, shards or run records (that is :mod:`medxray.scoring.run`).
What the worker processes return is typed (:mod:`medxray.scoring.messages`); anything else is
a TypeError.

Must not import :mod:`medxray.scoring.run` (which imports this); torch, tqdm and the CAM code
are imported lazily.
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from medxray.errors import ConfigError
from medxray.scoring.config import ScoreConfig
from medxray.scoring.discovery import output_stem
from medxray.scoring.gate import accepted_body_parts, header_gate, ood_verdict
from medxray.scoring.journal import ResultsJournal
from medxray.scoring.mapstreams import MapStreams
from medxray.scoring.messages import DecodedImage, DecodeFailure, PostResult, PostTask, SRRequest
from medxray.scoring.workers import decode_job, mapped_classes, new_decode_pool, ping, post_job

if TYPE_CHECKING:
    import torch

    from medxray.inference import Predictor

log = logging.getLogger(__name__)

FIRST_BATCH = 4  # images in a run's first batch at most: its rows are the first the user sees


@dataclass
class WorkItem:
    rel: str
    path: Path
    attempts: int = 0
    decoded: DecodedImage | None = None
    row: dict[str, Any] = field(default_factory=dict)
    payload: PostTask | None = None  # the post job, kept until it succeeds


class ScoringEngine:
    """Decode pool + batched inference + post-processing jobs, with crash isolation.

    Normal mode keeps up to ``max_buffer`` files decoding or decoded ahead of inference. When a
    worker dies (a codec segfault, the OOM killer), every job that was in flight becomes a
    suspect and the engine enters quarantine: suspects run one at a time, alone, so a file
    that kills a worker while running alone is the culprit and gets an error row; the others
    finish normally. Then normal mode resumes. ``threads``: the inference threads (decided once
    by the caller); gradient maps run as that many single-threaded streams.
    """

    def __init__(
        self,
        cfg: ScoreConfig,
        image_size: int,
        journal: ResultsJournal,
        out: Path,
        workers: int,
        total: int,
        base_row: dict[str, str],
        threads: int = 1,
    ) -> None:
        from tqdm.auto import tqdm

        self.cfg = cfg
        self.image_size = image_size
        self.p: Predictor | None = None
        self.journal = journal
        self.out = out
        self.workers = workers
        self.bs = int(cfg.batch_size)
        # what decode_job returns for overlays: False (no overlays), True (full size) or the
        # display long side, shrunk in the worker (only a display-sized image crosses processes)
        self.want_display: bool | int = (
            (int(cfg.overlay_max_side) if cfg.overlay_max_side else True) if cfg.cams != "none" else False
        )
        self.decode_fn = cfg.decode_fn or decode_job
        self.written = 0
        self.batches = 0  # batches inferred
        self.outputs_failed = 0  # scored files whose CAM overlays / SR could not be written
        self.max_buffer = max(2 * self.bs, self.bs + 4 * workers)
        self.pool: ProcessPoolExecutor | None = None
        self.queue: list[WorkItem] = []
        self.inflight: dict[Future, tuple[str, WorkItem]] = {}
        self.ready: list[WorkItem] = []
        self.suspects: list[tuple[str, WorkItem]] = []
        self.quarantine = False
        self.base_row = dict(base_row)
        self.accept = accepted_body_parts(cfg.accept_body_parts)
        # gradient maps as one single-threaded stream per inference thread (see mapstreams)
        self.map_streams = MapStreams(threads)
        self.bar = tqdm(
            total=total,
            unit="file",
            desc="score-dicom",
            disable=True if not cfg.progress else None,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    # -- pool ------------------------------------------------------------------------------

    def _new_pool(self) -> ProcessPoolExecutor:
        return new_decode_pool(self.workers, self.image_size)

    def _submit(self, kind: str, item: WorkItem) -> None:
        assert self.pool is not None
        fut: Future[object]
        if kind == "decode":
            fut = self.pool.submit(
                self.decode_fn,
                str(item.path),
                self.image_size,
                self.cfg.allowed_modalities,
                self.cfg.max_pixels,
                self.want_display,
            )
        else:
            assert item.payload is not None, "a post job is launched with its task"
            fut = self.pool.submit(post_job, item.payload)
        self.inflight[fut] = (kind, item)

    def _launch(self, kind: str, item: WorkItem) -> None:
        """Submit now, or queue behind the suspects while in quarantine."""
        if self.quarantine:
            self.suspects.insert(0, (kind, item))
        else:
            self._submit(kind, item)

    def _n_decoding(self) -> int:
        return sum(1 for k, _ in self.inflight.values() if k == "decode")

    def _top_up(self, limit: int | None = None) -> None:
        cap = self.max_buffer if limit is None else min(limit, self.max_buffer)
        while self.queue and self._n_decoding() + len(self.ready) < cap:
            self._submit("decode", self.queue.pop())

    def start(self, todo: list[WorkItem], pool: ProcessPoolExecutor | None = None) -> None:
        self.queue = list(reversed(todo))
        self.pool = pool or self._new_pool()
        # Only the first batch is decoded while the model loads: more decodes would take the
        # cores the load needs (3 processes on 2 cores) and delay the first row; run() tops up.
        self._top_up(FIRST_BATCH)

    def close(self, keep_pool: bool = False) -> ProcessPoolExecutor | None:
        """End the run: the progress bar, the map streams and the decode pool (shut down, or with
        ``keep_pool`` returned as it is for the caller to reuse: the one the run ended with,
        which replaced any pool a dead worker broke)."""
        self.bar.close()
        self.map_streams.close()
        pool, self.pool = self.pool, None
        if pool is not None and not keep_pool:
            pool.shutdown(wait=True, cancel_futures=True)
            return None
        return pool

    # -- main loop -------------------------------------------------------------------------

    def _more_decodes_coming(self) -> bool:
        return bool(self.queue) or self._n_decoding() > 0 or any(k == "decode" for k, _ in self.suspects)

    def run(self, predictor: Predictor) -> None:
        self.p = predictor
        self.cam_method = map_method_name(self.cfg.cam_method, predictor.cam_method)
        while True:
            if self.quarantine and not self.inflight:
                if self.suspects:
                    kind, item = self.suspects.pop()
                    self._submit(kind, item)  # alone
                else:
                    self.quarantine = False
            # finished jobs first: a post job's row is written (and a decode's image joins the
            # batch) now, not after the next batch's inference and maps (seconds, with maps on)
            self._collect_finished()
            if not self.quarantine:
                self._top_up()
            # the first batch goes as soon as anything is decoded, and holds at most FIRST_BATCH
            # images (the first row is not kept waiting for a full batch, nor for the inference
            # of one: ~0.5 s for 16 images at 224 px on 2 cores); later ones wait for a full
            # batch while decodes are coming
            if self.ready and (len(self.ready) >= self.bs or not self.batches or not self._more_decodes_coming()):
                take = self.bs if self.batches else min(self.bs, FIRST_BATCH)
                batch, self.ready = self.ready[:take], self.ready[take:]
                self._infer(batch)
                self.batches += 1
                continue
            if not self.inflight:
                if self.queue or self.suspects or self.ready:
                    continue
                break
            wait(list(self.inflight), return_when=FIRST_COMPLETED)
            self._collect_finished()

    def _collect_finished(self) -> None:
        """Collect every job that has finished, without waiting for any."""
        for fut in [f for f in self.inflight if f.done()]:
            if fut in self.inflight:  # a broken pool may already have collected it
                self._collect(fut)

    def _collect(self, fut: Future) -> None:
        kind, item = self.inflight.pop(fut)
        try:
            res = fut.result()
        except BrokenProcessPool:
            self._pool_broke([(kind, item)])
            return
        except Exception as exc:  # the job raised although jobs catch: record, keep going
            log.error("%s: the %s job raised %s", item.rel, kind, failure_line(exc))
            res = (
                DecodeFailure(f"decode_failed: worker error {type(exc).__name__}")
                if kind == "decode"
                else PostResult(note=f"outputs failed ({type(exc).__name__})", failed=("outputs",))
            )
        self._handle(kind, item, res)

    def _handle(self, kind: str, item: WorkItem, res: object) -> None:
        """Act on a job's message; a message of another type is a bug: TypeError, the run stops."""
        if kind == "decode":
            if isinstance(res, DecodedImage):
                skip, warns = header_gate(res.meta, self.accept)
                if skip is not None:  # not a chest radiograph by its header: not scored
                    self._write({**meta_columns(item.rel, res), "status": "skipped", "reason": skip})
                    return
                item.decoded = res.with_warnings(warns)
                self.ready.append(item)
            elif isinstance(res, DecodeFailure):
                self._write({"path": item.rel, "status": "error", "reason": res.reason})
            else:
                raise TypeError(
                    f"the decode job returned {type(res).__name__}; it must return "
                    "medxray.scoring.messages.DecodedImage or DecodeFailure"
                )
            return
        if not isinstance(res, PostResult):
            raise TypeError(
                f"the post job returned {type(res).__name__}; it must return medxray.scoring.messages.PostResult"
            )
        row = item.row
        row["cam_dir"], row["sr_file"] = res.cam_dir, res.sr_file
        if res.note:
            row["reason"] = res.note
        item.payload = None
        self._write(row)
        if res.failed:
            self._output_failed(item.rel, res.note)

    def _output_failed(self, rel: str, why: str) -> None:
        """A scored file whose CAM overlays / SR were not written: a failure of the run (the row
        stays; a re-run of the same command writes the missing outputs)."""
        self.outputs_failed += 1
        log.warning("%s: %s; re-run the same command to write the missing outputs", rel, why or "outputs failed")

    def _pool_broke(self, lost: list[tuple[str, WorkItem]]) -> None:
        alone = self.quarantine and not self.inflight
        assert self.pool is not None
        self.pool.shutdown(wait=True, cancel_futures=True)  # settles every future of the dead pool
        for fut, (k, it) in list(self.inflight.items()):
            self.inflight.pop(fut)
            try:
                failed = fut.cancelled() or isinstance(fut.exception(timeout=60), BrokenProcessPool)
            except Exception:  # a future the dead pool never settled
                failed = True
            if failed:
                lost.append((k, it))
            else:
                self.inflight[fut] = (k, it)
                self._collect(fut)
        self.pool = self._new_pool()
        if alone:
            self._check_pool_works()
        for k, it in lost:
            it.attempts += 1
            if alone or it.attempts >= 3:
                self._crashed(k, it)
            else:
                self.suspects.append((k, it))
        if self.suspects:
            log.warning(
                "a worker process died; re-running %d job(s) one at a time to find the cause", len(self.suspects)
            )
            self.quarantine = True

    def _check_pool_works(self) -> None:
        """Before blaming a file, prove a fresh worker can run at all (else every file would be blamed)."""
        assert self.pool is not None
        try:
            ok = self.pool.submit(ping).result(timeout=300)
        except Exception as exc:
            ok = False
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        else:
            why = ""
        if not ok:
            raise ConfigError(
                "decode worker processes cannot start or keep dying on any job "
                f"({why}). When calling score_directory from a script, put the call under "
                "`if __name__ == '__main__':` (workers are spawned); also check free memory"
            )

    def _crashed(self, kind: str, item: WorkItem) -> None:
        if kind == "decode":
            self._write(
                {
                    "path": item.rel,
                    "status": "error",
                    "reason": "decode_failed: the decoder process crashed on this file",
                }
            )
        else:
            row = item.row
            row["reason"] = "outputs failed: the worker process crashed writing CAMs/SR"
            item.payload = None
            self._write(row)
            self._output_failed(item.rel, row["reason"])

    # -- inference and rows ----------------------------------------------------------------

    def _infer(self, batch: list[WorkItem]) -> None:
        import torch

        assert self.p is not None  # set by run()
        decoded = [it.decoded for it in batch]
        assert all(d is not None for d in decoded), "only decoded items are batched"
        x = torch.from_numpy(np.stack([d.x for d in decoded if d is not None]))
        # probabilities and OOD distances from one forward pass on the predictor's backend
        pred = self.p.run(x, ood=True)
        probs, ood = pred.probabilities, pred.ood
        threshold = self.p.ood.threshold if self.p.ood is not None else None
        positives = self.p.positive(probs)
        names = self.p.label_names
        # maps (THE map definition, medxray.cam.compute_maps): only for the images that need one,
        # each only for its own classes (one forward pass, batched backward passes)
        mapped = self.cfg.cams != "none"
        per_image = [self._classes_for(pos, names, probs[i]) if mapped else [] for i, pos in enumerate(positives)]
        cams = self._maps(x, per_image) if any(per_image) else None
        for i, (it, d) in enumerate(zip(batch, decoded)):
            assert d is not None
            meta = d.meta
            window = d.window
            distance = None if ood is None else float(ood[i])
            skip, ood_warning = ood_verdict(distance, threshold, self.cfg.ood_policy)
            warns = [*d.warnings, *([ood_warning] if ood_warning else [])]
            row = {
                **meta_columns(it.rel, d),
                "status": "ok",
                "reason": "",
                "positive_findings": ";".join(positives[i]),
                "warnings": "; ".join(warns),
                "is_lateral": d.is_lateral,
                "window_center": window[0] if window else "",
                "window_width": window[1] if window else "",
                "ood_distance": "" if distance is None else f"{distance:.2f}",
            }
            if skip is not None:  # --ood-policy skip: no probabilities, no CAM or SR
                it.decoded = None
                self._write({**row, "status": "skipped", "reason": skip, "positive_findings": ""})
                continue
            for j, n in enumerate(names):
                row[f"p_{n}"] = f"{float(probs[i, j]):.4f}"
            it.row = row
            classes = per_image[i]
            sr = None
            if self.cfg.sr:
                keys = ("sop_class_uid", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "modality")
                sr = SRRequest(
                    source={k: meta.get(k, "") for k in keys},
                    label_names=tuple(names),
                    probabilities=tuple(float(v) for v in probs[i]),
                    positives=tuple(positives[i]),
                    model_name=self.p.model_name,
                    model_version=self.p.model_version,
                    thresholds=self.p.thresholds,
                )
            display = d.display
            it.decoded = None  # free the decoded pixels of this file
            if classes or sr is not None:
                it.payload = PostTask(
                    out=str(self.out),
                    stem=output_stem(it.rel),
                    classes=tuple(names[c] for c in classes),
                    class_probs=tuple(float(probs[i, c]) for c in classes),
                    cams=cams[0][cams[2][i], [cams[1][c] for c in classes]] if cams is not None and classes else None,
                    display=display if classes else None,
                    cam_method=self.cam_method,
                    overlay_max_side=self.cfg.overlay_max_side,
                    sr=sr,
                )
                self._launch("post", it)
            else:
                self._write(row)

    def _classes_for(self, positives: list[str], names: list[str], probs: np.ndarray) -> list[int]:
        """The class indices an image's maps are drawn for: every class (``--cams all``) or its
        positives, at most ``max_maps`` of them (:func:`medxray.scoring.workers.mapped_classes`)."""
        wanted = list(range(len(names))) if self.cfg.cams == "all" else [names.index(n) for n in positives]
        return mapped_classes(wanted, probs, self.cfg.max_maps)

    def _maps(self, x: torch.Tensor, per_image: list[list[int]]) -> tuple[np.ndarray, dict[int, int], dict[int, int]]:
        """Maps (M, K, S, S) for the M images of the batch that need one (``per_image``: each
        image's class indices, at least one non-empty), only for the (image, class) pairs they
        need; with the column of each class and the row of each image."""
        rows = [i for i, c in enumerate(per_image) if c]
        wanted = sorted({c for i in rows for c in per_image[i]})
        col = {c: k for k, c in enumerate(wanted)}
        mask = np.zeros((len(rows), len(wanted)), dtype=bool)
        for r, i in enumerate(rows):
            mask[r, [col[c] for c in per_image[i]]] = True
        assert self.p is not None  # set by run()
        # maps only: the probabilities came from run() above (on OpenVINO, run(maps=) would score again)
        maps = self.map_streams.maps(self.p, x[rows], wanted, self.cam_method, mask, idle=self._while_mapping)
        return maps, col, {i: r for r, i in enumerate(rows)}

    def _while_mapping(self, map_jobs: Sequence[Future]) -> None:
        """While a batch's maps compute (seconds): write the rows of overlay jobs that finished and
        take in finished decodes; returns when any job, or a map stream, is done. No new decodes
        are submitted here: decodes competing with the single-threaded map streams made runs
        10-15% slower (measured interleaved)."""
        wait([*map_jobs, *self.inflight], return_when=FIRST_COMPLETED)
        self._collect_finished()

    def _write(self, row: dict[str, Any]) -> None:
        self.journal.write({**self.base_row, **row})
        self.written += 1
        self.bar.update(1)


def map_method_name(configured: str, checkpoint_method: str) -> str:
    """The :data:`medxray.cam.MAP_METHODS` key a scoring run uses: the checkpoint's for
    "checkpoint", gradcam-denseblock4 for the older name "gradcam", else the configured one."""
    return {"checkpoint": checkpoint_method, "gradcam": "gradcam-denseblock4"}.get(configured, configured)


def meta_columns(rel: str, decoded: DecodedImage) -> dict[str, Any]:
    """The identifying-free header columns of a row (UIDs, modality, view, size, the reader's warnings)."""
    meta = decoded.meta
    return {
        "path": rel,
        "sop_instance_uid": meta.get("sop_instance_uid", ""),
        "study_instance_uid": meta.get("study_instance_uid", ""),
        "series_instance_uid": meta.get("series_instance_uid", ""),
        "modality": meta.get("modality", ""),
        "view_position": meta.get("view_position", ""),
        "warnings": "; ".join(decoded.warnings),
        "is_lateral": decoded.is_lateral,
        "rows": meta.get("rows"),
        "columns": meta.get("columns"),
    }


def failure_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters) for a log line."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
