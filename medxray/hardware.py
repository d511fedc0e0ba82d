"""Device and precision facts shared by training, evaluation and inference.

Holds device resolution, the native-bf16 check, the precision table (defined in the torch-free
:mod:`medxray.precision`, re-exported here) and its resolution, the autocast context and the
default loader worker count. Must not import training, evaluation,
data or model code: everything that runs a model imports this module, not the other way round.
"""

from __future__ import annotations

import contextlib
import logging
import os
from functools import lru_cache
from typing import Any

import torch

from medxray.errors import ConfigError
from medxray.precision import PRECISIONS  # noqa: F401  (re-exported: the table lives in a torch-free module)

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 pays off."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = next((ln for ln in fh if ln.startswith("flags")), "")
        if flags:  # x86 Linux: the kernel's feature flags are authoritative
            return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    except OSError:
        pass
    try:  # Arm / non-Linux: oneDNN's own check
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@lru_cache(maxsize=1)
def openvino_core() -> Any:
    """The process's one ``openvino.Core`` (created on first use, kept until exit).

    One Core, never two: OpenVINO's CPU plugin points the calling thread's signal alternate
    stack (``sigaltstack(2)``) at its own buffer when a Core first compiles a model and puts the
    previous one back when that Core is destroyed. Two Cores destroyed out of order leave the
    thread's alternate stack pointing at freed memory, and the next signal handled on it (a
    Python handler for SIGCHLD, SIGTERM, SIGALRM...) kills the process with SIGSEGV. Raises
    ImportError when OpenVINO is not installed.
    """
    import openvino as ov

    return ov.Core()


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when present (this rank's GPU under torchrun), else CPU.

    An explicit CUDA request without CUDA is a :class:`ConfigError`, not a silent CPU run.
    """
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device cuda was requested but no CUDA device is available; use --device cpu or auto")
        if name == "cuda":
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``auto`` to the fastest safe choice: bf16 where the hardware supports it, else fp32.

    On CUDA without bf16, ``auto`` is fp16. fp16 on a non-CUDA device is a :class:`ConfigError`
    (its GradScaler needs CUDA).
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 (with GradScaler) needs a CUDA device; on CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("this CPU has no native bf16: bf16 autocast will be slow; fp32 is the better choice here")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes (a no-op for fp32); ``precision`` is a resolved one."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_num_workers(device: torch.device) -> int:
    """Loader workers that do not starve the training threads on small CPU machines."""
    cpus = os.cpu_count() or 1
    if device.type == "cuda":
        return min(8, max(1, cpus - 1))
    return 0 if cpus <= 4 else min(4, cpus // 4)
