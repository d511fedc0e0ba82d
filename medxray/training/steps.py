"""The numerical work of fine-tuning: the masked loss, one optimisation step, the optimiser and
learning-rate schedule, and one scoring pass over a dataset (sharded across DDP ranks).

``train_step`` is shared by the training loop and ``bench/train_step.py``. Must not import the
training loop (:mod:`medxray.training.loop`), checkpoints or evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medxray.data.loading import IndexedDataset, make_loader
from medxray.hardware import autocast
from medxray.training import distributed as mdist
from medxray.training.config import TrainConfig
from medxray.training.distributed import DistInfo


def masked_bce_with_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """BCE over known labels only (mask 1); unknown labels contribute neither loss nor gradient."""
    per = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none", pos_weight=pos_weight)
    total = (per * mask).sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp_min(1.0)


def train_step(
    net: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    m: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    device: torch.device,
    precision: str,
    channels_last: bool = True,
    pos_weight: torch.Tensor | None = None,
    grad_clip_norm: float | None = None,
    check: Any = None,
) -> float:
    """One optimisation step (the training loop's and ``bench/train_step.py``'s); returns the loss.

    ``check(loss_value)`` runs before the backward pass, so a non-finite loss can stop the run
    before it touches the weights.
    """
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = y.to(device, non_blocking=True)
    m = m.to(device, non_blocking=True)
    with autocast(device, precision):
        logits = net(x)
    loss = masked_bce_with_logits(logits, y, m, pos_weight)
    value = float(loss.detach())
    if check is not None:
        check(value)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip_norm:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return value


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam as CheXNet used it; the fused kernel on CPU and CUDA (one pass over all parameters)."""
    return torch.optim.Adam(
        model.parameters(),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> Any:
    """The learning-rate schedule of ``cfg.scheduler``: ReduceLROnPlateau on the validation loss
    (CheXNet), cosine annealing over the epochs, or ``None``."""
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
        )
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.min_lr)
    return None


@torch.no_grad()
def predict_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    device: torch.device,
    precision: str,
    batch_size: int,
    channels_last: bool = True,
    num_workers: int = 0,
    info: DistInfo | None = None,
) -> dict[str, Any]:
    """Score every item of ``dataset`` once (sharded by index across ranks, gathered back in order).

    Returns ``probs``, ``labels``, ``masks`` (N, C) arrays, ``names``, and the masked mean BCE ``loss``.
    """
    info = info or DistInfo()
    n = len(dataset)  # type: ignore[arg-type]
    shard = IndexedDataset(dataset, mdist.shard_indices(n, info))
    loader = make_loader(
        shard, batch_size=batch_size, seed=0, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    was_training = model.training
    model.eval()
    idx, probs, labels, masks, names, losses = [], [], [], [], [], []
    try:
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                logits = model(x)
            logits = logits.float().cpu()
            y, m = batch["label"], batch["mask"]
            losses.append(F.binary_cross_entropy_with_logits(logits, y, reduction="none") * m)
            idx.append(batch["index"].numpy())
            probs.append(torch.sigmoid(logits).numpy())
            labels.append(y.numpy())
            masks.append(m.numpy())
            names.extend(batch["name"])
    finally:
        model.train(was_training)
    c = len(probs[0][0]) if probs else 0
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0, c), dtype=np.float32)  # noqa: E731
    loss_rows = torch.cat(losses).numpy() if losses else np.zeros((0, c), dtype=np.float32)
    order, (p, y, m, lr, nm) = mdist.gather_by_index(
        np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64),
        [cat(probs), cat(labels), cat(masks), loss_rows, np.asarray(names, dtype=object)],
        info,
        n,
    )
    loss = float(lr.sum() / max(1.0, float(m.sum())))
    return {"index": order, "probs": p, "labels": y, "masks": m, "names": list(nm), "loss": loss}
