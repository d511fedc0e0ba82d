"""The one builder (``create_model``) over the variant table, and model descriptions (parameters, GMACs).

Imports the table (``variants``), the network (``densenet``), ImageNet initialisation (``weights``)
and the analytic counts (``complexity``); none of those may import this module.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from medxray.errors import ConfigError
from medxray.models.densenet import DenseNet
from medxray.models.variants import VARIANTS, get_variant
from medxray.models.weights import load_pretrained, wants_pretrained

log = logging.getLogger(__name__)


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

    ``pretrained``: ``None`` or ``"none"`` (random init, see :func:`wants_pretrained`),
    ``"imagenet"`` (torchvision's weights via the torch hub cache) or a path to a
    torchvision-format state dict.
    """
    v = get_variant(name)
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if int(in_chans) < 1:
        raise ConfigError(f"in_chans must be >= 1, got {in_chans}")
    if not 0.0 <= float(drop_rate) < 1.0:
        raise ConfigError(f"drop_rate must be in [0, 1), got {drop_rate}")
    model = DenseNet(
        v.growth_rate,
        v.block_config,
        v.num_init_features,
        stem=v.stem,
        bottleneck=v.bottleneck,
        compression=v.compression,
        drop_rate=drop_rate,
        num_classes=int(num_classes),
        in_chans=int(in_chans),
        memory_efficient=memory_efficient,
    )
    if wants_pretrained(pretrained):
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


def describe_variants(with_flops: bool = True, *, measure: bool = False) -> list[dict[str, Any]]:
    """One row per variant for `medxray models`: parameters at the paper's class count, GMACs.

    The counts come from the variant table (:func:`medxray.models.complexity.variant_counts`), so
    the listing takes milliseconds; ``measure=True`` builds each network and counts with torch
    instead (minutes on a CPU; the slow test that checks the two agree uses it).
    """
    from medxray.models.complexity import variant_counts

    rows = []
    for name, v in VARIANTS.items():
        if measure:
            model = create_model(name, num_classes=v.paper_classes)
            params = count_parameters(model)
            gmacs = measure_gmacs(model, v.input_size) if with_flops else None
        else:
            params, macs = variant_counts(v)
            gmacs = macs / 1e9 if with_flops else None
        rows.append(
            {
                "name": name,
                "stem": v.stem,
                "input_size": v.input_size,
                "num_classes": v.paper_classes,
                "params": params,
                "gmacs": gmacs,
                "imagenet_weights": v.imagenet_file is not None,
            }
        )
    return rows
