"""medxray checkpoints: a plain state dict plus JSON-able metadata, written atomically.

Layout of a checkpoint file (a ``torch.save`` of a dict, loadable with ``weights_only=True``)::

    {"format": "medxray-checkpoint/1",
     "state_dict": {...model tensors...},
     "metadata": {"architecture": "densenet121", "num_classes": 14, "in_chans": 3,
                  "label_names": [...], "preprocessing": {...}, "thresholds": {...},
                  "metrics": {...}, "versions": {...}, ..., "meta_schema": 1}}

The metadata's keys and types are those of :class:`medxray.checkpoint_meta.CheckpointMeta`
(``Checkpoint.meta``): read them as attributes, not with ``.get()`` and a default of your own.

Training-state checkpoints (optimizer, scheduler, RNG) may add more top-level keys; readers that
only need the model use :func:`load_checkpoint` and ignore them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from medxray.checkpoint_meta import CheckpointMeta
from medxray.errors import CheckpointError
from medxray.torchfile import atomic_torch_save, safe_torch_load

if TYPE_CHECKING:
    from medxray.models.densenet import DenseNet

CHECKPOINT_FORMAT = "medxray-checkpoint/1"


@dataclass
class Checkpoint:
    """A loaded medxray checkpoint: model weights, metadata and any extra top-level entries.

    ``metadata`` is the stored dict; :attr:`meta` is its typed form (:class:`CheckpointMeta`).
    """

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def meta(self) -> CheckpointMeta:
        """The metadata, typed (parsed from :attr:`metadata` on each access, so it follows edits of the dict)."""
        return CheckpointMeta.from_dict(self.metadata)

    @property
    def label_names(self) -> list[str]:
        return list(self.meta.label_names)


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | CheckpointMeta,
    **extra: Any,
) -> Path:
    """Save model weights + metadata (+ optional training state) atomically.

    ``metadata`` (a dict or a :class:`CheckpointMeta`) is type-checked and stored as
    :meth:`CheckpointMeta.to_dict` (unknown keys kept, the schema version added). Raises
    ValueError when architecture, label_names or preprocessing is missing and
    :class:`CheckpointError` for a key of the wrong type.
    """
    meta = CheckpointMeta.from_dict(metadata)
    for key in ("architecture", "label_names", "preprocessing"):
        if key not in meta.present:
            raise ValueError(f"checkpoint metadata needs {key!r}")
    obj = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "metadata": meta.to_dict(),
    }
    obj.update(extra)
    return atomic_torch_save(obj, path)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a medxray checkpoint (weights_only), or raise a :class:`CheckpointError` saying why not.

    A file that is not a PyTorch file at all (a README, a CSV, a DICOM) is refused by its first
    bytes, before torch reads it, as "not a medxray checkpoint" rather than with torch's
    unpickling paragraph.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        head = None  # missing or unreadable: safe_torch_load says which
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol byte 0x80).
    if head is not None and not head.startswith((b"PK\x03\x04", b"\x80")):
        raise CheckpointError(
            f"{path} is not a medxray checkpoint: it is not a PyTorch file at all. Pass the best.pt "
            "or last.pt that `medxray finetune` wrote (e.g. runs/NAME/best.pt)"
        )
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        hint = ""
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            hint = " It looks like a bare state dict: use it as --pretrained PATH to initialise a model instead."
        raise CheckpointError(f"{path} is not a medxray checkpoint (written by `medxray finetune`).{hint}")
    meta = obj.get("metadata")
    sd = obj.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(sd, dict):
        raise CheckpointError(f"{path} is a damaged medxray checkpoint (no metadata or state_dict)")
    try:
        CheckpointMeta.from_dict(meta)  # types and schema version checked once, at load
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    extra = {k: v for k, v in obj.items() if k not in ("format", "state_dict", "metadata")}
    return Checkpoint(state_dict=sd, metadata=meta, extra=extra)


def model_from_checkpoint(ckpt: Checkpoint | str | os.PathLike) -> DenseNet:
    """Build the checkpoint's architecture, load its weights strictly, return it in eval mode."""
    from medxray.models import create_model  # checkpoint -> models -> torchfile: no circle

    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    meta = ckpt.meta
    arch = meta.architecture
    if not arch:
        raise CheckpointError("the checkpoint names no architecture; it was not written by medxray finetune")
    try:
        model = create_model(arch, num_classes=meta.n_classes, in_chans=meta.in_chans)
    except Exception as exc:  # unknown architecture name etc.
        raise CheckpointError(f"checkpoint names architecture {arch!r} which cannot be built: {exc}") from None
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][:3]
        raise CheckpointError(
            f"checkpoint weights do not fit architecture {arch!r} ({'; '.join(first)[:300]})"
        ) from None
    return model.eval()


def update_metadata(path: str | os.PathLike, updates: Mapping[str, Any]) -> Checkpoint:
    """Merge ``updates`` into a checkpoint's metadata and rewrite it atomically (e.g. thresholds)."""
    ckpt = load_checkpoint(path)
    ckpt.metadata = ckpt.meta.updated(updates).to_dict()
    save_checkpoint(path, ckpt.state_dict, ckpt.metadata, **ckpt.extra)
    return ckpt
