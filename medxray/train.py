"""Compatibility entry point: ``from medxray.train import finetune, TrainConfig, make_config,
load_config_file`` keeps working.

The code lives in :mod:`medxray.training` (config, state, data, steps, loop, distributed) and
the shared precision helpers in :mod:`medxray.hardware`; this module only re-exports their public
names and must hold no logic of its own.
"""

from __future__ import annotations

from medxray.hardware import PRECISIONS, autocast, default_num_workers, resolve_precision
from medxray.training.config import (
    POS_WEIGHTS,
    RESUME_OVERRIDABLE,
    SCHEDULERS,
    VIEWS,
    TrainConfig,
    build_config,
    config_fields,
    load_config_file,
    make_config,
    save_config,
    validate_config,
)
from medxray.training.data import epoch_dataset, positive_weights
from medxray.training.loop import FinetuneResult, TrainingDivergedError, finetune
from medxray.training.state import RUN_FILES, git_commit, rng_states, scoped_rng, set_rng_states, versions
from medxray.training.steps import make_optimizer, make_scheduler, masked_bce_with_logits, predict_dataset, train_step

__all__ = [
    "POS_WEIGHTS",
    "PRECISIONS",
    "RESUME_OVERRIDABLE",
    "RUN_FILES",
    "SCHEDULERS",
    "VIEWS",
    "FinetuneResult",
    "TrainConfig",
    "TrainingDivergedError",
    "autocast",
    "build_config",
    "config_fields",
    "default_num_workers",
    "epoch_dataset",
    "finetune",
    "git_commit",
    "load_config_file",
    "make_config",
    "make_optimizer",
    "make_scheduler",
    "masked_bce_with_logits",
    "positive_weights",
    "predict_dataset",
    "resolve_precision",
    "rng_states",
    "save_config",
    "scoped_rng",
    "set_rng_states",
    "train_step",
    "validate_config",
    "versions",
]
