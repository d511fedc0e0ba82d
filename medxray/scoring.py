"""Batch DICOM scoring: a folder of files in, exactly one result row per file out, nothing lost.

The engine behind ``medxray score-dicom`` and ``pipelines/score_dicom.py``:

1. walk INPUT recursively (directory symlinks are followed once per real directory, so a link
   loop cannot recurse; FIFOs and devices are never opened; the output folder is skipped);
2. decode in worker processes (:func:`medxray.dicom.read_dicom` + THE deterministic transforms),
   overlapped with batched inference in the main process (:class:`medxray.inference.Predictor`);
3. CAM overlays and DICOM SR documents are written by the same workers, atomically;
4. a row is appended to ``OUT/results.csv`` and flushed as soon as its file (and its overlays /
   SR) is complete. A kill at any moment loses at most rows not yet flushed; a re-run with the
   same arguments drops any half-written last line, skips files that have a row and appends the
   rest. At the end the file is rewritten sorted by path, so an interrupted + resumed run ends
   byte-for-byte like an uninterrupted one (up to reduced-precision noise in the last digit when
   batches were composed differently).

Outputs never carry patient names, IDs or birth dates: rows hold UIDs, modality and view only,
and SR documents are built from an allow-listed reference with an empty patient module.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import stat
import time
import zipfile
import zlib
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from medxray.dicom import DEFAULT_ALLOWED_MODALITIES, DEFAULT_MAX_PIXELS, write_sr
from medxray.errors import CheckpointError, ConfigError, DataError, DicomError
from medxray.fileio import atomic_write_text, load_yaml_mapping
from medxray.labels import CHESTXRAY14_FINDINGS

log = logging.getLogger(__name__)

RESULTS_NAME = "results.csv"
RUN_NAME = "run.json"
CAMS_DIR = "cams"
SR_DIR = "sr"
CAM_MODES = ("positive", "all", "none")
CAM_METHODS = ("cam", "gradcam")

BASE_COLUMNS: tuple[str, ...] = (
    "path", "status", "reason", "sop_instance_uid", "study_instance_uid", "series_instance_uid",
    "modality", "view_position",
)
TAIL_COLUMNS: tuple[str, ...] = (
    "positive_findings", "model", "model_version", "warnings", "is_lateral", "rows", "columns",
    "window_center", "window_width", "cam_dir", "sr_file",
)


def result_columns(label_names: Sequence[str]) -> list[str]:
    """The results.csv header for a model with these findings (one ``p_<Finding>`` each)."""
    return [*BASE_COLUMNS, *(f"p_{n}" for n in label_names), *TAIL_COLUMNS]


# The layout for the standard ChestX-ray14 head; a checkpoint with other labels gets its own.
RESULT_COLUMNS: list[str] = result_columns(CHESTXRAY14_FINDINGS)


@dataclass
class ScoreConfig:
    """Everything one scoring run depends on (``pipelines/score_dicom.yaml`` mirrors it)."""

    input_dir: str | os.PathLike
    checkpoint: str | os.PathLike
    out: str | os.PathLike
    workers: int | None = None  # decode processes; None = ~40% of the cores on CPU, all but one with CUDA
    batch_size: int = 16
    cams: str = "positive"  # positive | all | none
    cam_method: str = "cam"  # cam | gradcam
    sr: bool = False
    shard: str | tuple[int, int] | None = None  # "k/n", 1-based
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"
    threads: int | None = None  # CPU inference threads; None = the cores the workers leave free
    allowed_modalities: Sequence[str] | None = DEFAULT_ALLOWED_MODALITIES
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    overlay_max_side: int | None = None  # None = overlays at the original image size
    overwrite: bool = False
    progress: bool = True
    # Test/extension hook: a picklable top-level function replacing the decode step.
    decode_fn: Callable[..., dict] | None = None


@dataclass
class ScoreSummary:
    total: int = 0  # files in this run's scope (this shard)
    scored: int = 0  # rows written by this invocation
    skipped: int = 0  # rows already present from an earlier (interrupted) run
    ok: int = 0  # ok rows in the final results file (this scope)
    error: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    results: str = ""
    backend: str = ""
    merged: str | None = None

    def line(self) -> str:
        return (f"{self.total} files: {self.ok} ok, {self.error} error; scored {self.scored} now "
                f"({self.skipped} already done) in {self.seconds:.1f} s = {self.images_per_s:.1f} files/s "
                f"[{self.backend}] -> {self.results}")


# ---------------------------------------------------------------------------------------------
# walking the input
# ---------------------------------------------------------------------------------------------


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"k/n"`` (1-based: shard k of n) -> (k, n); ConfigError for anything else."""
    if shard is None or shard == "":
        return None
    if isinstance(shard, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not m:
            raise ConfigError(f"--shard must look like k/n (e.g. 1/4), got {shard!r}")
        k, n = int(m.group(1)), int(m.group(2))
    else:
        k, n = (int(v) for v in shard)
    if n < 1 or not 1 <= k <= n:
        raise ConfigError(f"--shard k/n needs 1 <= k <= n (shards are numbered from 1), got {k}/{n}")
    return k, n


def in_shard(rel: str, shard: tuple[int, int] | None) -> bool:
    """Stable assignment by a hash of the relative path: adding files never moves old ones."""
    if shard is None:
        return True
    k, n = shard
    return zlib.crc32(rel.encode("utf-8", "surrogateescape")) % n == k - 1


def iter_input_files(root: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[tuple[str, Path]]:
    """All files under ``root`` as sorted (posix relative path, path) pairs.

    Directory symlinks are followed, but each real directory is entered once (a loop ends
    there). Broken symlinks are listed (they get an error row); FIFOs, sockets and devices are
    not (opening a FIFO would block the run).
    """
    root = Path(root)
    if root.is_file():
        return [(root.name, root)]
    if not root.is_dir():
        raise DataError(f"input {root} does not exist or is not a folder; give the folder holding the DICOM files")
    skip = set()
    for p in exclude:
        try:
            st = os.stat(p)
            skip.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    seen: set[tuple[int, int]] = set()
    out: list[tuple[str, Path]] = []
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        d, rel = stack.pop()
        try:
            st = os.stat(d)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen or key in skip:
            continue
        seen.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list %s: %s", d, exc.strerror)
            continue
        for e in entries:
            r = f"{rel}{e.name}"
            try:
                if e.is_dir(follow_symlinks=True):
                    stack.append((Path(e.path), r + "/"))
                    continue
                if e.is_file(follow_symlinks=True):
                    out.append((r, Path(e.path)))
                elif e.is_symlink() and not os.path.exists(e.path):
                    out.append((r, Path(e.path)))  # broken link: reported, not silently dropped
                elif not stat.S_ISREG(e.stat(follow_symlinks=True).st_mode):
                    log.debug("skipping special file %s", r)
            except OSError:
                out.append((r, Path(e.path)))
    out.sort(key=lambda t: t[0])
    return out


def output_stem(rel: str) -> str:
    """A unique, filesystem-safe folder name for a file's outputs (CAMs, SR)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel)
    base = base.strip("._")[-80:] or "file"
    return f"{base}-{hashlib.sha1(rel.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------
# the results journal
# ---------------------------------------------------------------------------------------------


def read_results(path: str | os.PathLike, columns: Sequence[str] | None = None
                 ) -> tuple[list[str], list[list[str]], int]:
    """Complete rows of a results file: (header, rows, number of damaged/duplicate lines dropped).

    Only the last line can be damaged (a kill during a write); it is dropped, as is any row
    whose path already appeared (first one wins).
    """
    text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    end = text.rfind("\n")
    complete = text[: end + 1] if end >= 0 else ""
    dropped = 1 if len(text) > len(complete) else 0
    reader = csv.reader(io.StringIO(complete, newline=""))
    header = next(reader, None) or []
    if columns is not None and header and header != list(columns):
        raise ConfigError(f"{path} has another column layout (another model or medxray version); "
                          "use a new --out folder or --overwrite")
    rows: list[list[str]] = []
    seen: set[str] = set()
    try:
        for rec in reader:
            if len(rec) != len(header) or not rec[0]:
                dropped += 1
                continue
            if rec[0] in seen:
                dropped += 1
                continue
            seen.add(rec[0])
            rows.append(rec)
    except csv.Error:
        dropped += 1
    return header, rows, dropped


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


class ResultsJournal:
    """Append-only results.csv: one flushed line per finished file, cleaned up on reopen."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        self.done: dict[str, list[str]] = {}
        if path.exists() and path.stat().st_size > 0:
            header, rows, dropped = read_results(path, self.columns)
            if not header:
                rows = []
            self.done = {r[0]: r for r in rows}
            if dropped or not header:
                log.info("results: dropped %d incomplete or duplicate line(s) left by an interrupted run", dropped)
                atomic_write_text(path, _csv_text(self.columns, rows))
        else:
            atomic_write_text(path, _csv_text(self.columns, []))
        self._fh = open(path, "a", encoding="utf-8", errors="surrogateescape", newline="")
        self._writer = csv.writer(self._fh, lineterminator="\n")
        self._since_sync = 0

    def write(self, row: dict[str, Any]) -> None:
        rec = [_cell(row.get(c, "")) for c in self.columns]
        if rec[0] in self.done:
            return
        self._writer.writerow(rec)
        self._fh.flush()  # into the OS: survives a kill of this process
        self.done[rec[0]] = rec
        self._since_sync += 1
        if self._since_sync >= 64:
            os.fsync(self._fh.fileno())
            self._since_sync = 0

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def finalize(self, keep: Callable[[str], bool] | None = None) -> list[list[str]]:
        """Close and rewrite sorted by path; returns the rows (optionally only those ``keep`` accepts)."""
        self.close()
        rows = sorted(self.done.values(), key=lambda r: r[0])
        atomic_write_text(self.path, _csv_text(self.columns, rows))
        return [r for r in rows if keep is None or keep(r[0])]


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return s.replace("\r", " ").replace("\n", " ") if ("\n" in s or "\r" in s) else s


# ---------------------------------------------------------------------------------------------
# worker-process jobs (top level so they pickle)
# ---------------------------------------------------------------------------------------------


def _worker_init(image_size: int | None = None) -> None:
    """Each decode process: one torch thread (the processes are the parallelism), quiet warnings,
    and the transforms built up front (importing MONAI takes seconds; it overlaps model loading).

    pydicom warns about every oddity of every odd file; in a worker those would flood the
    terminal under the progress bar. This runs only inside our own worker processes.
    """
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import monai.transforms  # noqa: F401  (the slow import, done before the first file arrives)

    import medxray.dicom  # noqa: F401
    from medxray.inference import preprocess

    if image_size:
        preprocess(np.zeros((8, 8), np.float32), image_size)


def new_decode_pool(workers: int, image_size: int | None = None) -> ProcessPoolExecutor:
    """Spawned worker processes (never forked from a process whose thread pools are running)."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_worker_init, initargs=(image_size,))


def _ping() -> bool:
    return True


def decode_job(path: str, image_size: int, allowed_modalities: Sequence[str] | None, max_pixels: int | None,
               want_display: bool) -> dict[str, Any]:
    """Read + preprocess one file; never raises for a bad file (returns an error record)."""
    from medxray.dicom import read_dicom
    from medxray.inference import preprocess

    try:
        img = read_dicom(path, allowed_modalities=allowed_modalities, max_pixels=max_pixels, keep_raw=False)
    except DicomError as exc:
        return {"status": "error", "reason": str(exc)}
    except MemoryError:
        return {"status": "error", "reason": "too_large: not enough memory to decode this image"}
    except Exception as exc:  # a bug or a codec failure we did not anticipate: keep the batch going
        return {"status": "error", "reason": f"decode_failed: unexpected {type(exc).__name__} while decoding"}
    x = preprocess(img.pixels, image_size).numpy()
    return {
        "status": "ok", "meta": img.meta, "window": img.window, "warnings": img.warnings,
        "is_lateral": img.is_lateral, "x": x, "display": img.display_uint8() if want_display else None,
    }


def post_job(task: dict[str, Any]) -> dict[str, Any]:
    """Write CAM overlays and/or the SR for one scored image (atomically); report what was written."""
    out = Path(task["out"])
    result: dict[str, Any] = {"cam_dir": "", "sr_file": "", "note": ""}
    notes = []
    if task.get("cams") is not None and len(task["classes"]):
        try:
            from medxray.cam import overlay_with_legend, save_png

            display = task["display"]
            max_side = task.get("overlay_max_side")
            if max_side and max(display.shape) > max_side:
                from PIL import Image

                scale = max_side / max(display.shape)
                size = (max(1, round(display.shape[1] * scale)), max(1, round(display.shape[0] * scale)))
                display = np.asarray(Image.fromarray(display).resize(size, Image.BILINEAR))
            cam_dir = Path(CAMS_DIR) / task["stem"]
            for name, prob, cam in zip(task["classes"], task["class_probs"], task["cams"]):
                title = f"{name} p={prob:.2f} ({task['cam_method'].upper()})"
                save_png(out / cam_dir / f"{name}.png", overlay_with_legend(display, cam, title))
            result["cam_dir"] = cam_dir.as_posix()
        except Exception as exc:
            notes.append(f"cam overlays failed ({type(exc).__name__})")
    if task.get("sr") is not None:
        try:
            rel = Path(SR_DIR) / f"{task['stem']}.dcm"
            write_sr(out / rel, **task["sr"])
            result["sr_file"] = rel.as_posix()
        except Exception as exc:
            notes.append(f"SR failed ({type(exc).__name__}: {str(exc)[:120]})")
    result["note"] = "; ".join(notes)
    return result


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------


@dataclass
class _Item:
    rel: str
    path: Path
    attempts: int = 0
    decoded: dict[str, Any] | None = None
    row: dict[str, Any] = field(default_factory=dict)
    payload: dict[str, Any] | None = None  # the post job, kept until it succeeds


def _n_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(device: str = "cpu") -> int:
    """Decode processes. On CPU the cores are split between decoding and inference: measured here
    for 224x224 DenseNet-121 a core decodes a 2k x 2k uncompressed CR in ~14 ms and runs the
    bf16 model in ~22 ms, so ~40% of the cores decode. With a GPU, all cores but one decode."""
    n = _n_cores()
    if device != "cpu":
        return max(1, n - 1)
    return max(1, round(0.4 * n))


def default_threads(workers: int) -> int:
    """CPU inference threads: the cores the decode workers leave free (at least 1)."""
    return max(1, _n_cores() - workers)


def _run_identity(cfg: ScoreConfig, ckpt_id: str, shard: tuple[int, int] | None) -> dict[str, Any]:
    return {
        "input": str(Path(cfg.input_dir).resolve()),
        "checkpoint_sha256_16": ckpt_id,
        "cams": cfg.cams,
        "cam_method": cfg.cam_method,
        "sr": bool(cfg.sr),
        "shard": list(shard) if shard else None,
        "allowed_modalities": sorted(m.upper() for m in cfg.allowed_modalities) if cfg.allowed_modalities else None,
        "max_pixels": cfg.max_pixels,
        "overlay_max_side": cfg.overlay_max_side,
    }


def _results_name(shard: tuple[int, int] | None) -> str:
    return RESULTS_NAME if shard is None else f"results.shard-{shard[0]}-of-{shard[1]}.csv"


def _run_name(shard: tuple[int, int] | None) -> str:
    return RUN_NAME if shard is None else f"run.shard-{shard[0]}-of-{shard[1]}.json"


def _cuda_available() -> bool:
    """Cheap first: without NVIDIA device nodes (Linux) there is no CUDA and torch need not load yet."""
    if os.name == "posix" and not os.path.exists("/dev/nvidiactl") and not os.path.exists("/dev/dxg"):
        return False
    import torch

    return torch.cuda.is_available()


def _validate(cfg: ScoreConfig) -> tuple[int, tuple[int, int] | None]:
    if cfg.cams not in CAM_MODES:
        raise ConfigError(f"--cams must be one of {', '.join(CAM_MODES)}, got {cfg.cams!r}")
    if cfg.cam_method not in CAM_METHODS:
        raise ConfigError(f"--cam-method must be one of {', '.join(CAM_METHODS)}, got {cfg.cam_method!r}")
    if int(cfg.batch_size) < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    on_gpu = str(cfg.device) == "cuda" or (str(cfg.device) == "auto" and _cuda_available())
    workers = default_workers("cuda" if on_gpu else "cpu") if cfg.workers in (None, 0) else int(cfg.workers)
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.max_pixels is not None and int(cfg.max_pixels) < 1:
        raise ConfigError(f"max_pixels must be >= 1, got {cfg.max_pixels}")
    if cfg.overlay_max_side is not None and int(cfg.overlay_max_side) < 16:
        raise ConfigError(
            f"overlay_max_side must be >= 16 (or unset for the original size), got {cfg.overlay_max_side}")
    return workers, parse_shard(cfg.shard)


def score_directory(cfg: ScoreConfig) -> ScoreSummary:
    """Score every file under ``cfg.input_dir``; see the module docstring for the guarantees.

    Raises :class:`ConfigError` / :class:`DataError` / :class:`CheckpointError` (exit code 2 at
    the CLI) for unusable arguments; bad input files only ever become error rows.
    """
    t_start = time.perf_counter()
    workers, shard = _validate(cfg)
    in_root = Path(cfg.input_dir)
    out = Path(cfg.out)
    if not in_root.exists():
        raise DataError(f"input {in_root} does not exist; give the folder holding the DICOM files")
    if not Path(cfg.checkpoint).is_file():
        raise CheckpointError(f"checkpoint {cfg.checkpoint} does not exist (check the path)")
    if not zipfile.is_zipfile(cfg.checkpoint):  # not a torch.save file: fail now, with load's own message
        from medxray.checkpoint import load_checkpoint

        load_checkpoint(cfg.checkpoint)
    # Start the decode workers first: their imports (torch, MONAI) take seconds and overlap
    # everything below, including loading the model.
    pool = new_decode_pool(workers)
    warm = [pool.submit(_ping) for _ in range(workers)]
    lock = None
    try:
        from medxray.checkpoint import load_checkpoint
        from medxray.data.transforms import check_preprocessing
        from medxray.inference import checkpoint_identity

        ckpt = load_checkpoint(cfg.checkpoint)  # CheckpointError for a missing / unsafe / foreign file
        image_size = check_preprocessing(ckpt.metadata.get("preprocessing", {}))
        labels = list(ckpt.metadata.get("label_names") or [])
        if not labels:
            raise CheckpointError(f"checkpoint {cfg.checkpoint} lists no label_names; it cannot name result columns")
        columns = result_columns(labels)
        out.mkdir(parents=True, exist_ok=True)
        identity = _run_identity(cfg, checkpoint_identity(cfg.checkpoint), shard)
        results_path = out / _results_name(shard)
        run_path = out / _run_name(shard)
        lock = _lock_out(out / f".{results_path.name}.lock")
        _check_or_start_run(run_path, results_path, identity, cfg.overwrite)

        files = [(r, p) for r, p in iter_input_files(in_root, exclude=[out]) if in_shard(r, shard)]
        journal = ResultsJournal(results_path, columns)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        if lock is not None:
            lock.close()
        raise
    del warm
    run = _Run(cfg, pool, workers, shard, ckpt, image_size, labels, columns, identity, results_path, run_path,
               files, journal, out, t_start)
    try:
        return _score(run)
    finally:
        lock.close()  # the kernel also drops the lock when a killed run's process dies


@dataclass
class _Run:
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


def _score(run: _Run) -> ScoreSummary:
    from medxray.inference import Predictor

    cfg, pool, workers, shard, out, journal = run.cfg, run.pool, run.workers, run.shard, run.out, run.journal
    files, ckpt, labels, columns, identity = run.files, run.ckpt, run.labels, run.columns, run.identity
    image_size, results_path, run_path, t_start = run.image_size, run.results_path, run.run_path, run.t_start

    scope = {r for r, _ in files}
    todo = [_Item(r, p) for r, p in files if r not in journal.done]
    if cfg.overwrite:  # outputs of the discarded run must not be mistaken for this run's
        for it in todo:
            stem = output_stem(it.rel)
            shutil.rmtree(out / CAMS_DIR / stem, ignore_errors=True)
            (out / SR_DIR / f"{stem}.dcm").unlink(missing_ok=True)
    summary = ScoreSummary(total=len(files), skipped=len(files) - len(todo), results=str(results_path))
    if summary.skipped:
        log.info("resuming: %d of %d files already have a row", summary.skipped, len(files))
    meta = ckpt.metadata
    base_row = {"model": str(meta.get("model_name") or meta.get("architecture", "")),
                "model_version": str(meta.get("model_version") or "unversioned")}
    engine = _Engine(cfg, image_size, journal, out, workers, len(todo), base_row)
    t_work = time.perf_counter()
    predictor = None
    import torch

    threads_before = torch.get_num_threads()
    try:
        if todo:
            engine.start(todo, pool)  # workers decode while the model loads / converts
        else:
            pool.shutdown(wait=False, cancel_futures=True)
        threads = cfg.threads or default_threads(workers)
        torch.set_num_threads(max(1, int(threads)))  # leave cores to the decoders; restored below
        predictor = Predictor.from_checkpoint(ckpt, device=cfg.device, backend=cfg.backend,
                                              precision=cfg.precision, batch_size=cfg.batch_size,
                                              num_threads=threads)
        if list(predictor.label_names) != labels:
            raise CheckpointError("checkpoint label names do not match its model head")
        summary.backend = f"{predictor.backend}/{predictor.precision}/{predictor.device}"
        if todo:
            engine.run(predictor)
    finally:
        torch.set_num_threads(threads_before)
        engine.close()
        summary.scored = engine.written
        rows = journal.finalize(keep=lambda r: r in scope)
    summary.ok = sum(1 for r in rows if r[1] == "ok")
    summary.error = sum(1 for r in rows if r[1] != "ok")
    summary.seconds = time.perf_counter() - t_start
    summary.images_per_s = summary.scored / max(time.perf_counter() - t_work, 1e-9)
    state = {**identity, "complete": True, "columns": columns, "model": predictor.describe(),
             "summary": {k: v for k, v in asdict(summary).items() if k != "merged"}}
    atomic_write_text(run_path, json.dumps(state, indent=2) + "\n")
    if shard is not None:
        summary.merged = _merge_shards_if_complete(out, shard[1], identity, columns)
    return summary


def _lock_out(path: Path) -> Any:
    """One writer per results file: a second scorer on the same OUT (and shard) stops with a clear error."""
    fh = open(path, "a+")
    try:
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no fcntl (Windows): no cross-process lock
        pass
    except OSError:
        fh.close()
        raise ConfigError(f"another scorer is already writing {path.parent} (lock {path.name}); "
                          "wait for it, or use another --out / --shard") from None
    return fh


def _check_or_start_run(run_path: Path, results_path: Path, identity: dict[str, Any], overwrite: bool) -> None:
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
        raise ConfigError(f"{results_path} exists but has no run record ({run_path.name}) from this scorer; "
                          "use a new --out folder or --overwrite")
    atomic_write_text(run_path, json.dumps({**identity, "complete": False}, indent=2) + "\n")


def _merge_shards_if_complete(out: Path, n: int, identity: dict[str, Any], columns: list[str]) -> str | None:
    """When every shard k/n has finished in this folder, write the merged results.csv.

    Each shard marks itself complete before looking at the others, so the last to finish
    always sees all of them (two finishing together both write the same file, atomically).
    """
    parts = []
    same = {key: v for key, v in identity.items() if key != "shard"}
    for k in range(1, n + 1):
        try:
            state = json.loads((out / _run_name((k, n))).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not state.get("complete") or any(state.get(key) != v for key, v in same.items()):
            return None
        parts.append(out / _results_name((k, n)))
    rows: dict[str, list[str]] = {}
    for part in parts:
        _, part_rows, _ = read_results(part, columns)
        for r in part_rows:
            rows.setdefault(r[0], r)
    merged = out / RESULTS_NAME
    atomic_write_text(merged, _csv_text(columns, [rows[k] for k in sorted(rows)]))
    return str(merged)


class _Engine:
    """Decode pool + batched inference + post-processing jobs, with crash isolation.

    Normal mode keeps up to ``max_buffer`` files decoding or decoded ahead of inference. When a
    worker dies (a codec segfault, the OOM killer), every job that was in flight becomes a
    suspect and the engine enters quarantine: suspects run one at a time, alone, so a file
    that kills a worker while running alone is the culprit and gets an error row; the others
    finish normally. Then normal mode resumes.
    """

    def __init__(self, cfg: ScoreConfig, image_size: int, journal: ResultsJournal, out: Path, workers: int,
                 total: int, base_row: dict[str, str]) -> None:
        from tqdm.auto import tqdm

        self.cfg = cfg
        self.image_size = image_size
        self.p: Any = None
        self.journal = journal
        self.out = out
        self.workers = workers
        self.bs = int(cfg.batch_size)
        self.want_display = cfg.cams != "none"
        self.decode_fn = cfg.decode_fn or decode_job
        self.written = 0
        self.max_buffer = max(2 * self.bs, self.bs + 4 * workers)
        self.pool: ProcessPoolExecutor | None = None
        self.queue: list[_Item] = []
        self.inflight: dict[Future, tuple[str, _Item]] = {}
        self.ready: list[_Item] = []
        self.suspects: list[tuple[str, _Item]] = []
        self.quarantine = False
        self.base_row = dict(base_row)
        self.bar = tqdm(total=total, unit="file", desc="score-dicom", disable=True if not cfg.progress else None,
                        dynamic_ncols=True, mininterval=0.5)

    # -- pool ------------------------------------------------------------------------------

    def _new_pool(self) -> ProcessPoolExecutor:
        return new_decode_pool(self.workers, self.image_size)

    def _submit(self, kind: str, item: _Item) -> None:
        assert self.pool is not None
        if kind == "decode":
            fut = self.pool.submit(self.decode_fn, str(item.path), self.image_size, self.cfg.allowed_modalities,
                                   self.cfg.max_pixels, self.want_display)
        else:
            fut = self.pool.submit(post_job, item.payload)
        self.inflight[fut] = (kind, item)

    def _launch(self, kind: str, item: _Item) -> None:
        """Submit now, or queue behind the suspects while in quarantine."""
        if self.quarantine:
            self.suspects.insert(0, (kind, item))
        else:
            self._submit(kind, item)

    def _n_decoding(self) -> int:
        return sum(1 for k, _ in self.inflight.values() if k == "decode")

    def _top_up(self) -> None:
        while self.queue and self._n_decoding() + len(self.ready) < self.max_buffer:
            self._submit("decode", self.queue.pop())

    def start(self, todo: list[_Item], pool: ProcessPoolExecutor | None = None) -> None:
        self.queue = list(reversed(todo))
        self.pool = pool or self._new_pool()
        self._top_up()

    def close(self) -> None:
        self.bar.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    # -- main loop -------------------------------------------------------------------------

    def _more_decodes_coming(self) -> bool:
        return bool(self.queue) or self._n_decoding() > 0 or any(k == "decode" for k, _ in self.suspects)

    def run(self, predictor: Any) -> None:
        self.p = predictor
        while True:
            if self.quarantine and not self.inflight:
                if self.suspects:
                    kind, item = self.suspects.pop()
                    self._submit(kind, item)  # alone
                else:
                    self.quarantine = False
            if not self.quarantine:
                self._top_up()
            if self.ready and (len(self.ready) >= self.bs or not self._more_decodes_coming()):
                batch, self.ready = self.ready[: self.bs], self.ready[self.bs:]
                self._infer(batch)
                continue
            if not self.inflight:
                if self.queue or self.suspects or self.ready:
                    continue
                break
            done, _ = wait(list(self.inflight), return_when=FIRST_COMPLETED)
            for fut in done:
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
            res = ({"status": "error", "reason": f"decode_failed: worker error {type(exc).__name__}"}
                   if kind == "decode" else {"note": f"outputs failed ({type(exc).__name__})"})
        self._handle(kind, item, res)

    def _handle(self, kind: str, item: _Item, res: dict[str, Any]) -> None:
        if kind == "decode":
            if res.get("status") == "ok":
                item.decoded = res
                self.ready.append(item)
            else:
                self._write({"path": item.rel, "status": "error", "reason": res.get("reason", "error")})
            return
        row = item.row
        row["cam_dir"], row["sr_file"] = res.get("cam_dir", ""), res.get("sr_file", "")
        if res.get("note"):
            row["reason"] = res["note"]
        item.payload = None
        self._write(row)

    def _pool_broke(self, lost: list[tuple[str, _Item]]) -> None:
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
            log.warning("a worker process died; re-running %d job(s) one at a time to find the cause",
                        len(self.suspects))
            self.quarantine = True

    def _check_pool_works(self) -> None:
        """Before blaming a file, prove a fresh worker can run at all (else every file would be blamed)."""
        assert self.pool is not None
        try:
            ok = self.pool.submit(_ping).result(timeout=300)
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

    def _crashed(self, kind: str, item: _Item) -> None:
        if kind == "decode":
            self._write({"path": item.rel, "status": "error",
                         "reason": "decode_failed: the decoder process crashed on this file"})
        else:
            row = item.row
            row["reason"] = "outputs failed: the worker process crashed writing CAMs/SR"
            item.payload = None
            self._write(row)

    # -- inference and rows ----------------------------------------------------------------

    def _infer(self, batch: list[_Item]) -> None:
        import torch

        x = torch.from_numpy(np.stack([it.decoded["x"] for it in batch]))
        cams = None
        if self.cfg.cams == "none":
            probs = self.p.predict_tensor(x)
        elif self.cfg.cam_method == "gradcam":
            from medxray.cam import grad_cam

            logits, cams = grad_cam(self.p.model, x.to(self.p.device))
            probs = (1.0 / (1.0 + np.exp(-logits.cpu().numpy().astype(np.float64)))).astype(np.float32)
        else:
            probs, cams = self.p.predict_tensor_with_cams(x)
        positives = self.p.positive(probs)
        names = self.p.label_names
        for i, it in enumerate(batch):
            d = it.decoded
            meta = d["meta"]
            window = d.get("window")
            row = {
                "path": it.rel, "status": "ok", "reason": "",
                "sop_instance_uid": meta.get("sop_instance_uid", ""),
                "study_instance_uid": meta.get("study_instance_uid", ""),
                "series_instance_uid": meta.get("series_instance_uid", ""),
                "modality": meta.get("modality", ""), "view_position": meta.get("view_position", ""),
                "positive_findings": ";".join(positives[i]), "warnings": "; ".join(d.get("warnings") or []),
                "is_lateral": bool(d.get("is_lateral")), "rows": meta.get("rows"), "columns": meta.get("columns"),
                "window_center": window[0] if window else "", "window_width": window[1] if window else "",
            }
            for j, n in enumerate(names):
                row[f"p_{n}"] = f"{float(probs[i, j]):.4f}"
            it.row = row
            classes: list[int] = []
            if cams is not None:
                classes = list(range(len(names))) if self.cfg.cams == "all" else [names.index(n) for n in positives[i]]
            sr = None
            if self.cfg.sr:
                keys = ("sop_class_uid", "sop_instance_uid", "study_instance_uid", "series_instance_uid", "modality")
                sr = {"source": {k: meta.get(k, "") for k in keys}, "label_names": names,
                      "probabilities": [float(v) for v in probs[i]], "positives": positives[i],
                      "model_name": self.p.model_name, "model_version": self.p.model_version,
                      "thresholds": self.p.thresholds}
            display = d.get("display")
            it.decoded = None  # free the decoded pixels of this file
            if classes or sr is not None:
                it.payload = {
                    "out": str(self.out), "stem": output_stem(it.rel), "classes": [names[c] for c in classes],
                    "class_probs": [float(probs[i, c]) for c in classes],
                    "cams": cams[i, classes] if classes else None, "display": display if classes else None,
                    "cam_method": self.cfg.cam_method, "overlay_max_side": self.cfg.overlay_max_side, "sr": sr,
                }
                self._launch("post", it)
            else:
                self._write(row)

    def _write(self, row: dict[str, Any]) -> None:
        self.journal.write({**self.base_row, **row})
        self.written += 1
        self.bar.update(1)


def load_score_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                      **values: Any) -> ScoreConfig:
    """A :class:`ScoreConfig` from a YAML file, ``key=value`` overrides (YAML-typed) and keywords.

    Unknown keys are a :class:`ConfigError` (a typo must not silently fall back to a default).
    """
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        data.update(load_yaml_mapping(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        data[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    data.update(values)
    known = {f.name for f in fields(ScoreConfig)} - {"decode_fn"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown scoring option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    missing = [k for k in ("input_dir", "checkpoint", "out") if not data.get(k)]
    if missing:
        raise ConfigError(f"scoring needs {', '.join(missing)} (in the config or as key=value)")
    if data.get("allowed_modalities") in ("any", "ANY"):
        data["allowed_modalities"] = None
    return ScoreConfig(**data)
