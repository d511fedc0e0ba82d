"""File I/O shared across medxray: atomic output, JSON values and lines, YAML mappings, file hashes.

Atomic output: a kill at any moment leaves either the old file or the new one, never half.
Every writer of results, checkpoints, overlays and manifests goes through :func:`atomic_output`, so
re-running after an interruption never reads a torn file.

Must not import any other medxray module except :mod:`medxray.errors`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import numpy as np


def _sibling_tmp(path: Path) -> Path:
    # A unique sibling (same filesystem, so the rename is atomic). Created with open(..., "x"), it
    # gets the umask's permissions; mkstemp's 0600 would hide results from a reviewer's account.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes as stored, read ``chunk`` bytes at a time. Raises OSError."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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


def load_yaml_mapping(
    path: str | os.PathLike, *, what: str = "config file", error: type[Exception] | None = None, hint: str = ""
) -> dict[str, Any]:
    """A YAML file that must hold a mapping (empty file -> ``{}``); one clear ``error`` otherwise.

    ``hint`` is appended to every message and says how to fix the file.
    """
    import yaml

    from medxray.errors import ConfigError

    err = error or ConfigError
    p = Path(path)
    if not p.is_file():
        raise err(f"{what} {p} does not exist{hint}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise err(f"{what} {p} is not valid YAML: {str(exc).splitlines()[0]}{hint}") from None
    except UnicodeDecodeError:
        raise err(f"{what} {p} is not a text file{hint}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise err(f"{what} {p} must hold a mapping of key: value, got {type(data).__name__}{hint}")
    return data


def to_jsonable(obj: Any) -> Any:
    """Plain Python values only: mappings -> dict with str keys, tuples -> lists, NumPy scalars ->
    float/int/bool, paths and str subclasses (such as ``torch.__version__``) -> str.

    Used for checkpoint metadata (checkpoints load with ``weights_only=True``) and JSON lines.
    Other values pass through unchanged.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (str, Path)):
        return str(obj)
    return obj


def json_line(obj: Any) -> str:
    """``obj`` as one line of strict JSON (no newline): :func:`to_jsonable`, and NaN/inf -> null,
    so every line parses in strict readers too (JSON has no NaN)."""

    def fix(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return json.dumps(fix(to_jsonable(obj)))
