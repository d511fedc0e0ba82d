"""Reading and writing torch files safely: ``torch.load(weights_only=True)`` with one clear error per
failure, and atomic ``torch.save``.

Holds no knowledge of medxray's checkpoint layout or of models; it must not import
``medxray.checkpoint`` or ``medxray.models`` (both import it).
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from medxray.errors import CheckpointError
from medxray.fileio import atomic_write_bytes


def safe_torch_load(path: str | os.PathLike, *, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with one clear error for each way it can fail."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} {p} does not exist (check the path)")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses arbitrary Python objects: we never run code from a checkpoint.
        raise CheckpointError(
            f"{what} {p} holds Python objects that cannot be loaded safely (weights_only=True): "
            f"{str(exc).splitlines()[0][:200]}. Re-save it as a plain state dict "
            f"(torch.save(model.state_dict(), path))"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{what} {p} is not a readable PyTorch file (corrupt or truncated?): {str(exc).splitlines()[0][:200]}"
        ) from None



def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` to ``path`` through a temp file + rename, so a kill never leaves half a file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getbuffer())
