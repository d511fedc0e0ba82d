"""Running ``score-dicom`` under a batch scheduler: the shard a task is handed, and the job recipes.

* :func:`shard_from_env`: ``--shard auto`` -> (k, n) from a SLURM job array
  (``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_STEP``,
  ``SLURM_ARRAY_TASK_COUNT``; Slurm sbatch(1) "OUTPUT ENVIRONMENT VARIABLES") or a Kubernetes
  Indexed Job (``JOB_COMPLETION_INDEX``, batch/v1 Job ``completionMode: Indexed``; Kubernetes does
  not export ``completions``, so the count comes from ``$MEDXRAY_SHARD_COUNT`` or ``--shard-count``).
* :func:`resolve_shard`: an explicit ``k/n`` always wins over the environment.
* :func:`render_recipes`: the sbatch array + dependent merge job, or the Kubernetes Indexed Job +
  merge Job, filled in from the user's arguments (:class:`RecipeArgs`); ``pipelines/slurm`` and
  ``pipelines/k8s`` hold copies rendered from :data:`EXAMPLE_RECIPE`.

Must not import anything of medxray but :mod:`medxray.errors` and :mod:`medxray.scoring.discovery`
(pure environment / text logic; no torch, no DICOM).
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from medxray.errors import ConfigError
from medxray.scoring.discovery import parse_shard

SHARD_COUNT_ENV = "MEDXRAY_SHARD_COUNT"
AUTO = "auto"


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"${name}={raw!r} is not an integer; --shard auto cannot use it") from None


def shard_from_env(env: Mapping[str, str] | None = None, count: int | None = None) -> tuple[int, int]:
    """The (k, n) shard (1-based k) the scheduler gave this task.

    SLURM array: k = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP + 1,
    n = SLURM_ARRAY_TASK_COUNT, so ``--array=0-3``, ``--array=1-4`` and ``--array=0-6:2`` all give
    shards 1..4 of 4. A list with gaps (``--array=1,2,7``) cannot be numbered this way: ConfigError.
    A requeued task keeps its array index, hence its shard.

    Kubernetes Indexed Job: k = JOB_COMPLETION_INDEX + 1, n = ``count`` or $MEDXRAY_SHARD_COUNT
    (set it to the Job's ``completions``).

    Raises :class:`ConfigError` when neither scheduler's variables are set, or they are inconsistent.
    """
    env = os.environ if env is None else env
    if count is not None and int(count) < 1:
        raise ConfigError(f"--shard-count must be >= 1, got {count}")
    task = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        n = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        lo = _env_int(env, "SLURM_ARRAY_TASK_MIN")
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") or 1
        if n is None or lo is None:
            raise ConfigError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_MIN are "
                              "not; run under `sbatch --array` or give --shard K/N")
        hi = _env_int(env, "SLURM_ARRAY_TASK_MAX")
        if (task - lo) % step or (hi is not None and (hi - lo) // step + 1 != n):
            raise ConfigError(f"the job array's indices are not an evenly stepped range (task {task}, min {lo}, "
                              f"max {hi}, step {step}, count {n}); use --array=0-{max(n, 1) - 1} or give --shard K/N")
        if count is not None and int(count) != n:
            raise ConfigError(f"--shard-count {count} disagrees with SLURM_ARRAY_TASK_COUNT={n}; drop --shard-count")
        return parse_shard(((task - lo) // step + 1, n))  # type: ignore[return-value]
    index = _env_int(env, "JOB_COMPLETION_INDEX")
    if index is not None:
        n = int(count) if count is not None else _env_int(env, SHARD_COUNT_ENV)
        if n is None:
            raise ConfigError(f"JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but the shard count is not: "
                              f"set ${SHARD_COUNT_ENV} (or --shard-count) to the Job's completions")
        if not 0 <= index < n:
            raise ConfigError(f"JOB_COMPLETION_INDEX={index} is outside 0..{n - 1} (${SHARD_COUNT_ENV} or "
                              f"--shard-count is {n}); make it equal the Job's completions")
        return parse_shard((index + 1, n))  # type: ignore[return-value]
    raise ConfigError("--shard auto found no scheduler shard: set by `sbatch --array` (SLURM_ARRAY_TASK_ID) or a "
                      f"Kubernetes Indexed Job (JOB_COMPLETION_INDEX with ${SHARD_COUNT_ENV}); outside a scheduler "
                      "give --shard K/N")


def resolve_shard(spec: str | tuple[int, int] | None, env: Mapping[str, str] | None = None,
                  count: int | None = None) -> tuple[int, int] | None:
    """``None`` (no sharding), ``"k/n"`` / ``(k, n)`` (explicit, wins over any scheduler variable) or
    ``"auto"`` (:func:`shard_from_env`); ConfigError for anything else."""
    if isinstance(spec, str) and spec.strip().lower() == AUTO:
        return shard_from_env(env, count)
    return parse_shard(spec)
