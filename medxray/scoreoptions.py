"""The fixed choices of a batch scoring run (``medxray score-dicom``): CAM modes, CAM methods, OOD policies.

Kept apart from :mod:`medxray.scoring` (whose package imports numpy and the DICOM reader) so the CLI
lists them in ``score-dicom --help`` without importing more than this file and
:mod:`medxray.mapmethods`. :mod:`medxray.scoring.config` re-exports :data:`CAM_MODES` and
:data:`CAM_METHODS`, :mod:`medxray.scoring.gate` :data:`OOD_POLICIES`; they validate with them.

Imports nothing of medxray but :mod:`medxray.mapmethods` (tests/test_import_graph.py).
"""

from __future__ import annotations

from medxray.mapmethods import MAP_METHODS

# ``--cams``: overlays for the positive findings, for every finding, or none
CAM_MODES: tuple[str, ...] = ("positive", "all", "none")
# ``--cam-method``: "checkpoint" = the method the checkpoint's localisation figures were measured with
# (evaluate records it), "gradcam" the older name of gradcam-denseblock4, then every MAP_METHODS key
CAM_METHODS: tuple[str, ...] = ("checkpoint", "gradcam", *MAP_METHODS)
# ``--ood-policy``: an image past the checkpoint's OOD threshold gets a warning, or is skipped with a reason
OOD_POLICIES: tuple[str, ...] = ("warn", "skip")

__all__ = ["CAM_METHODS", "CAM_MODES", "OOD_POLICIES"]
