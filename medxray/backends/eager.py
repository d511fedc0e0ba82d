"""The eager PyTorch backend: the Predictor's model, run as it is (bf16 autocast where asked).

Must not import :mod:`medxray.inference`, the scoring, the app or the CLI (they import it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from medxray.models.densenet import DenseNet


class TorchBackend:
    """Eager forward passes of ``model`` on ``device`` in ``precision`` ("fp32" or "bf16").

    bf16 runs under ``torch.autocast`` (CUDA, or CPUs with AVX512-BF16 / AMX); on the CPU the
    model is also converted, in place, to channels_last (the oneDNN bf16 kernels' layout), so the
    caller's model object changes memory format (the Predictor converts it back when it falls back
    to fp32). The model is only read, so one backend serves several threads.
    """

    name = "torch"

    def __init__(self, model: DenseNet, device: torch.device, precision: str) -> None:
        self.model = model
        self.device = device
        self.precision = precision
        self.channels_last = device.type == "cpu" and precision == "bf16"
        if self.channels_last:
            model.to(memory_format=torch.channels_last)  # in place: Module.to returns the module

    def infer(self, x: torch.Tensor, want_features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N, C) and, when asked, the feature map (N, F, h, w), float32, for a batch (N, 3, S, S)."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        bf16 = self.precision == "bf16"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            feats = self.model.forward_features(x)
            logits = self.model.forward_head(feats)
        logits_np = logits.float().cpu().numpy()
        feats_np = feats.float().cpu().numpy() if want_features else None
        return logits_np, feats_np

    def verification_record(self) -> Path | None:
        """None: eager passes are compared with fp32 at every load (nothing to convert, nothing cached)."""
        return None
