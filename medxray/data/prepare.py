"""Building the preprocessing cache (``medxray data prepare``): decode every image of a dataset once,
resize it and store it in the uint8 memmap described in :mod:`medxray.data.cache`.

Resumable: workers write pixel rows first; the main process marks a row done only after its chunk
has been flushed, so a killed run re-does only the rows still marked to-do. Imports the dataset
builders and the cache store; neither may import this module.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medxray.data import build_datasets
from medxray.data.cache import (
    BAD,
    CACHE_FORMAT,
    CHUNK,
    DONE,
    EXPECTED_SIZES,
    TODO,
    cache_path,
    names_sha256,
    open_array,
    write_json,
)
from medxray.data.imageio import read_image
from medxray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_worker_state: dict[str, Any] = {}


def _init_worker(pixels_path: str, n: int, size: int, set_threads: bool) -> None:
    if set_threads:  # a forked pool worker: first of all it dies with the builder (which resumes when re-run)
        from medxray.procutil import exit_with_parent

        exit_with_parent()
    from monai.transforms import Compose

    from medxray.data.transforms import scale_resize_transforms

    if set_threads:  # one thread each, the pool supplies the parallelism
        import torch

        torch.set_num_threads(1)
    _worker_state["mm"] = np.memmap(pixels_path, dtype=np.uint8, mode="r+", shape=(n, size, size))
    _worker_state["tf"] = Compose(scale_resize_transforms(size))


def decode_resize_u8(path: str, transform: Any) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one file and apply the cache's part of the deterministic list; uint8 (S, S)."""
    import torch

    arr, orig = read_image(path)
    out = transform({"image": arr})["image"]
    out = torch.as_tensor(out)[0].mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return out.numpy(), orig


def _process_chunk(chunk: list[tuple[int, str]]) -> list[tuple[int, int, int, int, int, str]]:
    mm, tf = _worker_state["mm"], _worker_state["tf"]
    out = []
    for row, path in chunk:
        try:
            pix, (h, w) = decode_resize_u8(path, tf)
        except DataError as exc:
            out.append((row, BAD, 0, 0, 0, str(exc)))
            continue
        mm[row] = pix
        out.append((row, DONE, h, w, zlib.crc32(pix.tobytes()), ""))
    mm.flush()
    return out


@dataclass(frozen=True)
class _ImageList:
    """Every image of a dataset over all splits, in cache row order (train, val, test)."""

    splits: Any  # medxray.data.DatasetSplits
    names: list[str]
    paths: list[str]


@dataclass(frozen=True)
class _CacheArrays:
    """The opened per-row arrays of one cache folder (memmaps, written in place) and the
    bad-image reasons by name (a dict filled in place)."""

    status: np.ndarray  # (N,) uint8 TODO / DONE / BAD
    orig: np.ndarray  # (N, 2) int32 original (H, W)
    crc: np.ndarray  # (N,) uint32 CRC-32 of the cached pixels
    bad: dict[str, str]


def _list_images(
    dataset: str, data_root: str | os.PathLike, size: int, allow_missing: bool, options: dict[str, Any]
) -> _ImageList:
    """The image list :func:`medxray.data.build_datasets` gives for ``dataset`` (no cache, no
    augmentation); raises its :class:`DataError` for missing files unless ``allow_missing``."""
    splits = build_datasets(
        dataset,
        data_root,
        image_size=size,
        use_cache=False,
        augment=False,
        allow_missing=allow_missing,
        **options,
    )
    names: list[str] = []
    paths: list[str] = []
    for ds in (splits.train, splits.val, splits.test):
        if ds is not None:
            names += ds.records.names
            paths += ds.records.paths
    return _ImageList(splits=splits, names=names, paths=paths)


def _open_cache(path: Path, fingerprint: dict[str, Any], names: list[str], size: int) -> _CacheArrays:
    """Open the cache in ``path`` for resuming when its ``meta.json`` matches ``fingerprint``,
    else (re)create it empty: meta in state "building", ``names.txt`` and zeroed arrays for
    ``len(names)`` rows of ``size`` x ``size`` pixels."""
    meta_path = path / "meta.json"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    resume = old is not None and all(old.get(k) == v for k, v in fingerprint.items())
    n = len(names)
    if resume:
        status = open_array(path / "status.u8", np.uint8, (n,), "r+")
        arrays = _CacheArrays(
            status=status,
            orig=open_array(path / "orig.i32", np.int32, (n, 2), "r+"),
            crc=open_array(path / "crc.u32", np.uint32, (n,), "r+"),
            bad=json.loads((path / "bad.json").read_text()) if (path / "bad.json").is_file() else {},
        )
        log.info("resuming preprocessing cache %s: %d of %d images already done", path, int((status == DONE).sum()), n)
        return arrays
    if old is not None:
        log.info("rebuilding preprocessing cache %s: it was built for other images, size or label file", path)
    write_json(meta_path, {**fingerprint, "state": "building"})
    (path / "names.txt").write_text("\n".join(names))
    open_array(path / "pixels.u8", np.uint8, (n, size, size), "w+")
    return _CacheArrays(
        status=open_array(path / "status.u8", np.uint8, (n,), "w+"),
        orig=open_array(path / "orig.i32", np.int32, (n, 2), "w+"),
        crc=open_array(path / "crc.u32", np.uint32, (n,), "w+"),
        bad={},
    )


def _run_chunks(
    chunks: list[list[tuple[int, str]]],
    pix_path: str,
    shape: tuple[int, int],
    workers: int,
    record: Callable[[list[tuple[int, int, int, int, int, str]]], None],
) -> None:
    """Decode every chunk into the pixel memmap (``shape`` = (rows, size)), in this process when
    ``workers`` is 1 or there is one chunk, else in a forked pool; ``record`` gets each chunk's
    results once its pixels are flushed."""
    n, size = shape
    if workers == 1 or len(chunks) <= 1:
        _init_worker(pix_path, n, size, False)
        try:
            for ch in chunks:
                record(_process_chunk(ch))
        finally:
            _worker_state.clear()
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(min(workers, len(chunks)), initializer=_init_worker, initargs=(pix_path, n, size, True)) as pool:
        for results in pool.imap_unordered(_process_chunk, chunks):
            record(results)


def _fill(
    path: Path,
    arrays: _CacheArrays,
    images: _ImageList,
    shape: tuple[int, int],
    workers: int,
    max_items: int | None,
    progress: str | None,
) -> int:
    """Decode the rows still to do (at most ``max_items``) and mark each DONE or BAD after its chunk
    is flushed; ``bad.json`` is written even when interrupted. ``progress``: the progress bar's
    title, None for no bar. Returns the rows processed."""
    from tqdm.auto import tqdm

    todo = [(int(r), images.paths[r]) for r in np.flatnonzero(arrays.status == TODO)]
    if max_items is not None:
        todo = todo[: int(max_items)]
    chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
    done_now = 0
    bar = tqdm(total=len(todo), desc=progress, unit="img", disable=progress is None)

    def record(results: list[tuple[int, int, int, int, int, str]]) -> None:
        nonlocal done_now
        for row, st, h, w, c, reason in results:
            arrays.orig[row] = (h, w)
            arrays.crc[row] = c
            arrays.status[row] = st
            if st == BAD:
                arrays.bad[images.names[row]] = reason
        arrays.status.flush(), arrays.orig.flush(), arrays.crc.flush()
        done_now += len(results)
        bar.update(len(results))

    try:
        _run_chunks(chunks, str(path / "pixels.u8"), shape, workers, record)
    finally:
        bar.close()
        write_json(path / "bad.json", arrays.bad)
    return done_now


def _final_report(
    dataset: str, fingerprint: dict[str, Any], arrays: _CacheArrays, summary: dict[str, Any]
) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """The cache's final ``meta.json`` content (counts by state, images of unexpected size) and
    the size checked against (None for phantoms and datasets without one)."""
    status = arrays.status
    n_done, n_bad, n_todo = int((status == DONE).sum()), int((status == BAD).sum()), int((status == TODO).sum())
    sizes = arrays.orig[status == DONE]
    # a phantom drawn at another size has its boxes in its own pixels, so only real roots are checked
    expected = None if summary.get("synthetic") else EXPECTED_SIZES.get(dataset)
    unexpected = int(((sizes[:, 0] != expected[0]) | (sizes[:, 1] != expected[1])).sum()) if expected else 0
    report = {
        **fingerprint,
        "state": "complete" if n_todo == 0 else "building",
        "done": n_done,
        "bad": n_bad,
        "todo": n_todo,
        "unexpected_size": unexpected,
        "missing_dropped": summary.get("missing_dropped", 0),
        "synthetic": bool(summary.get("synthetic", False)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return report, expected


def _log_problems(report: dict[str, Any], bad: dict[str, str], expected: tuple[int, int] | None, path: Path) -> None:
    """Warn about images left out as unreadable and images not of the size the dataset ships."""
    if report["bad"]:
        log.warning(
            "%d unreadable image(s) were left out of the cache and of training (first: %s); see %s",
            report["bad"],
            ", ".join(list(bad)[:3]),
            path / "bad.json",
        )
    if report["unexpected_size"]:
        log.warning(
            "%d image(s) are not %dx%d as NIH ships them; bounding boxes of those images will not line up",
            report["unexpected_size"],
            *expected,
        )


def prepare_cache(
    dataset: str,
    data_root: str | os.PathLike,
    size: int = 256,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    allow_missing: bool = False,
    progress: bool = True,
    max_items: int | None = None,
    **dataset_options: Any,
) -> dict[str, Any]:
    """Build (or finish) the cache of every image of ``dataset`` under ``data_root``.

    The image list is the one :func:`medxray.data.build_datasets` uses, over all splits. Missing
    files raise the same :class:`DataError` as training unless ``allow_missing``. An unreadable
    image is recorded as bad (counted, named in ``bad.json``, left out of training) and does not
    stop the run. ``max_items`` stops after that many new images (for tests of resuming).
    Returns a report dict (counts, path, seconds, images/s).
    """
    if int(size) < 16:
        raise ConfigError(f"cache --size must be at least 16 pixels, got {size}")
    size = int(size)
    workers = max(1, int(workers if workers is not None else min(os.cpu_count() or 1, 8)))
    images = _list_images(dataset, data_root, size, allow_missing, dataset_options)
    path = cache_path(data_root, dataset, size, cache_dir)
    fingerprint = {
        "format": CACHE_FORMAT,
        "dataset": dataset,
        "size": size,
        "label_sha256": images.splits.summary.get("label_sha256", ""),
        "names_sha256": names_sha256(images.names),
        "n": len(images.names),
    }
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the cache folder {path} ({exc.strerror}); pass --cache-dir to a writable place"
        ) from None
    arrays = _open_cache(path, fingerprint, images.names, size)
    t0 = time.perf_counter()
    title = f"caching {dataset} at {size}px" if progress else None
    done_now = _fill(path, arrays, images, (len(images.names), size), workers, max_items, title)
    seconds = time.perf_counter() - t0
    report, expected = _final_report(dataset, fingerprint, arrays, images.splits.summary)
    write_json(path / "meta.json", report)
    _log_problems(report, arrays.bad, expected, path)
    return {
        **report,
        "path": str(path),
        "processed_now": done_now,
        "seconds": round(seconds, 2),
        "images_per_s": round(done_now / seconds, 1) if seconds > 0 else None,
    }
