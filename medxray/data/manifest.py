"""Shipped dataset manifests: locate them, verify them against ``manifest.yaml``, read them.

The label and split files in ``data_manifests/`` decide which image is in which split. If one of
them changed without anyone noticing, every number measured on it would change too. So every
file is checked against the SHA-256 in its ``manifest.yaml`` before use. The check is cached per
process, keyed on the file's size and mtime, so it stays cheap when many datasets are built.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import IO, Any

import medxray
from medxray.errors import DataError
from medxray.fileio import file_sha256, load_yaml_mapping

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.yaml"
# A data root that holds this file was drawn by medxray.data.synthetic: its images are phantoms, and every
# number measured on it is a phantom number. Defined here (not in synthetic) so readers need not import the generator.
PHANTOM_MARKER = "MEDXRAY_PHANTOM.json"


def is_phantom_root(data_root: str | os.PathLike | None) -> bool:
    """Whether ``data_root`` holds phantom images drawn by :func:`medxray.data.synthetic.synthesize`.

    True when the folder holds :data:`PHANTOM_MARKER` as a regular file; False for ``None``, an empty
    path, a missing folder or a folder without the marker. The one phantom test every reader uses
    (the ChestX-ray14 loader, the evaluation's report note and checkpoint write-back). Raises only
    what :meth:`pathlib.Path.is_file` raises (an unreadable folder: :class:`PermissionError`).
    """
    if data_root is None or not str(data_root):
        return False
    return (Path(data_root).expanduser() / PHANTOM_MARKER).is_file()


def manifests_root() -> Path:
    """The ``data_manifests/`` folder next to the package (source checkout or editable install)."""
    root = Path(medxray.__file__).resolve().parent.parent / "data_manifests"
    if not root.is_dir():
        raise DataError(
            f"the dataset manifests folder {root} is missing; medxray needs the data_manifests/ folder of "
            f"its source tree (reinstall with `pip install -e .` from a full checkout)"
        )
    return root


def manifest_spec(dataset: str = "chestxray14") -> dict[str, Any]:
    """The parsed ``manifest.yaml`` of one shipped dataset."""
    path = manifests_root() / dataset / MANIFEST_FILE
    spec = load_yaml_mapping(
        path, what="manifest", error=DataError, hint=f"; restore data_manifests/{dataset}/ from the medxray source tree"
    )
    if not isinstance(spec.get("files"), dict):
        raise DataError(f"{path} has no 'files' section; restore it from the medxray source tree")
    return spec


def open_text(path: str | os.PathLike) -> IO[str]:
    """Open a text file that may be gzip-compressed (NIH files are used both ways)."""
    p = Path(path)
    with open(p, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8-sig", newline="")
    return open(p, encoding="utf-8-sig", newline="")


def content_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's decompressed content, so a .csv and its .csv.gz hash the same."""
    return _content_sha256_cached(*_stat_key(path))


def _stat_key(path: str | os.PathLike) -> tuple[str, int, int]:
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as exc:
        raise DataError(f"cannot read {p}: {exc.strerror}") from None
    return str(p), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _content_sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as raw:
        is_gzip = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        fh: IO[bytes] = gzip.GzipFile(fileobj=raw) if is_gzip else raw  # type: ignore[assignment]
        try:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path} is not a readable (gzip) text file: {exc}") from None
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _verified(path: str, size: int, mtime_ns: int, expected: str) -> bool:
    return file_sha256(path) == expected


def shipped_files(dataset: str = "chestxray14") -> dict[str, Path]:
    """Role -> path of every shipped file of ``dataset``, each verified against its SHA-256.

    Raises :class:`DataError` naming the file if one is missing or was modified.
    """
    spec = manifest_spec(dataset)
    folder = manifests_root() / dataset
    out: dict[str, Path] = {}
    for role, entry in spec["files"].items():
        path = folder / entry["path"]
        if not path.is_file():
            raise DataError(
                f"shipped manifest file {path} is missing; restore data_manifests/{dataset}/ "
                f"from the medxray source tree"
            )
        if not _verified(*_stat_key(path), str(entry["sha256"])):
            raise DataError(
                f"shipped manifest file {path} does not match the SHA-256 in {folder / MANIFEST_FILE}; it was "
                f"modified or corrupted: restore it from the medxray source tree (git checkout -- {path.name})"
            )
        out[role] = path
    return out


def known_content_hashes(dataset: str = "chestxray14") -> dict[str, str]:
    """content_sha256 -> role, to recognise a user's uncompressed copy of a shipped file."""
    return {str(e.get("content_sha256")): role for role, e in manifest_spec(dataset)["files"].items()}


def read_name_list(path: str | os.PathLike) -> list[str]:
    """One image name per line (the official split lists); blank lines ignored."""
    with open_text(path) as fh:
        return [line.strip() for line in fh if line.strip()]
