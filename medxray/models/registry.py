"""The one table of DenseNet variants and the one builder.

ImageNet configurations are torchvision's (Table 1 of the paper, plus DenseNet-264);
CIFAR configurations are Table 2's, where depth L gives (L - 4) / 3 layers per block for plain
DenseNet and (L - 4) / 6 bottleneck layers per block for DenseNet-BC.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from medxray.errors import ConfigError
from medxray.models.densenet import DenseNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One row of the table: everything needed to build a variant and describe it."""

    growth_rate: int
    block_config: tuple[int, ...]
    num_init_features: int
    stem: str  # "imagenet" | "cifar"
    bottleneck: bool
    compression: float
    input_size: int
    paper_classes: int  # the class count the paper's parameter counts use
    imagenet_file: str | None = None  # torchvision's released weights file, if any


VARIANTS: dict[str, Variant] = {
    # name                 k   blocks             init stem       B      theta  size  classes  torchvision weights
    "densenet121": Variant(32, (6, 12, 24, 16), 64, "imagenet", True, 0.5, 224, 1000, "densenet121-a639ec97.pth"),
    "densenet169": Variant(32, (6, 12, 32, 32), 64, "imagenet", True, 0.5, 224, 1000, "densenet169-b2777c0a.pth"),
    "densenet201": Variant(32, (6, 12, 48, 32), 64, "imagenet", True, 0.5, 224, 1000, "densenet201-c1103571.pth"),
    "densenet161": Variant(48, (6, 12, 36, 24), 96, "imagenet", True, 0.5, 224, 1000, "densenet161-8d451a50.pth"),
    "densenet264": Variant(32, (6, 12, 64, 48), 64, "imagenet", True, 0.5, 224, 1000),
    "densenet_40_k12": Variant(12, (12, 12, 12), 16, "cifar", False, 1.0, 32, 10),
    "densenet_100_k12": Variant(12, (32, 32, 32), 16, "cifar", False, 1.0, 32, 10),
    "densenet_100_k24": Variant(24, (32, 32, 32), 16, "cifar", False, 1.0, 32, 10),
    "densenet_bc_100_k12": Variant(12, (16, 16, 16), 24, "cifar", True, 0.5, 32, 10),
    "densenet_bc_250_k24": Variant(24, (41, 41, 41), 48, "cifar", True, 0.5, 32, 10),
    "densenet_bc_190_k40": Variant(40, (31, 31, 31), 80, "cifar", True, 0.5, 32, 10),
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(VARIANTS)}") from None


def create_model(
    name: str,
    num_classes: int = 1000,
    *,
    pretrained: str | os.PathLike | None = None,
    memory_efficient: bool = False,
    in_chans: int = 3,
    drop_rate: float = 0.0,
) -> DenseNet:
    """Build a variant from :data:`VARIANTS`, optionally initialised from ImageNet weights.

    ``pretrained``: ``None`` (random init), ``"imagenet"`` (torchvision's weights via the torch
    hub cache) or a path to a torchvision-format state dict.
    """
    v = get_variant(name)
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if int(in_chans) < 1:
        raise ConfigError(f"in_chans must be >= 1, got {in_chans}")
    if not 0.0 <= float(drop_rate) < 1.0:
        raise ConfigError(f"drop_rate must be in [0, 1), got {drop_rate}")
    model = DenseNet(
        v.growth_rate, v.block_config, v.num_init_features, stem=v.stem, bottleneck=v.bottleneck,
        compression=v.compression, drop_rate=drop_rate, num_classes=int(num_classes), in_chans=int(in_chans),
        memory_efficient=memory_efficient,
    )
    if pretrained is not None and str(pretrained).lower() not in ("none", ""):
        from medxray.models.weights import load_pretrained

        load_pretrained(model, name, pretrained)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_gmacs(model: torch.nn.Module, input_size: int, in_chans: int = 3) -> float:
    """Multiply-accumulates (in billions) of one forward pass at ``input_size``, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    x = torch.zeros(1, in_chans, input_size, input_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2e9  # FlopCounterMode counts 2 FLOPs per multiply-add


def describe_variants(with_flops: bool = True) -> list[dict[str, Any]]:
    """One row per variant for `medxray models`: parameters at the paper's class count, GMACs."""
    rows = []
    for name, v in VARIANTS.items():
        model = create_model(name, num_classes=v.paper_classes)
        rows.append({
            "name": name,
            "stem": v.stem,
            "input_size": v.input_size,
            "num_classes": v.paper_classes,
            "params": count_parameters(model),
            "gmacs": measure_gmacs(model, v.input_size) if with_flops else None,
            "imagenet_weights": v.imagenet_file is not None,
        })
    return rows
