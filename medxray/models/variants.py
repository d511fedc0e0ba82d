"""The one table of DenseNet variants (Huang et al., CVPR 2017: Table 1 for ImageNet, Table 2 for CIFAR).

ImageNet configurations are torchvision's (plus DenseNet-264); CIFAR configurations are Table 2's,
where depth L gives (L - 4) / 3 layers per block for plain DenseNet and (L - 4) / 6 bottleneck
layers per block for DenseNet-BC. Pure data: it must not import the builder, weights or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from medxray.errors import ConfigError


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
