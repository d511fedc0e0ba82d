"""One scoring run over a folder: :func:`score_directory`.

Checks the arguments and the checkpoint, locks the output folder (one writer per results
file), records the run's identity (a resumed run must use the same arguments), lists the files
of this shard, skips those already in the journal, drives :class:`~medxray.scoring.engine.ScoringEngine`,
and merges shard results once every shard is complete.

Must not be imported by the other scoring modules (it is the top of the package).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medxray.errors import CheckpointError, ConfigError, DataError, output_error
from medxray.fileio import atomic_write_text
from medxray.scoring.config import ScoreConfig, ScoreSummary, default_threads, validate_config
from medxray.scoring.discovery import in_shard, iter_input_files, output_stem
from medxray.scoring.engine import ScoringEngine, WorkItem
from medxray.scoring.gate import accepted_body_parts
from medxray.scoring.journal import RESULTS_NAME, ResultsJournal, csv_text, read_results, result_columns
from medxray.scoring.warm import WarmEngine
from medxray.scoring.workers import CAMS_DIR, SR_DIR, new_decode_pool, outputs_missing, ping

log = logging.getLogger(__name__)

RUN_NAME = "run.json"


def score_directory(cfg: ScoreConfig, warm: WarmEngine | None = None) -> ScoreSummary:
    """Score every file under ``cfg.input_dir``; see :mod:`medxray.scoring` for the guarantees.

    ``warm``: decode workers, checkpoint and Predictor kept from an earlier run and left for the
    next (:class:`medxray.scoring.warm.WarmEngine`; a long-lived caller such as the DICOM node);
    None starts and drops them here. Raises :class:`ConfigError` / :class:`DataError` /
    :class:`CheckpointError` (exit code 2 at the CLI) for unusable arguments; bad input files
    only ever become error rows.
    """
    t_start = time.perf_counter()
    workers, shard = validate_config(cfg)
    in_root = Path(cfg.input_dir)
    out = Path(cfg.out)
    if not in_root.exists():
        raise DataError(f"input {in_root} does not exist; give the folder holding the DICOM files")
    registry = follows_registry(cfg.checkpoint)
    if registry is not None:  # a model registry: its current version now; the next call sees a promotion
        from dataclasses import replace

        from medxray.site.registry import current_checkpoint

        cfg = replace(cfg, checkpoint=str(current_checkpoint(registry)))
        log.info("model registry %s: scoring with its current version %s", registry, cfg.checkpoint)
    if not Path(cfg.checkpoint).is_file():
        raise CheckpointError(f"checkpoint {cfg.checkpoint} does not exist (check the path)")
    if not zipfile.is_zipfile(cfg.checkpoint):  # not a torch.save file: fail now, with load's own message
        from medxray.checkpoint import load_checkpoint

        load_checkpoint(cfg.checkpoint)
    # Start the decode workers first: their imports (torch, MONAI) take seconds and overlap
    # everything below, including loading the model.
    if warm is not None:
        pool = warm.decode_pool(workers, new_decode_pool)
    else:
        pool = new_decode_pool(workers)
    pings = [pool.submit(ping) for _ in range(workers)]
    lock = None
    try:
        from medxray.checkpoint import load_checkpoint
        from medxray.inference import checkpoint_identity
        from medxray.modelinput import check_preprocessing

        # CheckpointError for a missing / unsafe / foreign file
        if warm is not None:
            ckpt, ckpt_sha = warm.load_checkpoint(cfg.checkpoint)
        else:
            ckpt, ckpt_sha = load_checkpoint(cfg.checkpoint), ""
        image_size = check_preprocessing(ckpt.meta.preprocessing)
        labels = list(ckpt.meta.label_names)
        if not labels:
            raise CheckpointError(f"checkpoint {cfg.checkpoint} lists no label_names; it cannot name result columns")
        columns = result_columns(labels)
        out.mkdir(parents=True, exist_ok=True)
        # A run that follows a registry may change model version between calls (every row names its
        # model_version); the findings (the columns) must stay the same.
        ckpt_sha = ckpt_sha or checkpoint_identity(cfg.checkpoint)
        ckpt_id = f"registry:{registry}:{','.join(labels)}" if registry else ckpt_sha
        identity = run_identity(cfg, ckpt_id, shard)
        results_path = out / results_name(shard)
        run_path = out / run_name(shard)
        lock = lock_out(out / lock_name(shard), cfg.lock_wait)
        if cfg.overwrite:
            clear_previous_outputs(out, shard, results_path)
        check_or_start_run(run_path, results_path, identity, cfg.overwrite)

        files = [(r, p) for r, p in iter_input_files(in_root, exclude=[out]) if in_shard(r, shard)]
        journal = ResultsJournal(results_path, columns)
    except BaseException as exc:
        if warm is not None:
            warm.drop_pool()
        else:
            pool.shutdown(wait=False, cancel_futures=True)
        if lock is not None:
            lock.close()
        if isinstance(exc, OSError) and writing_to(exc, out):  # read-only / full OUT: one line, exit 2
            raise (output_error(exc, out) or exc) from None
        raise
    del pings
    run = ScoringRun(
        cfg,
        pool,
        workers,
        shard,
        ckpt,
        image_size,
        labels,
        columns,
        identity,
        results_path,
        run_path,
        files,
        journal,
        out,
        t_start,
        ckpt_sha,
    )
    try:
        return run_scoring(run, warm)
    finally:
        lock.close()  # the kernel also drops the lock when a killed run's process dies


@dataclass
class ScoringRun:
    """What :func:`score_directory` prepared before scoring starts."""

    cfg: ScoreConfig
    pool: ProcessPoolExecutor
    workers: int
    shard: tuple[int, int] | None
    ckpt: Any
    image_size: int
    labels: list[str]
    columns: list[str]
    identity: dict[str, Any]
    results_path: Path
    run_path: Path
    files: list[tuple[str, Path]]
    journal: ResultsJournal
    out: Path
    t_start: float
    checkpoint_sha: str  # content identity of the checkpoint file


def run_scoring(run: ScoringRun, warm: WarmEngine | None = None) -> ScoreSummary:
    from medxray.inference import Predictor

    cfg, pool, workers, shard, out, journal = run.cfg, run.pool, run.workers, run.shard, run.out, run.journal
    files, ckpt, labels, columns, identity = run.files, run.ckpt, run.labels, run.columns, run.identity
    image_size, results_path, run_path, t_start = run.image_size, run.results_path, run.run_path, run.t_start

    scope = {r for r, _ in files}
    # rows whose CAM overlays / SR never got written (a full disk): scored again, outputs and all
    redo = [
        r
        for r, _ in files
        if r in journal.done
        and outputs_missing(dict(zip(columns, journal.done[r])), out, cfg.cams, bool(cfg.sr), cfg.max_maps)
    ]
    if redo:
        journal.forget(redo)
        log.info("redoing %d file(s) whose CAM overlays or SR are missing", len(redo))
    todo = [WorkItem(r, p) for r, p in files if r not in journal.done]
    if cfg.overwrite:  # outputs of the discarded run must not be mistaken for this run's
        for it in todo:
            stem = output_stem(it.rel)
            shutil.rmtree(out / CAMS_DIR / stem, ignore_errors=True)
            (out / SR_DIR / f"{stem}.dcm").unlink(missing_ok=True)
    summary = ScoreSummary(
        total=len(files), skipped=len(files) - len(todo), results=str(results_path), outputs_redone=len(redo)
    )
    if summary.skipped:
        log.info("resuming: %d of %d files already have a row", summary.skipped, len(files))
    base_row = {"model": ckpt.meta.display_name, "model_version": ckpt.meta.version_label}
    threads = max(1, int(cfg.threads or default_threads(workers)))  # inference threads = map streams
    engine = ScoringEngine(cfg, image_size, journal, out, workers, len(todo), base_row, threads)
    t_work = time.perf_counter()
    predictor = None
    import torch

    threads_before = torch.get_num_threads()
    finished = False
    try:
        if todo:
            engine.start(todo, pool)  # workers decode while the model loads / converts
        elif warm is None:
            pool.shutdown(wait=False, cancel_futures=True)
        torch.set_num_threads(threads)  # restored below

        def build() -> Predictor:
            return Predictor.from_checkpoint(
                ckpt,
                device=cfg.device,
                backend=cfg.backend,
                precision=cfg.precision,
                batch_size=cfg.batch_size,
                num_threads=threads,
            )

        options = (run.checkpoint_sha, cfg.device, cfg.backend, cfg.precision, cfg.batch_size, threads)
        predictor = warm.get_predictor(options, build) if warm is not None else build()
        if list(predictor.label_names) != labels:
            raise CheckpointError("checkpoint label names do not match its model head")
        summary.backend = f"{predictor.backend}/{predictor.precision}/{predictor.device}"
        if todo:
            engine.run(predictor)
        finished = True
    finally:
        torch.set_num_threads(threads_before)
        if warm is None:
            engine.close()
        else:
            kept = engine.close(keep_pool=True) if todo else pool
            if finished:
                warm.keep_pool(kept, workers)
            else:  # a failed run's workers may still hold its jobs: not kept
                warm.drop_pool()
                if kept is not None:
                    kept.shutdown(wait=False, cancel_futures=True)
        summary.scored = engine.written
        summary.outputs_failed = engine.outputs_failed
        rows = journal.finalize(keep=lambda r: r in scope)
    summary.ok = sum(1 for r in rows if r[1] == "ok")
    summary.not_scored = sum(1 for r in rows if r[1] == "skipped")
    summary.error = sum(1 for r in rows if r[1] not in ("ok", "skipped"))
    summary.seconds = time.perf_counter() - t_start
    summary.images_per_s = summary.scored / max(time.perf_counter() - t_work, 1e-9)
    state = {
        **identity,
        "complete": True,
        "columns": columns,
        "model": predictor.describe(),
        "summary": {k: v for k, v in asdict(summary).items() if k != "merged"},
    }
    atomic_write_text(run_path, json.dumps(state, indent=2) + "\n")
    if shard is not None:
        summary.merged = merge_shards_if_complete(out, shard[1], identity, columns)
    return summary


def writing_to(exc: OSError, out: Path) -> bool:
    """Whether a failed call was a write into ``out`` (the setup only writes there; reading the
    input can also fail with EACCES, which is not OUT's fault)."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    if exc.filename is None:
        return False
    try:
        return Path(exc.filename).resolve().is_relative_to(out.resolve())
    except (OSError, ValueError):
        return False


def follows_registry(checkpoint: str | Any) -> Path | None:
    """The resolved model registry folder when ``checkpoint`` names one (``medxray site promote``),
    else None (a checkpoint file). A registry is read again at every scoring call, so a long-lived
    caller (the DICOM node) picks up a promotion or a rollback at its next batch."""
    p = Path(checkpoint).expanduser()
    if not p.is_dir():
        return None
    from medxray.site.registry import is_registry

    if not is_registry(p):
        raise CheckpointError(f"{p} is a folder but not a model registry (versions/, CURRENT); give a checkpoint file")
    return p.resolve()


def run_identity(cfg: ScoreConfig, ckpt_id: str, shard: tuple[int, int] | None) -> dict[str, Any]:
    return {
        "input": str(Path(cfg.input_dir).resolve()),
        "checkpoint_sha256_16": ckpt_id,
        "cams": cfg.cams,
        **({"max_maps": int(cfg.max_maps)} if cfg.max_maps is not None else {}),  # absent: as before the option
        "cam_method": cfg.cam_method,
        "sr": bool(cfg.sr),
        "shard": list(shard) if shard else None,
        "allowed_modalities": sorted(m.upper() for m in cfg.allowed_modalities) if cfg.allowed_modalities else None,
        "max_pixels": cfg.max_pixels,
        "overlay_max_side": cfg.overlay_max_side,
        "accept_body_parts": list(accepted_body_parts(cfg.accept_body_parts) or ["ANY"]),
        "ood_policy": cfg.ood_policy,
    }


def results_name(shard: tuple[int, int] | None) -> str:
    return RESULTS_NAME if shard is None else f"results.shard-{shard[0]}-of-{shard[1]}.csv"


def run_name(shard: tuple[int, int] | None) -> str:
    return RUN_NAME if shard is None else f"run.shard-{shard[0]}-of-{shard[1]}.json"


def lock_name(shard: tuple[int, int] | None) -> str:
    return f".{results_name(shard)}.lock"


def lock_out(path: Path, wait_s: float = 0.0) -> Any:
    """One writer per results file (an advisory ``flock`` on ``path``, held until the returned file is
    closed or the process dies): a second scorer on the same OUT and shard waits up to ``wait_s``
    seconds for the first to finish, then stops with :class:`ConfigError`.

    Under a scheduler this is what keeps a requeued task off the journal while the killed one is still
    dying. The lock is only as good as the file system's ``flock``: local disks and NFS (v4, or v3 with
    lockd) honour it across machines; Lustre needs the ``flock`` mount option.
    """
    fh = open(path, "a+")
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no cross-process lock
        return fh
    deadline = time.monotonic() + max(0.0, float(wait_s))
    said = False
    while True:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except OSError:
            if time.monotonic() >= deadline:
                fh.close()
                waited = f" after waiting {float(wait_s):.0f} s" if wait_s else ""
                raise ConfigError(
                    f"another scorer is already writing {path.parent} (lock {path.name}){waited}; "
                    "wait for it (--lock-wait SECONDS), or use another --out / --shard"
                ) from None
            if not said:
                log.warning("another scorer holds %s; waiting up to %.0f s for it to finish", path.name, wait_s)
                said = True
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def clear_previous_outputs(out: Path, shard: tuple[int, int] | None, results_path: Path) -> int:
    """``--overwrite``: remove what an earlier run wrote into ``out``, and nothing else; returns the count.

    Unsharded: the ``cams/`` and ``sr/`` folders (a symlink is unlinked, never followed) and any shard
    results / run records. Sharded (other shards share the folders): the overlays and SRs the shard's
    old rows name, and the merged ``results.csv`` that no longer holds. ``results.csv`` and ``run.json``
    of this run are replaced by :func:`check_or_start_run`. Files of the user's in ``out`` are kept.
    """
    removed = 0
    if shard is None:
        for name in (CAMS_DIR, SR_DIR):
            d = out / name
            if d.is_symlink() or d.is_file():
                d.unlink()
                removed += 1
            elif d.is_dir():
                shutil.rmtree(d)
                removed += 1
        for p in [*out.glob("results.shard-*-of-*.csv"), *out.glob("run.shard-*-of-*.json")]:
            p.unlink(missing_ok=True)
            removed += 1
        return removed
    if results_path.is_file():
        header, rows, _ = read_results(results_path)
        owned = [(out / d).resolve() for d in (CAMS_DIR, SR_DIR)]
        for rec in rows:
            row = dict(zip(header, rec))
            for rel in (row.get("cam_dir", ""), row.get("sr_file", "")):
                target = (out / rel).resolve() if rel else None
                if target is None or not any(target.is_relative_to(o) and target != o for o in owned):
                    continue  # empty, or not inside the run's own folders: never touched
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
                removed += 1
    merged = out / RESULTS_NAME
    if merged.is_file():
        merged.unlink()
        removed += 1
    return removed


def check_or_start_run(run_path: Path, results_path: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix rows of two different runs in one folder; record this run's identity first."""
    if overwrite:
        results_path.unlink(missing_ok=True)
    elif run_path.exists():
        try:
            prev = json.loads(run_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            prev = {}
        diffs = [k for k, v in identity.items() if prev.get(k) != v]
        if diffs and results_path.exists():
            raise ConfigError(
                f"{results_path.parent} already holds results of a different run ({', '.join(diffs)} differ); "
                "re-run with the same arguments to resume, or use a new --out folder or --overwrite"
            )
    elif results_path.exists():
        raise ConfigError(
            f"{results_path} exists but has no run record ({run_path.name}) from this scorer; "
            "use a new --out folder or --overwrite"
        )
    atomic_write_text(run_path, json.dumps({**identity, "complete": False}, indent=2) + "\n")


def merge_shards_if_complete(out: Path, n: int, identity: dict[str, Any], columns: list[str]) -> str | None:
    """When every shard k/n has finished in this folder, write the merged results.csv.

    Each shard marks itself complete before looking at the others, so the last to finish
    always sees all of them (two finishing together both write the same file, atomically).
    """
    parts = []
    same = {key: v for key, v in identity.items() if key != "shard"}
    for k in range(1, n + 1):
        try:
            state = json.loads((out / run_name((k, n))).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not state.get("complete") or any(state.get(key) != v for key, v in same.items()):
            return None
        parts.append(out / results_name((k, n)))
    return str(write_merged(out, parts, columns)[0])


def write_merged(out: Path, parts: list[Path], columns: list[str]) -> tuple[Path, set[str]]:
    """Write ``out/results.csv`` from the shard journals (sorted by path, atomically); returns it and its paths."""
    rows: dict[str, list[str]] = {}
    for part in parts:
        _, part_rows, _ = read_results(part, columns)
        for r in part_rows:
            rows.setdefault(r[0], r)
    merged = out / RESULTS_NAME
    atomic_write_text(merged, csv_text(columns, [rows[k] for k in sorted(rows)]))
    return merged, set(rows)


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_run` wrote: the merged file, its shard count and row count, and the input files
    that have no row because they appeared after their shard had listed the folder (re-run those shards)."""

    results: str
    shards: int
    rows: int
    unlisted: int
    rerun_shards: tuple[int, ...]

    def line(self) -> str:
        text = f"merged {self.shards} shards: {self.rows} rows -> {self.results}"
        if self.unlisted:
            text += (
                f"; {self.unlisted} file(s) under the input have no row (added after their shard listed the "
                f"folder): re-run shard(s) {', '.join(f'{k}/{self.shards}' for k in self.rerun_shards)} "
                "with the same arguments, then merge again"
            )
        return text


_SHARD_RUN = re.compile(r"run\.shard-(\d+)-of-(\d+)\.json")
_NOT_IDENTITY = {"shard", "complete", "summary", "model"}


def merge_run(out: str | Path, check_input: bool = True) -> MergeResult:
    """The merge step of a sharded run (``score-dicom --merge OUT``): ``OUT/results.csv`` from every
    ``results.shard-K-of-N.csv``, one row per file, sorted by path. Idempotent: merging again
    rewrites the same file, atomically.

    Refuses (:class:`ConfigError`, nothing written) when any shard 1..N has not completed (no run
    record, or marked incomplete: killed, failed, or still running; a running shard is also detected
    by its lock), when OUT mixes shard counts, or when the shards were run with different arguments.
    With ``check_input`` the input folder is listed again and files without a row are counted (a
    warning, not an error: they were added after their shard listed the folder).
    """
    out = Path(out)
    if not out.is_dir():
        raise DataError(f"--merge {out}: no such folder; give the --out folder of the sharded run")
    found: dict[int, set[int]] = {}
    for p in out.iterdir():
        m = _SHARD_RUN.fullmatch(p.name)
        if m:
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if not found:
        raise ConfigError(
            f"--merge {out}: no shard run records (run.shard-K-of-N.json) there; "
            "score with --shard first, or point --merge at the shards' --out folder"
        )
    if len(found) > 1:
        raise ConfigError(
            f"--merge {out}: the folder mixes shard counts {sorted(found)}; keep one sharded run per --out folder"
        )
    n = next(iter(found))
    locks: list[Any] = []
    try:
        states: dict[int, dict[str, Any]] = {}
        missing: list[str] = []
        for k in range(1, n + 1):
            try:
                locks.append(lock_out(out / lock_name((k, n))))
            except ConfigError:
                missing.append(f"{k}/{n} (still running)")
                continue
            try:
                state = json.loads((out / run_name((k, n))).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                missing.append(f"{k}/{n} (never started)")
                continue
            if not state.get("complete"):
                missing.append(f"{k}/{n} (not finished: killed or failed)")
                continue
            states[k] = state
        if missing:
            raise ConfigError(
                f"--merge {out}: the run is incomplete; missing shard(s) {', '.join(missing)}. "
                "Re-run those shards with the same arguments (they resume), then merge again"
            )
        first = states[1]
        for k, state in states.items():
            diffs = sorted(key for key in (set(first) | set(state)) - _NOT_IDENTITY if state.get(key) != first.get(key))
            if diffs:
                raise ConfigError(
                    f"--merge {out}: shard {k}/{n} was run with different arguments than shard 1/{n} "
                    f"({', '.join(diffs)} differ); re-run it with the same arguments"
                )
        columns = list(first.get("columns") or [])
        merged, rels = write_merged(out, [out / results_name((k, n)) for k in range(1, n + 1)], columns)
    finally:
        for fh in locks:
            fh.close()
    unlisted: list[str] = []
    input_dir = Path(str(first.get("input", "")))
    if check_input and input_dir.exists():
        unlisted = [r for r, _ in iter_input_files(input_dir, exclude=[out]) if r not in rels]
    rerun = tuple(sorted({k for k in range(1, n + 1) for r in unlisted if in_shard(r, (k, n))}))
    if unlisted:
        log.warning("%d file(s) under the input have no row: added after their shard listed the folder", len(unlisted))
    return MergeResult(str(merged), n, len(rels), len(unlisted), rerun)
