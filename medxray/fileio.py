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


def load_yaml_mapping(path: str | os.PathLike, *, what: str = "config file", error: type[Exception] | None = None,
                      hint: str = "") -> dict[str, Any]:
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
