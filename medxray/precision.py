"""The precisions fine-tuning and evaluation run in (torch-free, so the CLI lists them without torch).

``"auto"`` (resolved by :func:`medxray.hardware.resolve_precision`: bf16 where the device computes
it natively, fp16 on CUDA without bf16, else fp32), ``"bf16"`` and ``"fp16"`` (``torch.autocast`` mixed
precision, Micikevicius et al., ICLR 2018) and ``"fp32"``. :mod:`medxray.hardware` re-exports
:data:`PRECISIONS`. The Predictor's own table (with OpenVINO's int8) is
:data:`medxray.backends.PRECISIONS`.

Imports nothing of medxray (tests/test_import_graph.py).
"""

from __future__ import annotations

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")

__all__ = ["PRECISIONS"]
