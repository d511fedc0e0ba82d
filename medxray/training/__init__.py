"""Fine-tuning, one concern per module.

* :mod:`medxray.training.config`: :class:`TrainConfig`, its variant tables, reading and checking it;
* :mod:`medxray.training.state`: run-directory files, resuming, checkpoint metadata, RNG states,
  versions and git commit;
* :mod:`medxray.training.data`: the run's splits and their checks, per-epoch augmentation seeds,
  positive-class weights;
* :mod:`medxray.training.steps`: masked loss, one optimisation step, optimiser and schedule, the
  validation pass;
* :mod:`medxray.training.loop`: ``finetune()`` and the epoch loop;
* :mod:`medxray.training.distributed`: torchrun / DDP helpers.

``from medxray.train import finetune, TrainConfig`` is the stable entry point. Nothing in this
package imports the CLI; evaluation is used only through :mod:`medxray.evaluation.metrics`.
"""
