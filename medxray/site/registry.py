"""The model registry folder: versions, an atomically switched ``current``, promotion records.

Layout::

    REGISTRY/
      versions/0001-<model_version>/model.pt     an immutable copy of each registered checkpoint
      versions/0001-<model_version>/version.json model version, SHA-256, when and from where
      CURRENT                                    the current version's folder name (one line)
      current -> versions/...                    a symlink to the same folder, for tools that want a path
      history.jsonl                              one line per promotion / rollback: who, when, from, to, figures

``CURRENT`` is written to a temporary file and renamed over the old one (POSIX ``rename`` is
atomic), and the symlink is replaced the same way, so a reader sees the old version or the new
one, never a half-written pointer. :func:`current_checkpoint` resolves a registry folder (or a
plain checkpoint file) to the checkpoint to load; the scorer, the node and the app call it at each
batch or study, so a promotion or rollback takes effect without a restart.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from medxray.errors import CheckpointError, ConfigError
from medxray.fileio import atomic_write_text, json_line, to_jsonable

CURRENT = "CURRENT"
HISTORY = "history.jsonl"
MODEL = "model.pt"


@dataclass(frozen=True)
class Version:
    name: str  # the folder name under versions/
    path: Path  # its model.pt
    model_version: str
    sha256: str


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_registry(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "versions").is_dir()


def current_version(registry: str | os.PathLike) -> Version | None:
    """The current version of a registry folder, or None before the first promotion."""
    reg = Path(registry).expanduser()
    try:
        name = (reg / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{reg / CURRENT} is damaged; run `medxray site rollback` or restore it")
    return _version(reg, name)


def current_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint to load now: ``path`` itself when it is a file, else the registry's current
    version. Raises :class:`CheckpointError` for a registry with no current version."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not is_registry(p):
        raise CheckpointError(f"{p} is neither a checkpoint file nor a model registry folder (versions/, CURRENT)")
    v = current_version(p)
    if v is None:
        raise CheckpointError(f"model registry {p} has no current version yet; promote one with `medxray site promote`")
    return v.path


def _version(reg: Path, name: str) -> Version:
    d = reg / "versions" / name
    try:
        info = json.loads((d / "version.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"registry version {d} is missing or damaged") from None
    return Version(name, d / MODEL, str(info.get("model_version", "")), str(info.get("sha256", "")))


def versions(registry: str | os.PathLike) -> list[Version]:
    reg = Path(registry).expanduser()
    root = reg / "versions"
    return [_version(reg, d.name) for d in sorted(root.iterdir()) if d.is_dir()] if root.is_dir() else []


def register(registry: str | os.PathLike, checkpoint: str | os.PathLike) -> Version:
    """Copy a checkpoint into the registry as a new version (or return the existing one with its hash)."""
    from medxray.checkpoint import load_checkpoint

    reg = Path(registry).expanduser()
    src = Path(checkpoint).expanduser()
    digest = _sha(src)
    for v in versions(reg):
        if v.sha256 == digest:
            return v
    meta = load_checkpoint(src).metadata
    mv = str(meta.get("model_version") or "unversioned")
    n = len(versions(reg)) + 1
    name = f"{n:04d}-{re.sub(r'[^A-Za-z0-9._+-]+', '-', mv)[:80]}"
    d = reg / "versions" / name
    d.mkdir(parents=True, exist_ok=False)
    tmp = d / f".{MODEL}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, d / MODEL)
    ref = src.parent / "val_predictions.csv"  # the run's validation predictions: the monitor's reference
    if ref.is_file():
        shutil.copyfile(ref, d / ref.name)
    atomic_write_text(
        d / "version.json",
        json.dumps({"model_version": mv, "sha256": digest, "source": str(src.resolve()), "added_utc": _now()}, indent=1)
        + "\n",
    )
    return Version(name, d / MODEL, mv, digest)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def set_current(registry: str | os.PathLike, version: Version) -> None:
    """Switch ``CURRENT`` and the ``current`` symlink atomically to ``version``."""
    reg = Path(registry).expanduser()
    atomic_write_text(reg / CURRENT, version.name + "\n")
    link_tmp = reg / ".current.tmp"
    try:
        link_tmp.unlink(missing_ok=True)
        os.symlink(Path("versions") / version.name, link_tmp)
        os.replace(link_tmp, reg / "current")
    except OSError:  # a filesystem without symlinks: CURRENT alone is the pointer
        link_tmp.unlink(missing_ok=True)


def record(
    registry: str | os.PathLike,
    action: str,
    *,
    to: Version,
    frm: Version | None,
    approver: str | None = None,
    figures: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Append one history line (who, when, from, to, figures) and return it."""
    reg = Path(registry).expanduser()
    rec = {
        "action": action,
        "utc": _now(),
        "approver": approver or getpass.getuser(),
        "to": to.name,
        "to_model_version": to.model_version,
        "to_sha256": to.sha256,
        "from": frm.name if frm else None,
        "from_model_version": frm.model_version if frm else None,
        "figures": to_jsonable(dict(figures or {})),
    }
    with open(reg / HISTORY, "a", encoding="utf-8") as fh:
        fh.write(json_line(rec) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return rec


def history(registry: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(registry).expanduser() / HISTORY
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def rollback(registry: str | os.PathLike, *, approver: str | None = None) -> dict[str, Any]:
    """Make the version that was current before the current one current again (recorded)."""
    reg = Path(registry).expanduser()
    cur = current_version(reg)
    if cur is None:
        raise ConfigError(f"model registry {reg} has no current version to roll back from")
    stack: list[str] = []  # promotions push, rollbacks pop: the versions to go back through
    for h in history(reg):
        if h.get("action") in ("promote", "initial"):
            stack.append(str(h["to"]))
        elif h.get("action") == "rollback" and stack:
            stack.pop()
    if not stack or stack[-1] != cur.name:
        stack.append(cur.name)  # CURRENT set by hand: roll back to the last recorded version
    prev = stack[-2] if len(stack) >= 2 else None
    if prev is None:
        raise ConfigError(f"nothing to roll back to: {cur.name} is the first version made current in {reg}")
    target = _version(reg, prev)
    set_current(reg, target)
    return record(reg, "rollback", to=target, frm=cur, approver=approver)
