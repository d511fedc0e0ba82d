"""Compatibility entry point: ``from medxray.evaluate import evaluate`` keeps working.

The code lives in :mod:`medxray.evaluation` (metrics, localisation, report, run); this module
only re-exports its public names and must hold no logic of its own.
"""

from __future__ import annotations

from medxray.evaluation.localisation import (
    FINDING_ALIASES,
    IOBB_THRESHOLDS,
    cam_to_boxes,
    iobb,
    localisation_metadata,
    localise_batch,
    localise_one,
    summarise_localisation,
)
from medxray.evaluation.metrics import (
    auprc_per_class,
    auroc_per_class,
    bootstrap_auroc,
    calibration,
    operating_points,
    sens_spec_at,
    weighted_auroc,
)
from medxray.evaluation.result import EvalResult
from medxray.evaluation.run import SPLITS, evaluate, score_split, ten_crop

__all__ = [
    "FINDING_ALIASES",
    "IOBB_THRESHOLDS",
    "SPLITS",
    "EvalResult",
    "auprc_per_class",
    "auroc_per_class",
    "bootstrap_auroc",
    "calibration",
    "cam_to_boxes",
    "evaluate",
    "iobb",
    "localisation_metadata",
    "localise_batch",
    "localise_one",
    "operating_points",
    "score_split",
    "sens_spec_at",
    "summarise_localisation",
    "ten_crop",
    "weighted_auroc",
]
