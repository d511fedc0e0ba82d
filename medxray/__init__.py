"""medxray: chest X-ray transfer learning with an in-repo DenseNet-BC.

Importing the package has no side effects (no logging configuration, no warning filters,
no seeding); the CLI configures logging for itself.
"""

__version__ = "0.1.0"

from medxray.errors import MedxrayError  # noqa: E402

__all__ = ["MedxrayError", "__version__"]
