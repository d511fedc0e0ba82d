"""Preprocessing cache: decode every image once, resize it, keep it as uint8 in a memmap.

Decoding a 1024x1024 PNG costs far more than the whole rest of the input pipeline. The cache
stores the output of the deterministic list's first part (:func:`scale_resize_transforms`:
bit-depth scaling + area resize) quantised to uint8, so one training epoch only reads S*S bytes
per image and runs the remaining transforms.

Layout of ``CACHE_ROOT/<dataset>_<size>/`` (CACHE_ROOT defaults to ``DATA_ROOT/medxray_cache``)::

    meta.json     format, dataset, size, label-file SHA-256, SHA-256 of names.txt, state, counts
    names.txt     one image name per row, in row order
    pixels.u8     N x S x S uint8, row-major (a raw memmap: instant to create, sparse until written)
    status.u8     N bytes: 0 = to do, 1 = done, 2 = unreadable image
    orig.i32      N x 2 original (H, W);   crc.u32   N CRC-32 of each row (for verify)
    bad.json      name -> reason for every unreadable image

Resumable: workers write pixel rows first. The main process marks a row done only after its
chunk has been flushed. A killed ``prepare`` re-run with the same arguments therefore only does
the rows still marked 0. Verified: a cache is used only if its format, size, label-file hash and
state match. ``verify_cache(full=True)`` re-checks every row's CRC.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from medxray.errors import ConfigError, DataError
from medxray.fileio import atomic_write_text

log = logging.getLogger(__name__)

CACHE_FORMAT = "medxray-pixel-cache/1"
CACHE_DIRNAME = "medxray_cache"
TODO, DONE, BAD = 0, 1, 2
CHUNK = 32
EXPECTED_SIZES = {"chestxray14": (1024, 1024)}


def cache_root(data_root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir) if cache_dir else Path(data_root) / CACHE_DIRNAME


def cache_path(data_root: str | os.PathLike, dataset: str, size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(data_root, cache_dir) / f"{dataset}_{int(size)}"


def _names_sha(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def _open_array(path: Path, dtype: Any, shape: tuple[int, ...], mode: str) -> np.memmap:
    if mode == "w+":
        with open(path, "wb") as fh:  # sparse file of the right length: creation is instant
            fh.truncate(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        mode = "r+"
    return np.memmap(path, dtype=dtype, mode=mode, shape=shape)


class PixelCache:
    """A finished cache opened for reading. Picklable: each process maps the pixels itself."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
            self.names = (self.path / "names.txt").read_text().split("\n") if self.meta.get("n") else []
        except (OSError, ValueError) as exc:
            raise DataError(f"preprocessing cache {self.path} is unreadable ({exc}); delete it and re-run "
                            f"`medxray data prepare`") from None
        if self.meta.get("format") != CACHE_FORMAT:
            raise DataError(f"preprocessing cache {self.path} has format {self.meta.get('format')!r}, this medxray "
                            f"reads {CACHE_FORMAT!r}; delete it and re-run `medxray data prepare`")
        self.n = int(self.meta["n"])
        self.size = int(self.meta["size"])
        if len(self.names) != self.n or _names_sha(self.names) != self.meta.get("names_sha256"):
            raise DataError(f"preprocessing cache {self.path}: names.txt does not match meta.json; delete the cache "
                            f"and re-run `medxray data prepare`")
        try:
            self.status = np.fromfile(self.path / "status.u8", dtype=np.uint8)
            self.orig = np.fromfile(self.path / "orig.i32", dtype=np.int32).reshape(-1, 2)
            pix_bytes = (self.path / "pixels.u8").stat().st_size
        except (OSError, ValueError) as exc:
            raise DataError(f"preprocessing cache {self.path} is incomplete ({exc}); re-run `medxray data prepare`") from None
        if len(self.status) != self.n or len(self.orig) != self.n or pix_bytes != self.n * self.size * self.size:
            raise DataError(f"preprocessing cache {self.path} has files of the wrong size (interrupted copy?); "
                            f"re-run `medxray data prepare`")
        self._row = {n: i for i, n in enumerate(self.names)}
        self._pixels: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pixels"] = None
        return state

    @property
    def complete(self) -> bool:
        return self.meta.get("state") == "complete"

    def rows_for(self, names: Iterable[str]) -> np.ndarray:
        """Row of each name, -1 where the cache lacks it or its image was unreadable."""
        rows = np.fromiter((self._row.get(n, -1) for n in names), dtype=np.int64)
        ok = rows >= 0
        ok[ok] = self.status[rows[ok]] == DONE
        rows[~ok] = -1
        return rows

    def pixels(self) -> np.memmap:
        if self._pixels is None:
            self._pixels = np.memmap(self.path / "pixels.u8", dtype=np.uint8, mode="r",
                                     shape=(self.n, self.size, self.size))
        return self._pixels

    def read(self, row: int) -> np.ndarray:
        """uint8 (S, S) pixels of one row (a writable copy)."""
        return np.array(self.pixels()[row])

    def orig_size(self, row: int) -> tuple[int, int]:
        h, w = self.orig[row]
        return int(h), int(w)


def find_cache(data_root: str | os.PathLike, dataset: str, image_size: int, label_sha256: str, *,
               cache_dir: str | os.PathLike | None = None) -> PixelCache | None:
    """The smallest finished cache of ``dataset`` at >= ``image_size`` built from this label file."""
    root = cache_root(data_root, cache_dir)
    if not root.is_dir():
        log.info("no preprocessing cache under %s: decoding image files (run `medxray data prepare` for much "
                 "faster epochs)", root)
        return None
    candidates = []
    for d in root.glob(f"{dataset}_*"):
        try:
            size = int(d.name.rsplit("_", 1)[1])
        except ValueError:
            continue
        if size >= image_size and (d / "meta.json").is_file():
            candidates.append((size, d))
    for size, d in sorted(candidates):
        try:
            cache = PixelCache(d)
        except DataError as exc:
            log.warning("ignoring preprocessing cache: %s", exc)
            continue
        if not cache.complete:
            log.warning("ignoring unfinished preprocessing cache %s; re-run `medxray data prepare` to finish it", d)
            continue
        if cache.meta.get("label_sha256") != label_sha256:
            log.warning("ignoring preprocessing cache %s: it was built for another label file; re-run "
                        "`medxray data prepare`", d)
            continue
        log.info("using preprocessing cache %s (%d images at %dx%d)", d, cache.n, size, size)
        return cache
    if not candidates:
        log.info("no preprocessing cache of %s at >= %d px under %s: decoding image files", dataset, image_size, root)
    return None


# --------------------------------------------------------------------------------------------
# building


_worker_state: dict[str, Any] = {}


def _init_worker(pixels_path: str, n: int, size: int, set_threads: bool) -> None:
    from monai.transforms import Compose

    from medxray.data.transforms import scale_resize_transforms

    if set_threads:  # a forked pool worker: one thread each, the pool supplies the parallelism
        import torch

        torch.set_num_threads(1)
    _worker_state["mm"] = np.memmap(pixels_path, dtype=np.uint8, mode="r+", shape=(n, size, size))
    _worker_state["tf"] = Compose(scale_resize_transforms(size))


def decode_resize_u8(path: str, transform: Any) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one file and apply the cache's part of the deterministic list; uint8 (S, S)."""
    import torch

    from medxray.data.core import read_image

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


def prepare_cache(dataset: str, data_root: str | os.PathLike, size: int = 256, *,
                  cache_dir: str | os.PathLike | None = None, workers: int | None = None, allow_missing: bool = False,
                  progress: bool = True, max_items: int | None = None, **dataset_options: Any) -> dict[str, Any]:
    """Build (or finish) the cache of every image of ``dataset`` under ``data_root``.

    The image list is the one :func:`medxray.data.build_datasets` uses, over all splits. Missing
    files raise the same :class:`DataError` as training unless ``allow_missing``. An unreadable
    image is recorded as bad (counted, named in ``bad.json``, left out of training) and does not
    stop the run. ``max_items`` stops after that many new images (for tests of resuming).
    Returns a report dict (counts, path, seconds, images/s).
    """
    from tqdm.auto import tqdm

    from medxray.data import build_datasets

    if int(size) < 16:
        raise ConfigError(f"cache --size must be at least 16 pixels, got {size}")
    size = int(size)
    workers = max(1, int(workers if workers is not None else min(os.cpu_count() or 1, 8)))
    splits = build_datasets(dataset, data_root, image_size=size, use_cache=False, augment=False,
                            allow_missing=allow_missing, **dataset_options)
    names: list[str] = []
    paths: list[str] = []
    for ds in (splits.train, splits.val, splits.test):
        if ds is not None:
            names += ds.records.names
            paths += ds.records.paths
    label_sha = splits.summary.get("label_sha256", "")
    path = cache_path(data_root, dataset, size, cache_dir)
    fingerprint = {"format": CACHE_FORMAT, "dataset": dataset, "size": size, "label_sha256": label_sha,
                   "names_sha256": _names_sha(names), "n": len(names)}
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache folder {path} ({exc.strerror}); pass --cache-dir to a writable "
                        f"place") from None
    meta_path = path / "meta.json"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    resume = old is not None and all(old.get(k) == v for k, v in fingerprint.items())
    n = len(names)
    if resume:
        status = _open_array(path / "status.u8", np.uint8, (n,), "r+")
        orig = _open_array(path / "orig.i32", np.int32, (n, 2), "r+")
        crc = _open_array(path / "crc.u32", np.uint32, (n,), "r+")
        bad = json.loads((path / "bad.json").read_text()) if (path / "bad.json").is_file() else {}
        log.info("resuming preprocessing cache %s: %d of %d images already done", path, int((status == DONE).sum()), n)
    else:
        if old is not None:
            log.info("rebuilding preprocessing cache %s: it was built for other images, size or label file", path)
        _write_json(meta_path, {**fingerprint, "state": "building"})
        (path / "names.txt").write_text("\n".join(names))
        _open_array(path / "pixels.u8", np.uint8, (n, size, size), "w+")
        status = _open_array(path / "status.u8", np.uint8, (n,), "w+")
        orig = _open_array(path / "orig.i32", np.int32, (n, 2), "w+")
        crc = _open_array(path / "crc.u32", np.uint32, (n,), "w+")
        bad = {}
    todo = [(int(r), paths[r]) for r in np.flatnonzero(status == TODO)]
    if max_items is not None:
        todo = todo[: int(max_items)]
    chunks = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
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
            with ctx.Pool(min(workers, len(chunks)), initializer=_init_worker, initargs=(pix_path, n, size, True)) as pool:
                for results in pool.imap_unordered(_process_chunk, chunks):
                    record(results)
    finally:
        bar.close()
        _write_json(path / "bad.json", bad)
    seconds = time.perf_counter() - t0
    n_done, n_bad, n_todo = int((status == DONE).sum()), int((status == BAD).sum()), int((status == TODO).sum())
    state = "complete" if n_todo == 0 else "building"
    sizes = orig[status == DONE]
    # a phantom drawn at another size has its boxes in its own pixels, so only real roots are checked
    expected = None if splits.summary.get("synthetic") else EXPECTED_SIZES.get(dataset)
    unexpected = int(((sizes[:, 0] != expected[0]) | (sizes[:, 1] != expected[1])).sum()) if expected else 0
    report = {**fingerprint, "state": state, "done": n_done, "bad": n_bad, "todo": n_todo,
              "unexpected_size": unexpected, "missing_dropped": splits.summary.get("missing_dropped", 0),
              "synthetic": bool(splits.summary.get("synthetic", False)), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_json(meta_path, report)
    if n_bad:
        log.warning("%d unreadable image(s) were left out of the cache and of training (first: %s); see %s",
                    n_bad, ", ".join(list(bad)[:3]), path / "bad.json")
    if unexpected:
        log.warning("%d image(s) are not %dx%d as NIH ships them; bounding boxes of those images will not line up",
                    unexpected, *expected)
    return {**report, "path": str(path), "processed_now": done_now, "seconds": round(seconds, 2),
            "images_per_s": round(done_now / seconds, 1) if seconds > 0 else None}


def verify_cache(path: str | os.PathLike, *, full: bool = True) -> dict[str, Any]:
    """Check a cache's files and, with ``full``, every done row's CRC-32. Returns counts."""
    cache = PixelCache(path)
    out: dict[str, Any] = {"path": str(cache.path), "state": cache.meta.get("state"), "images": cache.n,
                           "size": cache.size, "done": int((cache.status == DONE).sum()),
                           "bad": int((cache.status == BAD).sum()), "todo": int((cache.status == TODO).sum())}
    if full:
        crc = np.fromfile(cache.path / "crc.u32", dtype=np.uint32)
        pix = cache.pixels()
        mismatched = [cache.names[r] for r in np.flatnonzero(cache.status == DONE)
                      if zlib.crc32(pix[r].tobytes()) != int(crc[r])]
        out["crc_mismatch"] = len(mismatched)
        out["crc_mismatch_first"] = mismatched[:5]
    return out
