"""The site loop (issue 22): reviews -> labels -> validation -> recalibration -> fine-tuning -> a gated,
reversible promotion -> monitoring, on one hospital's own studies.

Modules (each small, importable without the CLI):

* :mod:`~medxray.site.labels`     review verdicts + scorer results -> a CSV manifest (``finetune --dataset csv``)
* :mod:`~medxray.site.lockset`    the locked, patient-disjoint site test set and its freeze check
* :mod:`~medxray.site.validate`   per-finding site figures beside the checkpoint's own validation figures
* :mod:`~medxray.site.calibrate`  thresholds re-derived on the site's (unlocked) labels; a new model version
* :mod:`~medxray.site.registry`   versions, an atomically switched ``current`` pointer, promotion records
* :mod:`~medxray.site.promote`    the promotion gate (paired DeLong + bootstrap + Holm, non-inferiority)
* :mod:`~medxray.site.monitor`    volume, OOD rate, positive rates, PSI drift, reviewer agreement; Prometheus file
"""
