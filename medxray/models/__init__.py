"""In-repo DenseNet-BC: one table of variants, one builder, ImageNet initialisation.

The variant table (:mod:`medxray.models.variants`) is torch-free and imported here eagerly; the
builder, the network and the weights loader import torch and are loaded on first use (PEP 562,
:mod:`medxray.lazyexports`), so the CLI lists the variants without importing torch.
"""

from typing import TYPE_CHECKING

from medxray.lazyexports import lazy_exports
from medxray.models.variants import VARIANTS, Variant, get_variant

if TYPE_CHECKING:
    from medxray.models.densenet import DenseNet, FeatureInfo
    from medxray.models.registry import count_parameters, create_model, describe_variants, measure_gmacs
    from medxray.models.weights import NO_PRETRAINED, wants_pretrained

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "DenseNet": "densenet",
        "FeatureInfo": "densenet",
        "count_parameters": "registry",
        "create_model": "registry",
        "describe_variants": "registry",
        "measure_gmacs": "registry",
        "NO_PRETRAINED": "weights",
        "wants_pretrained": "weights",
    },
)

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
