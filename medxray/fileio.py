"""Atomic file output: a kill at any moment leaves either the old file or the new one, never half.

Every writer of results, checkpoints, overlays and manifests goes through :func:`atomic_output`, so
re-running after an interruption never reads a torn file.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


def _sibling_tmp(path: Path) -> Path:
    # A unique sibling (same filesystem, so the rename is atomic). Created with open(..., "x"), it
    # gets the umask's permissions; mkstemp's 0600 would hide results from a reviewer's account.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True, **open_kwargs: Any) -> Iterator[IO]:
    """Open a temp file beside ``path``; on clean exit flush, fsync and rename it over ``path``."""
    if "w" not in mode:
        raise ValueError("atomic_output writes whole files: use a 'w' mode")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling_tmp(p)
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview, *, fsync: bool = True) -> Path:
    with atomic_output(path, "wb", fsync=fsync) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    with atomic_output(path, "w", fsync=fsync, encoding="utf-8", newline="") as fh:
        fh.write(text)
    return Path(path)
