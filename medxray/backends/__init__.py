"""Inference backends: what runs a network forward pass for :class:`medxray.inference.Predictor`.

A backend turns a preprocessed batch (N, 3, S, S) float32 into the logits (N, C) and, when asked,
the last feature map (N, F, h, w) of the DenseNet (Huang et al. 2017), both float32 numpy arrays.
It knows its name and the precision it runs in; it does not batch, preprocess, verify, compute
OOD distances or maps: the Predictor orchestrates those.

* :class:`~medxray.backends.eager.TorchBackend`: eager PyTorch (bf16 autocast where asked).
* :class:`~medxray.backends.openvino.OpenVINOBackend`: the model converted to OpenVINO once (IR
  cache by weight hash), compiled for the CPU, one infer request per thread.

The tables of what the Predictor accepts, :data:`BACKENDS` and :data:`PRECISIONS`, are defined here
and re-exported by :mod:`medxray.inference`. This ``__init__`` imports no torch or numpy: the backend
classes load on first use (PEP 562, :mod:`medxray.lazyexports`), so the CLI lists the tables without
torch.

Must not import :mod:`medxray.inference`, the scoring, the app or the CLI (they import it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from medxray.lazyexports import lazy_exports

if TYPE_CHECKING:
    import numpy as np
    import torch

    from medxray.backends.eager import TorchBackend
    from medxray.backends.openvino import OpenVINOBackend, openvino_cache_dir

__getattr__, __dir__ = lazy_exports(
    __name__,
    {"TorchBackend": "eager", "OpenVINOBackend": "openvino", "openvino_cache_dir": "openvino"},
)

# ``backend=`` values of medxray.inference.Predictor
BACKENDS: tuple[str, ...] = ("auto", "torch", "openvino")
# ``precision=`` values of the Predictor; int8: OpenVINO, only behind the gate of medxray.quantize
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "int8")


class Backend(Protocol):
    """What the Predictor needs of a backend (structural; see the module docstring)."""

    @property
    def name(self) -> str:
        """ "torch" or "openvino" (the ``backend=`` value it answers)."""
        ...

    @property
    def precision(self) -> str:
        """ "fp32", "bf16" or "int8": the precision its forward pass runs in."""
        ...

    def infer(self, x: torch.Tensor, want_features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N, C) float32 and the feature map (N, F, h, w) float32 when ``want_features``
        (else None) for one preprocessed batch (N, 3, S, S); safe to call from several threads."""
        ...

    def verification_record(self) -> Path | None:
        """Where the result of the load-time comparison with fp32 eager is cached for this exact
        model, precision and machine, or None when it is not cached (measured at every load)."""
        ...


__all__ = ["BACKENDS", "Backend", "OpenVINOBackend", "PRECISIONS", "TorchBackend", "openvino_cache_dir"]
