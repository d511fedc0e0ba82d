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

This module is the store (layout, lookup, reading, verification). Building it lives in
:mod:`medxray.data.prepare`; this module must not import it, the dataset builders or ``medxray.data``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from medxray.errors import DataError
from medxray.fileio import atomic_write_text

log = logging.getLogger(__name__)

CACHE_FORMAT = "medxray-pixel-cache/1"
CACHE_DIRNAME = "medxray_cache"
TODO, DONE, BAD = 0, 1, 2
CHUNK = 32
EXPECTED_SIZES = {"chestxray14": (1024, 1024)}


def cache_root(data_root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir) if cache_dir else Path(data_root) / CACHE_DIRNAME


def cache_path(
    data_root: str | os.PathLike, dataset: str, size: int, cache_dir: str | os.PathLike | None = None
) -> Path:
    return cache_root(data_root, cache_dir) / f"{dataset}_{int(size)}"


def names_sha256(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def open_array(path: Path, dtype: Any, shape: tuple[int, ...], mode: str) -> np.memmap:
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
            raise DataError(
                f"preprocessing cache {self.path} is unreadable ({exc}); delete it and re-run `medxray data prepare`"
            ) from None
        if self.meta.get("format") != CACHE_FORMAT:
            raise DataError(
                f"preprocessing cache {self.path} has format {self.meta.get('format')!r}, this medxray "
                f"reads {CACHE_FORMAT!r}; delete it and re-run `medxray data prepare`"
            )
        self.n = int(self.meta["n"])
        self.size = int(self.meta["size"])
        if len(self.names) != self.n or names_sha256(self.names) != self.meta.get("names_sha256"):
            raise DataError(
                f"preprocessing cache {self.path}: names.txt does not match meta.json; delete the cache "
                f"and re-run `medxray data prepare`"
            )
        try:
            self.status = np.fromfile(self.path / "status.u8", dtype=np.uint8)
            self.orig = np.fromfile(self.path / "orig.i32", dtype=np.int32).reshape(-1, 2)
            pix_bytes = (self.path / "pixels.u8").stat().st_size
        except (OSError, ValueError) as exc:
            raise DataError(
                f"preprocessing cache {self.path} is incomplete ({exc}); re-run `medxray data prepare`"
            ) from None
        if len(self.status) != self.n or len(self.orig) != self.n or pix_bytes != self.n * self.size * self.size:
            raise DataError(
                f"preprocessing cache {self.path} has files of the wrong size (interrupted copy?); "
                f"re-run `medxray data prepare`"
            )
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
            self._pixels = np.memmap(
                self.path / "pixels.u8", dtype=np.uint8, mode="r", shape=(self.n, self.size, self.size)
            )
        return self._pixels

    def read(self, row: int) -> np.ndarray:
        """uint8 (S, S) pixels of one row (a writable copy)."""
        return np.array(self.pixels()[row])

    def orig_size(self, row: int) -> tuple[int, int]:
        h, w = self.orig[row]
        return int(h), int(w)


def find_cache(
    data_root: str | os.PathLike,
    dataset: str,
    image_size: int,
    label_sha256: str,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> PixelCache | None:
    """The smallest finished cache of ``dataset`` at >= ``image_size`` built from this label file."""
    root = cache_root(data_root, cache_dir)
    if not root.is_dir():
        log.info(
            "no preprocessing cache under %s: decoding image files (run `medxray data prepare` for much faster epochs)",
            root,
        )
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
            log.warning(
                "ignoring preprocessing cache %s: it was built for another label file; re-run `medxray data prepare`", d
            )
            continue
        log.info("using preprocessing cache %s (%d images at %dx%d)", d, cache.n, size, size)
        return cache
    if not candidates:
        log.info("no preprocessing cache of %s at >= %d px under %s: decoding image files", dataset, image_size, root)
    return None


# --------------------------------------------------------------------------------------------
# building


def verify_cache(path: str | os.PathLike, *, full: bool = True) -> dict[str, Any]:
    """Check a cache's files and, with ``full``, every done row's CRC-32. Returns counts."""
    cache = PixelCache(path)
    out: dict[str, Any] = {
        "path": str(cache.path),
        "state": cache.meta.get("state"),
        "images": cache.n,
        "size": cache.size,
        "done": int((cache.status == DONE).sum()),
        "bad": int((cache.status == BAD).sum()),
        "todo": int((cache.status == TODO).sum()),
    }
    if full:
        crc = np.fromfile(cache.path / "crc.u32", dtype=np.uint32)
        pix = cache.pixels()
        mismatched = [
            cache.names[r] for r in np.flatnonzero(cache.status == DONE) if zlib.crc32(pix[r].tobytes()) != int(crc[r])
        ]
        out["crc_mismatch"] = len(mismatched)
        out["crc_mismatch_first"] = mismatched[:5]
    return out
