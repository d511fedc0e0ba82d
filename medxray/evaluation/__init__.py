"""Evaluation of a fine-tuned checkpoint, one concern per module.

* :mod:`medxray.evaluation.metrics`: AUROC, bootstrap CIs, AUPRC, operating points, calibration;
* :mod:`medxray.evaluation.localisation`: CAM boxes, IoBB, pointing game, their summary;
* :mod:`medxray.evaluation.report`: ROC / PR / reliability plots, Markdown + HTML report;
* :mod:`medxray.evaluation.result`: :class:`EvalResult`, the record of one evaluation;
* :mod:`medxray.evaluation.assess`: from probabilities to metrics, files and report (coverage of the
  official test list, fallback thresholds, exact ``predictions.csv``);
* :mod:`medxray.evaluation.run`: ``evaluate()``, the public entry, running the stages in order;
* :mod:`medxray.evaluation.stages`: those stages (load, score, thresholds, assess, write-back) and their
  typed hand-offs;
* :mod:`medxray.evaluation.score`: one scoring pass over a split (TenCrop TTA, localisation records);
* :mod:`medxray.evaluation.external`: ``evaluate_predictions()``, any model's predictions file;
* :mod:`medxray.evaluation.compare`: two models on the same images (DeLong's test, paired bootstrap).

``from medxray.evaluate import evaluate`` is the stable entry point. This package must not
import training code (:mod:`medxray.training`, :mod:`medxray.train`).
"""
