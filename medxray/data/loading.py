"""Batching the data layer's dict items for training and evaluation: index views, collate, loaders.

Holds :class:`IndexedDataset` (a subset view whose items carry their base index),
:func:`plain_tensor`, :func:`collate_items` and :func:`make_loader` (a seeded MONAI DataLoader).
Items follow the contract in :mod:`medxray.data`::

    {"image": (3, S, S), "label": (C,), "mask": (C,), "name": str, "orig_size": (H, W)}

Must not import training, evaluation, models or any dataset module: it only batches items.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """A view of ``base`` restricted to ``indices`` (default: all) whose items also carry
    their base index under ``"index"``."""

    def __init__(self, base: Dataset, indices: Sequence[int] | None = None) -> None:
        self.base = base
        self.indices = list(range(len(base))) if indices is None else list(indices)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.indices[i]
        item = dict(self.base[j])
        item["index"] = j
        return item


def plain_tensor(t: Any) -> torch.Tensor:
    """A plain ``torch.Tensor`` from a tensor, a MONAI MetaTensor or an array-like."""
    t = t.as_tensor() if hasattr(t, "as_tensor") else t  # MONAI MetaTensor -> Tensor
    return torch.as_tensor(t)


def collate_items(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep names and original sizes as lists (default collate would split tuples).

    Returns ``image`` (N, 3, S, S), ``label`` and ``mask`` (N, C) float tensors (mask all ones
    when items carry none), ``name`` and ``orig_size`` lists, and ``index`` (N,) long when the
    items carry one.
    """
    image = torch.stack([plain_tensor(it["image"]).float() for it in items])
    label = torch.stack([plain_tensor(it["label"]).float() for it in items])
    mask = torch.stack(
        [
            plain_tensor(it["mask"]).float() if "mask" in it else torch.ones_like(plain_tensor(it["label"]).float())
            for it in items
        ]
    )
    out: dict[str, Any] = {
        "image": image,
        "label": label,
        "mask": mask,
        "name": [str(it.get("name", "")) for it in items],
        "orig_size": [tuple(int(v) for v in it["orig_size"]) if "orig_size" in it else None for it in items],
    }
    if "index" in items[0]:
        out["index"] = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
    return out


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    sampler: Any = None,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A MONAI DataLoader whose random transforms are seeded from ``seed`` (also without workers),
    batching with :func:`collate_items`, in order unless ``sampler`` says otherwise."""
    from monai.data import DataLoader

    from medxray.procutil import dataloader_worker_init

    g = torch.Generator()
    g.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=g,
        collate_fn=collate_items,
        persistent_workers=False,
        # MONAI's per-worker seeding, plus: a worker dies with the training process (kill -9 included)
        worker_init_fn=dataloader_worker_init if num_workers > 0 else None,
    )
