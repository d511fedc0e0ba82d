"""In-repo DenseNet-BC: one table of variants, one builder, ImageNet initialisation."""

from medxray.models.densenet import DenseNet, FeatureInfo
from medxray.models.registry import count_parameters, create_model, describe_variants, measure_gmacs
from medxray.models.variants import VARIANTS, Variant, get_variant
from medxray.models.weights import NO_PRETRAINED, wants_pretrained

__all__ = [
    "DenseNet",
    "FeatureInfo",
    "NO_PRETRAINED",
    "VARIANTS",
    "Variant",
    "count_parameters",
    "create_model",
    "describe_variants",
    "get_variant",
    "measure_gmacs",
    "wants_pretrained",
]
