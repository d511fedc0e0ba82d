"""The one table of DenseNet variants (Huang et al., CVPR 2017: Table 1 for ImageNet, Table 2 for CIFAR).

ImageNet configurations are torchvision's (plus DenseNet-264); CIFAR configurations are Table 2's,
where depth L gives (L - 4) / 3 layers per block for plain DenseNet and (L - 4) / 6 bottleneck
layers per block for DenseNet-BC. Pure data: it must not import the builder, weights or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from medxray.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One row of the table: everything needed to build a variant and describe it (keyword-only)."""

    growth_rate: int  # k, maps each dense layer adds
    block_config: tuple[int, ...]  # layers per dense block
    num_init_features: int  # stem output channels (2k for DenseNet-BC)
    stem: str  # "imagenet" (7x7/2 conv + 3x3/2 max pool) | "cifar" (one 3x3 conv)
    bottleneck: bool  # B: 1x1 conv to 4k channels before each 3x3 conv
    compression: float  # C: theta, the transitions' channel factor (1.0 = plain DenseNet)
    input_size: int  # the paper's input side in pixels
    paper_classes: int  # the class count the paper's parameter counts use
    imagenet_file: str | None = None  # torchvision's released weights file, if any


VARIANTS: dict[str, Variant] = {
    "densenet121": Variant(
        growth_rate=32,
        block_config=(6, 12, 24, 16),
        num_init_features=64,
        stem="imagenet",
        bottleneck=True,
        compression=0.5,
        input_size=224,
        paper_classes=1000,
        imagenet_file="densenet121-a639ec97.pth",
    ),
    "densenet169": Variant(
        growth_rate=32,
        block_config=(6, 12, 32, 32),
        num_init_features=64,
        stem="imagenet",
        bottleneck=True,
        compression=0.5,
        input_size=224,
        paper_classes=1000,
        imagenet_file="densenet169-b2777c0a.pth",
    ),
    "densenet201": Variant(
        growth_rate=32,
        block_config=(6, 12, 48, 32),
        num_init_features=64,
        stem="imagenet",
        bottleneck=True,
        compression=0.5,
        input_size=224,
        paper_classes=1000,
        imagenet_file="densenet201-c1103571.pth",
    ),
    "densenet161": Variant(
        growth_rate=48,
        block_config=(6, 12, 36, 24),
        num_init_features=96,
        stem="imagenet",
        bottleneck=True,
        compression=0.5,
        input_size=224,
        paper_classes=1000,
        imagenet_file="densenet161-8d451a50.pth",
    ),
    "densenet264": Variant(
        growth_rate=32,
        block_config=(6, 12, 64, 48),
        num_init_features=64,
        stem="imagenet",
        bottleneck=True,
        compression=0.5,
        input_size=224,
        paper_classes=1000,
    ),
    "densenet_40_k12": Variant(
        growth_rate=12,
        block_config=(12, 12, 12),
        num_init_features=16,
        stem="cifar",
        bottleneck=False,
        compression=1.0,
        input_size=32,
        paper_classes=10,
    ),
    "densenet_100_k12": Variant(
        growth_rate=12,
        block_config=(32, 32, 32),
        num_init_features=16,
        stem="cifar",
        bottleneck=False,
        compression=1.0,
        input_size=32,
        paper_classes=10,
    ),
    "densenet_100_k24": Variant(
        growth_rate=24,
        block_config=(32, 32, 32),
        num_init_features=16,
        stem="cifar",
        bottleneck=False,
        compression=1.0,
        input_size=32,
        paper_classes=10,
    ),
    "densenet_bc_100_k12": Variant(
        growth_rate=12,
        block_config=(16, 16, 16),
        num_init_features=24,
        stem="cifar",
        bottleneck=True,
        compression=0.5,
        input_size=32,
        paper_classes=10,
    ),
    "densenet_bc_250_k24": Variant(
        growth_rate=24,
        block_config=(41, 41, 41),
        num_init_features=48,
        stem="cifar",
        bottleneck=True,
        compression=0.5,
        input_size=32,
        paper_classes=10,
    ),
    "densenet_bc_190_k40": Variant(
        growth_rate=40,
        block_config=(31, 31, 31),
        num_init_features=80,
        stem="cifar",
        bottleneck=True,
        compression=0.5,
        input_size=32,
        paper_classes=10,
    ),
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(VARIANTS)}") from None
