"""Data-parallel helpers for `torchrun` launches (gloo on CPU, NCCL on CUDA).

Training code calls these unconditionally: without a torchrun environment every helper is the
single-process identity, so one code path serves a laptop and a multi-GPU node.

Validation is sharded by index (rank r scores images r, r + W, r + 2W, ...) instead of with a
padded ``DistributedSampler``, and the shards are gathered with their indices, so every image is
scored exactly once and metrics equal a single-process run's.

Must not import any other medxray module: training's data, steps and loop all build on it.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; ``world_size == 1`` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); single process when absent."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return DistInfo()
    if world <= 1:
        return DistInfo()
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def init_distributed(device_type: str, timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group if this process was launched by torchrun.

    gloo serves CPU training; NCCL is used when every rank has its own CUDA device.
    """
    info = env_dist_info()
    if not info.enabled:
        return info
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" and dist.is_nccl_available() else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("joined process group: rank %d of %d (%s)", info.rank, info.world_size, backend)
    return info


def shutdown(info: DistInfo) -> None:
    """Leave the process group (only if we are in one)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool, info: DistInfo) -> bool:
    """True only if ``flag`` is true on every rank (so all ranks take the same branch)."""
    if not info.enabled:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def shard_indices(n: int, info: DistInfo) -> list[int]:
    """This rank's share of ``range(n)``: disjoint across ranks, together exactly ``range(n)``."""
    return list(range(info.rank, n, info.world_size))


def gather_by_index(
    indices: np.ndarray, arrays: Sequence[np.ndarray], info: DistInfo, n_total: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Gather per-sample rows from all ranks and put them back in dataset order.

    Returns the sorted indices and each array reordered to match. Raises if an index is
    missing or scored twice: that would silently bias validation metrics.
    """
    parts = all_gather_objects((np.asarray(indices), [np.asarray(a) for a in arrays]), info)
    idx = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    merged = [np.concatenate([p[1][k] for p in parts]) for k in range(len(arrays))]
    order = np.argsort(idx, kind="stable")
    idx = idx[order]
    merged = [m[order] for m in merged]
    if len(idx) != n_total or (len(idx) and (np.any(np.diff(idx) == 0) or idx[0] != 0 or idx[-1] != n_total - 1)):
        raise RuntimeError(
            f"validation gather is inconsistent: {len(idx)} rows for {n_total} images "
            f"({len(np.unique(idx))} unique); every image must be scored exactly once"
        )
    return idx, merged


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP keeps parameters equal but each rank updates its own running statistics in the last
    training step; validation and the saved checkpoint must use the same (rank 0's) values.
    """
    if not info.enabled:
        return
    with torch.no_grad():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)
