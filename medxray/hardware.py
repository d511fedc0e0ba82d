"""Device and precision facts shared by training, evaluation and inference."""

from __future__ import annotations

from functools import lru_cache

import torch

from medxray.errors import ConfigError


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
