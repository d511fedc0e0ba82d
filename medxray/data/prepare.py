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
from typing import Any

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
    from tqdm.auto import tqdm

    if int(size) < 16:
        raise ConfigError(f"cache --size must be at least 16 pixels, got {size}")
    size = int(size)
    workers = max(1, int(workers if workers is not None else min(os.cpu_count() or 1, 8)))
    splits = build_datasets(
        dataset,
        data_root,
        image_size=size,
        use_cache=False,
        augment=False,
        allow_missing=allow_missing,
        **dataset_options,
    )
    names: list[str] = []
    paths: list[str] = []
    for ds in (splits.train, splits.val, splits.test):
        if ds is not None:
            names += ds.records.names
            paths += ds.records.paths
    label_sha = splits.summary.get("label_sha256", "")
    path = cache_path(data_root, dataset, size, cache_dir)
    fingerprint = {
        "format": CACHE_FORMAT,
        "dataset": dataset,
        "size": size,
        "label_sha256": label_sha,
        "names_sha256": names_sha256(names),
        "n": len(names),
    }
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the cache folder {path} ({exc.strerror}); pass --cache-dir to a writable place"
        ) from None
    meta_path = path / "meta.json"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    resume = old is not None and all(old.get(k) == v for k, v in fingerprint.items())
    n = len(names)
    if resume:
        status = open_array(path / "status.u8", np.uint8, (n,), "r+")
        orig = open_array(path / "orig.i32", np.int32, (n, 2), "r+")
        crc = open_array(path / "crc.u32", np.uint32, (n,), "r+")
        bad = json.loads((path / "bad.json").read_text()) if (path / "bad.json").is_file() else {}
        log.info("resuming preprocessing cache %s: %d of %d images already done", path, int((status == DONE).sum()), n)
    else:
        if old is not None:
            log.info("rebuilding preprocessing cache %s: it was built for other images, size or label file", path)
        write_json(meta_path, {**fingerprint, "state": "building"})
        (path / "names.txt").write_text("\n".join(names))
        open_array(path / "pixels.u8", np.uint8, (n, size, size), "w+")
        status = open_array(path / "status.u8", np.uint8, (n,), "w+")
        orig = open_array(path / "orig.i32", np.int32, (n, 2), "w+")
        crc = open_array(path / "crc.u32", np.uint32, (n,), "w+")
        bad = {}
    todo = [(int(r), paths[r]) for r in np.flatnonzero(status == TODO)]
    if max_items is not None:
        todo = todo[: int(max_items)]
    chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
    t0 = time.perf_counter()
    done_now = 0
    bar = tqdm(total=len(todo), desc=f"caching {dataset} at {size}px", unit="img", disable=not progress)

    def record(results: list[tuple[int, int, int, int, int, str]]) -> None:
        nonlocal done_now
        for row, st, h, w, c, reason in results:
            orig[row] = (h, w)
            crc[row] = c
            status[row] = st
            if st == BAD:
                bad[names[row]] = reason
        status.flush(), orig.flush(), crc.flush()
        done_now += len(results)
        bar.update(len(results))

    pix_path = str(path / "pixels.u8")
    try:
        if workers == 1 or len(chunks) <= 1:
            _init_worker(pix_path, n, size, False)
            try:
                for ch in chunks:
                    record(_process_chunk(ch))
            finally:
                _worker_state.clear()
        else:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(
                min(workers, len(chunks)), initializer=_init_worker, initargs=(pix_path, n, size, True)
            ) as pool:
                for results in pool.imap_unordered(_process_chunk, chunks):
                    record(results)
    finally:
        bar.close()
        write_json(path / "bad.json", bad)
    seconds = time.perf_counter() - t0
    n_done, n_bad, n_todo = int((status == DONE).sum()), int((status == BAD).sum()), int((status == TODO).sum())
    state = "complete" if n_todo == 0 else "building"
    sizes = orig[status == DONE]
    # a phantom drawn at another size has its boxes in its own pixels, so only real roots are checked
    expected = None if splits.summary.get("synthetic") else EXPECTED_SIZES.get(dataset)
    unexpected = int(((sizes[:, 0] != expected[0]) | (sizes[:, 1] != expected[1])).sum()) if expected else 0
    report = {
        **fingerprint,
        "state": state,
        "done": n_done,
        "bad": n_bad,
        "todo": n_todo,
        "unexpected_size": unexpected,
        "missing_dropped": splits.summary.get("missing_dropped", 0),
        "synthetic": bool(splits.summary.get("synthetic", False)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(meta_path, report)
    if n_bad:
        log.warning(
            "%d unreadable image(s) were left out of the cache and of training (first: %s); see %s",
            n_bad,
            ", ".join(list(bad)[:3]),
            path / "bad.json",
        )
    if unexpected:
        log.warning(
            "%d image(s) are not %dx%d as NIH ships them; bounding boxes of those images will not line up",
            unexpected,
            *expected,
        )
    return {
        **report,
        "path": str(path),
        "processed_now": done_now,
        "seconds": round(seconds, 2),
        "images_per_s": round(done_now / seconds, 1) if seconds > 0 else None,
    }
