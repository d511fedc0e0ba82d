"""In-repo DenseNet-BC: one table of variants, one builder, ImageNet initialisation."""

from medxray.models.densenet import DenseNet
from medxray.models.registry import (
    VARIANTS,
    Variant,
    count_parameters,
    create_model,
    describe_variants,
    get_variant,
    measure_gmacs,
)

__all__ = [
    "DenseNet", "VARIANTS", "Variant", "count_parameters", "create_model", "describe_variants",
    "get_variant", "measure_gmacs",
]
