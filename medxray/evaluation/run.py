"""The evaluation job: ``evaluate(checkpoint, ...) -> EvalResult``, scoring a split (with optional TTA)
and writing its outputs.

What it measures, and why that way:

* per-class AUROC with 95% bootstrap confidence intervals (images resampled jointly, so the mean
  AUROC gets an interval too) and AUPRC, the numbers CheXNet and Wang et al. report;
* operating thresholds per class (Youden's J, and the threshold giving 90% specificity). They are
  chosen on the validation split by default, so the sensitivity and specificity reported on the
  test split are not fitted to it. With ``write_back=True`` (the CLI's default) they are written
  back into the checkpoint's metadata, where the scorer and the app read them;
* calibration (expected calibration error, reliability plot), ROC and PR curves as PNG;
* optional TenCrop test-time augmentation;
* localisation on images with boxes: the class activation map (features . classifier weights,
  no hooks) is thresholded into boxes, scored by IoBB at T = 0.1 ... 0.9 as in Wang et al. 2017,
  plus the pointing game;
* a Markdown + HTML report placing our AUROC beside CheXNet's and Wang's and saying which split
  and data the numbers rest on.

``evaluate()`` runs the stages of :mod:`medxray.evaluation.stages` in order (load, score, thresholds,
assess, write-back). The scoring pass is :mod:`medxray.evaluation.score`, the metrics live in
:mod:`medxray.evaluation.metrics`, localisation in :mod:`medxray.evaluation.localisation`, plots and
the report in :mod:`medxray.evaluation.report`.
This module must not import training (:mod:`medxray.training`, :mod:`medxray.train`): shared
helpers come from :mod:`medxray.hardware`, :mod:`medxray.fileio` and :mod:`medxray.data`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from medxray.errors import ConfigError
from medxray.evaluation.result import EvalResult
from medxray.evaluation.score import score_split, ten_crop
from medxray.evaluation.stages import (
    SPLITS,
    EvalSettings,
    assess_stage,
    load_stage,
    score_stage,
    threshold_stage,
    write_back_stage,
)

__all__ = ["SPLITS", "EvalSettings", "evaluate", "score_split", "ten_crop"]


def evaluate(
    checkpoint: str | Path,
    *,
    dataset: str | None = None,
    data_root: str | Path | None = None,
    split: str = "test",
    out_dir: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 32,
    tta: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold_split: str | None = "val",
    write_back: bool = False,
    localisation: bool = True,
    cam_threshold: float = 0.5,
    num_workers: int | None = None,
    data_note: str | None = None,
    splits: Any = None,
    progress: bool = False,
    cam_method: str | None = None,
    write_thresholds: bool | None = None,
) -> EvalResult:
    """Evaluate ``checkpoint`` on one split and write metrics, plots and a report to ``out_dir``.

    Dataset options (view, validation fraction and seed, ...) default to the ones the checkpoint
    was trained with, so ``split="val"`` is the same validation split training used.
    ``threshold_split``: where operating thresholds are chosen (``None``: on ``split`` itself).
    ``precision``: fp32 by default, so that the reported numbers do not depend on the hardware; "bf16"
    or "auto" (bf16 where native) trade exactness for speed, and the report names the one used.
    ``data_root`` defaults to the absolute path the checkpoint was trained on.
    ``cam_method``: the map method localisation is scored with (:data:`medxray.cam.MAP_METHODS`;
    None = the one the checkpoint records, else :data:`medxray.cam.DEFAULT_MAP_METHOD`).
    ``write_back``: write the thresholds, this split's metrics, the map method and the per-finding
    localisation figures into ``checkpoint`` (rewriting the file), so the app and the scorer use
    them. Off by default: the checkpoint file is left untouched. ``medxray evaluate`` turns it on
    (``--no-write-thresholds`` turns it off). ``write_thresholds``: deprecated alias of ``write_back``
    (DeprecationWarning). ``splits``: prebuilt :class:`medxray.data.DatasetSplits` to use instead of
    building them from ``data_root``.

    Raises :class:`medxray.errors.ConfigError` (bad split names, conflicting ``write_back`` and
    ``write_thresholds``, unknown dataset), :class:`medxray.errors.CheckpointError` and
    :class:`medxray.errors.DataError` (see :func:`medxray.evaluation.stages.load_stage`).
    """
    if write_thresholds is not None:
        warnings.warn(
            "evaluate(write_thresholds=...) is deprecated; use write_back=...", DeprecationWarning, stacklevel=2
        )
        if write_back and not write_thresholds:
            raise ConfigError("evaluate() got write_back=True and write_thresholds=False; pass only write_back")
        write_back = bool(write_thresholds)
    settings = EvalSettings(
        split=split,
        threshold_split=threshold_split,
        dataset=dataset,
        data_root=data_root,
        out_dir=out_dir,
        device=device,
        precision=precision,
        batch_size=batch_size,
        tta=tta,
        n_bootstrap=n_bootstrap,
        seed=seed,
        localisation=localisation,
        cam_threshold=cam_threshold,
        cam_method=cam_method,
        num_workers=num_workers,
        data_note=data_note,
        progress=progress,
    )
    loaded = load_stage(checkpoint, settings, splits)
    scored = score_stage(loaded, settings)
    thresholds = threshold_stage(loaded, settings)
    assessed = assess_stage(loaded, scored, thresholds, settings)
    if write_back:
        write_back_stage(loaded, thresholds, assessed)
    return assessed.result
