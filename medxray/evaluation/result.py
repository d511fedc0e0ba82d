"""The record of one evaluation: :class:`EvalResult` (numbers and the files written).

Shared by the evaluation job (:mod:`medxray.evaluation.run`) and the report renderer
(:mod:`medxray.evaluation.report`), so neither imports the other's internals. Must not import any
other medxray module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvalResult:
    """Numbers and files of one evaluation."""

    out_dir: Path
    checkpoint: Path | None  # None when the probabilities came from a predictions file
    split: str
    n_images: int
    label_names: list[str]
    auroc: dict[str, float]
    auroc_ci: dict[str, tuple[float, float]]
    mean_auroc: float
    mean_auroc_ci: tuple[float, float]
    auprc: dict[str, float]
    thresholds: dict[str, float]
    threshold_split: str
    operating_points: dict[str, Any]
    calibration: dict[str, Any]
    localisation: dict[str, Any] | None
    report_md: Path
    report_html: Path
    files: dict[str, Path] = field(default_factory=dict)
    precision: str = "fp32"  # the numeric precision the probabilities were computed in
    coverage: dict[str, Any] | None = None  # of ChestX-ray14's official test list (evaluation.assess)
    coverage_note: str | None = None  # the one line saying what the numbers rest on
    thresholds_fallback: list[str] = field(default_factory=list)  # findings given 0.5: nothing to choose on
