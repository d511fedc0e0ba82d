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
            raise ConfigError(
                "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_MIN are "
                "not; run under `sbatch --array` or give --shard K/N"
            )
        hi = _env_int(env, "SLURM_ARRAY_TASK_MAX")
        if (task - lo) % step or (hi is not None and (hi - lo) // step + 1 != n):
            raise ConfigError(
                f"the job array's indices are not an evenly stepped range (task {task}, min {lo}, "
                f"max {hi}, step {step}, count {n}); use --array=0-{max(n, 1) - 1} or give --shard K/N"
            )
        if count is not None and int(count) != n:
            raise ConfigError(f"--shard-count {count} disagrees with SLURM_ARRAY_TASK_COUNT={n}; drop --shard-count")
        return parse_shard(((task - lo) // step + 1, n))  # type: ignore[return-value]
    index = _env_int(env, "JOB_COMPLETION_INDEX")
    if index is not None:
        n = int(count) if count is not None else _env_int(env, SHARD_COUNT_ENV)
        if n is None:
            raise ConfigError(
                f"JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but the shard count is not: "
                f"set ${SHARD_COUNT_ENV} (or --shard-count) to the Job's completions"
            )
        if not 0 <= index < n:
            raise ConfigError(
                f"JOB_COMPLETION_INDEX={index} is outside 0..{n - 1} (${SHARD_COUNT_ENV} or "
                f"--shard-count is {n}); make it equal the Job's completions"
            )
        return parse_shard((index + 1, n))  # type: ignore[return-value]
    raise ConfigError(
        "--shard auto found no scheduler shard: set by `sbatch --array` (SLURM_ARRAY_TASK_ID) or a "
        f"Kubernetes Indexed Job (JOB_COMPLETION_INDEX with ${SHARD_COUNT_ENV}); outside a scheduler "
        "give --shard K/N"
    )


def resolve_shard(
    spec: str | tuple[int, int] | None, env: Mapping[str, str] | None = None, count: int | None = None
) -> tuple[int, int] | None:
    """``None`` (no sharding), ``"k/n"`` / ``(k, n)`` (explicit, wins over any scheduler variable) or
    ``"auto"`` (:func:`shard_from_env`); ConfigError for anything else."""
    if isinstance(spec, str) and spec.strip().lower() == AUTO:
        return shard_from_env(env, count)
    return parse_shard(spec)


# ---- recipes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipeArgs:
    """What a scheduler recipe is filled in with (``score-dicom --emit slurm|k8s``).

    Paths are as the tasks see them (a shared file system under SLURM; the shared volume mounted at
    ``mount_path`` under Kubernetes). ``score_args`` are further ``score-dicom`` options, passed through
    (e.g. ``("--cams", "none")``). ``cpus`` is per task: decode workers and inference threads.
    """

    input_dir: str
    checkpoint: str
    out: str
    shards: int
    cpus: int = 4
    memory_gb: int = 8
    hours: int = 4  # SLURM --time per task
    gpus: int = 0  # per task (SLURM --gpus-per-task / Kubernetes nvidia.com/gpu)
    partition: str | None = None
    command: str = "medxray"  # the medxray executable on the nodes (e.g. a venv's bin/medxray)
    lock_wait_s: int = 600
    max_retries: int = 3  # Kubernetes backoffLimitPerIndex
    parallelism: int | None = None  # Kubernetes pods at once (None = all shards)
    image: str = "registry.example.org/medxray:latest"
    data_claim: str = "medxray-data"  # ReadWriteMany PVC holding input and out
    mount_path: str = "/data"
    model_claim: str = "medxray-models"  # PVC holding the checkpoint, mounted read-only
    score_args: tuple[str, ...] = ()

    def check(self) -> None:
        if int(self.shards) < 1:
            raise ConfigError(f"--shards must be >= 1, got {self.shards}")
        if int(self.cpus) < 1 or int(self.memory_gb) < 1 or int(self.hours) < 1 or int(self.gpus) < 0:
            raise ConfigError("--cpus-per-task, --mem-gb and --hours must be >= 1, --gpus-per-task >= 0")
        for name, value in (("INPUT_DIR", self.input_dir), ("--checkpoint", self.checkpoint), ("--out", self.out)):
            if not str(value).startswith("/"):
                raise ConfigError(f"{name} {value!r} must be an absolute path as the scheduler's tasks see it")
        for bad in ("--shard", "--out", "--checkpoint", "--merge", "--emit"):
            if any(a == bad or a.startswith(bad + "=") for a in self.score_args):
                raise ConfigError(f"{bad} is set by the recipe itself; leave it out of the passed-through options")


EXAMPLE_RECIPE = RecipeArgs(
    input_dir="/data/archive/dicom",
    checkpoint="/models/chestxray14.pt",
    out="/data/scored/archive",
    shards=16,
    score_args=("--cams", "none"),
)


def _q(arg: str) -> str:
    return shlex.quote(str(arg))


def _score_argv(a: RecipeArgs, workers: str, threads: str) -> list[str]:
    return [
        a.command,
        "score-dicom",
        a.input_dir,
        "--checkpoint",
        a.checkpoint,
        "--out",
        a.out,
        "--shard",
        "auto",
        "--lock-wait",
        str(a.lock_wait_s),
        "--workers",
        workers,
        "--threads",
        threads,
        "--no-progress",
        *a.score_args,
    ]


def render_slurm(a: RecipeArgs) -> dict[str, str]:
    """``score_array.sbatch`` (one array task per shard, requeueable) and ``merge.sbatch`` (its
    ``afterany`` dependent, which refuses an incomplete run). Each task reads its shard from
    ``SLURM_ARRAY_TASK_ID`` (``--shard auto``)."""
    a.check()
    logs = f"{a.out.rstrip('/')}/logs"
    common = [f"#SBATCH --partition={a.partition}"] if a.partition else []
    # task/affinity may pin a task to its CPUs, or not (task/none): give the counts explicitly
    argv = " ".join(
        _q(x) if not x.startswith("${") else f'"{x}"'
        for x in _score_argv(a, "${SLURM_CPUS_PER_TASK:-1}", "${SLURM_CPUS_PER_TASK:-1}")
    )
    score = "\n".join(
        [
            "#!/bin/bash",
            f"# medxray: score {a.input_dir} in {a.shards} shards, one SLURM array task each (issue 23).",
            "# Written by `medxray score-dicom --emit slurm`. Submit both jobs; the merge waits for every task:",
            f"#   mkdir -p {_q(logs)}",
            "#   ARRAY=$(sbatch --parsable score_array.sbatch)",
            "#   sbatch --dependency=afterany:$ARRAY merge.sbatch",
            "# A task that is killed, fails on a node or is preempted resumes from its journal when requeued",
            "# (--requeue does it on node failure / preemption; by hand: scontrol requeue ${ARRAY}_K, then",
            "# scontrol update JobId=${ARRAY}_K StartTime=now to skip the requeue delay). If an old copy is still",
            f"# dying, the new one waits up to {a.lock_wait_s} s for its lock. Resubmitting the array also resumes.",
            "# The merge depends afterany, not afterok: Slurm never satisfies afterok on an array once any task",
            "# failed, even after that task was requeued and succeeded (DependencyNeverSatisfied); the merge checks",
            "# completeness itself and fails naming the missing shards (then: sbatch merge.sbatch again).",
            "#SBATCH --job-name=medxray-score",
            f"#SBATCH --array=0-{a.shards - 1}",
            "#SBATCH --ntasks=1",
            f"#SBATCH --cpus-per-task={a.cpus}",
            f"#SBATCH --mem={a.memory_gb}G",
            f"#SBATCH --time={a.hours}:00:00",
            *([f"#SBATCH --gpus-per-task={a.gpus}"] if a.gpus else []),
            *common,
            "#SBATCH --requeue",
            "#SBATCH --open-mode=append",
            f"#SBATCH --output={logs}/score-%A_%a.log",
            "set -euo pipefail",
            f"exec {argv}",
            "",
        ]
    )
    merge = "\n".join(
        [
            "#!/bin/bash",
            f"# medxray: merge the {a.shards} shards of {a.out} into results.csv once every array task succeeded.",
            "# Submit with --dependency=afterany:<array job id> (see score_array.sbatch). Idempotent; it refuses an",
            "# incomplete run and names the missing shards (requeue those tasks, then submit it again).",
            "#SBATCH --job-name=medxray-merge",
            "#SBATCH --ntasks=1",
            "#SBATCH --cpus-per-task=1",
            "#SBATCH --mem=2G",
            "#SBATCH --time=1:00:00",
            *common,
            "#SBATCH --open-mode=append",
            f"#SBATCH --output={logs}/merge-%j.log",
            "set -euo pipefail",
            f"exec {_q(a.command)} score-dicom --merge {_q(a.out)}",
            "",
        ]
    )
    return {"score_array.sbatch": score, "merge.sbatch": merge}


def _volumes(a: RecipeArgs) -> tuple[list[dict], list[dict]]:
    model_dir = a.checkpoint.rsplit("/", 1)[0] or "/"
    mounts = [{"name": "data", "mountPath": a.mount_path}, {"name": "models", "mountPath": model_dir, "readOnly": True}]
    volumes = [
        {"name": "data", "persistentVolumeClaim": {"claimName": a.data_claim}},
        {"name": "models", "persistentVolumeClaim": {"claimName": a.model_claim, "readOnly": True}},
    ]
    return mounts, volumes


_POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}
_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
_K8S_HEAD = (
    "# medxray: score {input_dir} in {shards} shards as a Kubernetes Indexed Job (issue 23).\n"
    "# Written by `medxray score-dicom --emit k8s`. Run:\n"
    "#   kubectl apply -f score-indexed-job.yaml\n"
    "#   kubectl wait --for=condition=complete job/medxray-score --timeout=24h\n"
    "#   kubectl apply -f merge-job.yaml\n"
    "# A failed index is retried (backoffLimitPerIndex) and resumes from its shard's journal.\n"
)
_K8S_MERGE_HEAD = (
    "# medxray: merge the shards once job/medxray-score is Complete (see score-indexed-job.yaml).\n"
    "# Idempotent; it refuses an incomplete run and names the missing shards.\n"
)


def _k8s_check_paths(a: RecipeArgs) -> None:
    """ConfigError unless INPUT_DIR and --out lie under the shared volume's ``mount_path``."""
    root = a.mount_path.rstrip("/") + "/"
    for name, value in (("INPUT_DIR", a.input_dir), ("--out", a.out)):
        if not str(value).startswith(root):
            raise ConfigError(
                f"{name} {value} is not under the shared volume's mount path {a.mount_path} "
                "(--k8s-mount); give paths as the pods see them"
            )


def _k8s_job(name: str, labels: dict, spec: dict, container: dict, mounts: list[dict], volumes: list[dict]) -> dict:
    """A batch/v1 Job manifest: ``spec`` plus a never-restarting non-root pod template running
    ``container`` with ``mounts`` of ``volumes`` (locked down: no privilege escalation, read-only
    root, no capabilities)."""
    pod = {
        "restartPolicy": "Never",
        "securityContext": dict(_POD_SECURITY),
        # keys in manifest order: the container's own, its security context, then its mounts
        "containers": [{**container, "securityContext": _CONTAINER_SECURITY, "volumeMounts": mounts}],
        "volumes": volumes,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {**spec, "template": {"metadata": {"labels": dict(labels)}, "spec": pod}},
    }


def _k8s_score_job(a: RecipeArgs, labels: dict) -> dict:
    """The Indexed Job: one completion index per shard, retried per index; preemption not counted,
    exit 2 (usage error, unusable checkpoint) not retried."""
    mounts, volumes = _volumes(a)
    res_req = {"cpu": str(a.cpus), "memory": f"{a.memory_gb}Gi"}
    res_lim = {"memory": f"{a.memory_gb}Gi", **({"nvidia.com/gpu": str(a.gpus)} if a.gpus else {})}
    if a.gpus:
        res_req["nvidia.com/gpu"] = str(a.gpus)
    spec = {
        "completionMode": "Indexed",
        "completions": a.shards,
        "parallelism": a.parallelism or a.shards,
        "backoffLimitPerIndex": a.max_retries,
        "podFailurePolicy": {
            "rules": [
                # preempted or evicted: retry without counting it against the index's limit
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                # exit 2 = a usage error or unusable checkpoint: retrying cannot help
                {"action": "FailIndex", "onExitCodes": {"containerName": "score", "operator": "In", "values": [2]}},
            ]
        },
    }
    container = {
        "name": "score",
        "image": a.image,
        "command": _score_argv(a, str(a.cpus), str(a.cpus)),
        # Kubernetes exports JOB_COMPLETION_INDEX but not completions
        "env": [
            {"name": SHARD_COUNT_ENV, "value": str(a.shards)},
            {"name": "MEDXRAY_CACHE_DIR", "value": "/tmp/medxray-cache"},
            {"name": "HOME", "value": "/tmp"},
        ],  # the root file system is read-only
        "resources": {"requests": res_req, "limits": res_lim},
    }
    mounts = [*mounts, {"name": "tmp", "mountPath": "/tmp"}]
    return _k8s_job("medxray-score", labels, spec, container, mounts, [*volumes, {"name": "tmp", "emptyDir": {}}])


def _k8s_merge_job(a: RecipeArgs, labels: dict) -> dict:
    """The merge Job (one pod, two retries) on the data volume only."""
    _, volumes = _volumes(a)
    merge_labels = {**labels, "app.kubernetes.io/component": "merge"}
    container = {
        "name": "merge",
        "image": a.image,
        "command": [a.command, "score-dicom", "--merge", a.out],
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}},
    }
    mounts = [{"name": "data", "mountPath": a.mount_path}]
    return _k8s_job(
        "medxray-merge", merge_labels, {"completions": 1, "backoffLimit": 2}, container, mounts, [volumes[0]]
    )


def render_k8s(a: RecipeArgs) -> dict[str, str]:
    """``score-indexed-job.yaml`` (batch/v1 Indexed Job, one completion index per shard, retried per index
    with ``backoffLimitPerIndex``, preemption not counted) and ``merge-job.yaml`` (run it once the
    first Job is Complete). INPUT and OUT must lie under ``mount_path`` (the shared ReadWriteMany volume)."""
    import yaml

    a.check()
    _k8s_check_paths(a)
    labels = {"app.kubernetes.io/name": "medxray", "app.kubernetes.io/component": "score"}

    def dump(d: dict) -> str:
        return yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=100)

    head = _K8S_HEAD.format(input_dir=a.input_dir, shards=a.shards)
    return {
        "score-indexed-job.yaml": head + dump(_k8s_score_job(a, labels)),
        "merge-job.yaml": _K8S_MERGE_HEAD + dump(_k8s_merge_job(a, labels)),
    }


def render_recipes(engine: str, a: RecipeArgs) -> dict[str, str]:
    """{file name: text} of the recipes for ``engine`` ("slurm" | "k8s"); ConfigError for bad arguments."""
    if engine == "slurm":
        return render_slurm(a)
    if engine in ("k8s", "kubernetes"):
        return render_k8s(a)
    raise ConfigError(f"--emit must be slurm or k8s, got {engine!r}")


def write_recipes(engine: str, a: RecipeArgs, folder: str | os.PathLike) -> list[Path]:
    """Write :func:`render_recipes` into ``folder`` (created); returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render_recipes(engine, a).items():
        p = folder / name
        p.write_text(text, encoding="utf-8")
        if name.endswith(".sbatch"):
            p.chmod(0o755)
        paths.append(p)
    return paths
