"""Reading and writing torch files safely: ``torch.load(weights_only=True)`` with one clear error per
failure, and atomic ``torch.save``.

Holds no knowledge of medxray's checkpoint layout or of models; it must not import
``medxray.checkpoint`` or ``medxray.models`` (both import it).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from medxray.errors import CheckpointError
from medxray.fileio import atomic_write_bytes


def safe_torch_load(path: str | os.PathLike, *, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with one clear error for each way it can fail.

    Raises :class:`CheckpointError` for a missing file, a corrupt or truncated one, and one that
    holds code or Python objects (the message names the offending pickle global, e.g.
    ``posix.system``). Warnings torch raises while reading a file it then refuses (the pickle-protocol
    warning of a hand-made pickle) are dropped; those of a file that loads are passed on.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} {p} does not exist (check the path)")
    obj: Any = None
    refused: Exception | None = None
    failure: Exception | None = None
    with warnings.catch_warnings(record=True) as caught:  # local to this call: no global filter
        warnings.simplefilter("always")
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            refused = exc
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
            failure = exc
    if refused is not None:
        # We never run code from a checkpoint; the caught warnings belong to the refused file.
        culprit = refused_global(str(refused), p)
        if culprit is None:
            raise CheckpointError(
                f"{what} {p} was refused: its pickle uses an instruction the safe loader does not read "
                f"({torch_reason(str(refused))}). Re-save it with torch.save's default "
                "protocol as a plain state dict (torch.save(model.state_dict(), path))"
            ) from None
        raise CheckpointError(
            f"{what} {p} holds code or Python objects ({culprit}) and was refused: medxray loads only "
            "tensors and plain values from a checkpoint and never runs code from one. Use a checkpoint "
            "written by `medxray finetune`, or re-save trusted weights as a plain state dict "
            "(torch.save(model.state_dict(), path))"
        ) from None
    for w in caught:  # a file that loaded (or failed otherwise): torch's warnings reach the caller as usual
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if failure is not None:
        first = str(failure).splitlines()[0][:200] if str(failure) else type(failure).__name__
        raise CheckpointError(f"{what} {p} is not a readable PyTorch file (corrupt or truncated?): {first}") from None
    return obj


# torch's weights-only unpickler names what it refused in one of these forms (torch 2.4 - 2.x).
_REFUSED_PATTERNS = (
    re.compile(r"GLOBAL ([\w.<>]+)"),
    re.compile(r"unrecognized function (<[^>]*>|\S+)"),
    re.compile(r"but got (<[^>]*>|\S+)"),
)
# Globals torch itself writes into a plain state dict (tensor rebuild functions, storages, OrderedDict).
_PLAIN_GLOBAL_PREFIXES = (
    "torch.",
    "collections.OrderedDict",
    "_codecs.encode",
    "builtins.set",
    "builtins.frozenset",
    "builtins.bytearray",
    "builtins.slice",
    "builtins.complex",
)


def refused_global(torch_message: str, path: str | os.PathLike | None = None) -> str | None:
    """The pickle global torch's weights-only unpickler refused, e.g. ``posix.system``.

    Taken from torch's message; when torch stopped earlier (an opcode it does not support, as in
    pickle protocol 4's framing), the file's pickle opcodes are listed without running anything
    (:mod:`pickletools`) and the first global outside a plain state dict's is named. Only the
    name is kept: torch's surrounding text suggests turning the safety check off, which medxray
    never does. ``None`` when neither names one (the file was refused for its pickle format).
    """
    for pat in _REFUSED_PATTERNS:
        m = pat.search(torch_message)
        if m:
            return m.group(1).rstrip(".")
    if path is not None:
        foreign = [g for g in pickle_globals(path) if not g.startswith(_PLAIN_GLOBAL_PREFIXES)]
        if foreign:
            return foreign[0]
    return None


def torch_reason(torch_message: str) -> str:
    """The line of torch's refusal text that says what it met, without its advice lines."""
    for line in torch_message.splitlines():
        line = line.strip()
        if line and not line.startswith(("Weights only load failed", "Check the documentation", "Please ")):
            return line[:120]
    return "unsupported pickle"


def pickle_globals(path: str | os.PathLike) -> list[str]:
    """Every ``module.name`` a torch file's pickle would import, read with :mod:`pickletools` (no code runs).

    Handles the zip format (``*/data.pkl``) and the legacy single-pickle format; an unreadable
    file gives what was read before the damage.
    """
    import pickletools

    p = Path(path)
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                data = zf.read(names[0]) if names else b""
        else:
            data = p.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return []
    found: list[str] = []
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # values pushed lately: STACK_GLOBAL takes module and name from them
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(recent) >= 2:
                found.append(f"{recent[-2]}.{recent[-1]}")
            elif op.name == "MEMOIZE" and recent:
                memo[len(memo)] = recent[-1]
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT") and recent:
                memo[int(arg)] = recent[-1]
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(int(arg)))
            elif op.name == "STOP":
                break
            else:
                recent.append(arg if isinstance(arg, str) else None)
            del recent[:-4]
    except (ValueError, EOFError, pickle.UnpicklingError):
        pass
    return found


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` to ``path`` through a temp file + rename, so a kill never leaves half a file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getbuffer())
