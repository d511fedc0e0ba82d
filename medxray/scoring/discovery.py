"""Which files a run scores: walking the input folder, shards, and per-file output names.

* :func:`iter_input_files`: every file under a folder (symlink loops, FIFOs and devices handled);
* :func:`parse_shard` / :func:`in_shard`: ``k/n`` sharding by a stable hash of the relative path;
* :func:`output_stem`: the unique, filesystem-safe name of a file's CAM folder and SR file.

Must not import anything of medxray but :mod:`medxray.errors` (pure path logic, no DICOM, no torch).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import zlib
from pathlib import Path
from typing import Iterable

from medxray.errors import ConfigError, DataError

log = logging.getLogger(__name__)


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
