"""Scoring on a real SLURM cluster (issue 23 item 4): the recipes `score-dicom --emit slurm` writes, run
by slurmctld + slurmd + munged started for the test (tests/slurm_cluster.py).

An array of 4 tasks scores a generated archive; one task is killed mid-run with SIGKILL and requeued,
resuming from its journal; the merge job runs as an ``afterany`` dependency (``afterok`` on an array is
never satisfied once a task failed, even after its requeue succeeded: checked here too). Every file ends with exactly
one row, equal to a single-process run of the same checkpoint.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
from archive_helpers import make_archive
from slurm_cluster import SlurmCluster, missing_tools

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(missing_tools()),
        reason=f"SLURM not installed ({', '.join(missing_tools())}); `make system-deps` installs slurm-wlm and munge",
    ),
]

N_FILES = 160
SHARDS = 4
OPTS = ["--cams", "none", "--backend", "torch", "--precision", "fp32", "--batch-size", "4"]


def rows_of(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len({r["path"] for r in rows}), f"duplicate rows in {path}"
    return {r["path"]: r for r in rows}


def n_rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except OSError:
        return 0


def wait_for(what: str, ready, timeout: float, cluster: SlurmCluster, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{cluster.logs()}")
        time.sleep(poll)


def test_array_with_a_killed_and_requeued_task_then_dependent_merge(scoring_checkpoint, tmp_path):
    from medxray.cli import main
    from medxray.scoring import ScoreConfig, score_directory
    from medxray.scoring.discovery import in_shard

    src, out, jobs = tmp_path / "archive", tmp_path / "scored", tmp_path / "jobs"
    rels = make_archive(src, N_FILES)
    assert (
        main(
            [
                "score-dicom",
                str(src),
                "--checkpoint",
                str(scoring_checkpoint),
                "--out",
                str(out),
                "--emit",
                "slurm",
                "--shard-count",
                str(SHARDS),
                "--cpus-per-task",
                "1",
                "--mem-gb",
                "1",
                "--emit-dir",
                str(jobs),
                *OPTS,
            ]
        )
        == 0
    )
    (out / "logs").mkdir(parents=True)
    with SlurmCluster(tmp_path / "slurm", cpus=2) as cluster:
        array = cluster.run("sbatch", "--parsable", str(jobs / "score_array.sbatch")).stdout.strip().split(";")[0]
        merge = (
            cluster.run(
                "sbatch",
                "--parsable",
                f"--dependency=afterany:{array}",  # as the recipe says
                str(jobs / "merge.sbatch"),
            )
            .stdout.strip()
            .split(";")[0]
        )
        # why not afterok: it is never satisfied once a task of the array failed, requeued or not
        strict = (
            cluster.run(
                "sbatch",
                "--parsable",
                f"--dependency=afterok:{array}",
                "--wrap",
                "true",
                f"--output={tmp_path / 'strict.log'}",
            )
            .stdout.strip()
            .split(";")[0]
        )
        victim, shard = f"{array}_1", (2, SHARDS)  # array index 1 = shard 2/4
        journal = out / "results.shard-2-of-4.csv"
        in_victim = sum(in_shard(r, shard) for r in rels)
        wait_for("task 1 to write its first rows", lambda: n_rows(journal) >= 2, 240, cluster, poll=0.05)
        cluster.run("scancel", "--signal=KILL", victim)
        states = wait_for(
            "the killed task to end",
            lambda: (s := cluster.job_states(victim)).get(victim) not in ("RUNNING", "COMPLETING", None) and s,
            60,
            cluster,
        )
        assert states[victim] in ("FAILED", "CANCELLED"), states
        done_before = n_rows(journal)
        assert 0 < done_before < in_victim, "the task must be killed mid-run"
        cluster.run("scontrol", "requeue", victim)
        cluster.run("scontrol", "update", f"JobId={victim}", "StartTime=now")  # no requeue delay (BeginTime)
        wait_for(
            "the array and the merge job to finish",
            lambda: all(
                st in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                for st in {**cluster.job_states(array), **cluster.job_states(merge)}.values()
            ),
            420,
            cluster,
            poll=1,
        )
        states = {**cluster.job_states(array), **cluster.job_states(merge)}
        time.sleep(3)
        strict_reason = cluster.run("squeue", "-h", "-j", strict, "-o", "%T %r").stdout.split()
        logs = cluster.logs()
    assert strict_reason == ["PENDING", "DependencyNeverSatisfied"], strict_reason
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs}"
    assert len(states) == SHARDS + 1
    victim_log = (out / "logs" / f"score-{array}_1.log").read_text()
    assert f"resuming: {done_before} of {in_victim} files already have a row" in victim_log
    assert f"merged {SHARDS} shards: {N_FILES} rows" in (out / "logs" / f"merge-{merge}.log").read_text()

    merged = rows_of(out / "results.csv")
    assert sorted(merged) == sorted(rels)  # every file exactly once
    for k in range(1, SHARDS + 1):
        part = rows_of(out / f"results.shard-{k}-of-{SHARDS}.csv")
        assert sorted(part) == sorted(r for r in rels if in_shard(r, (k, SHARDS)))

    ref_out = tmp_path / "single"
    score_directory(
        ScoreConfig(
            src,
            scoring_checkpoint,
            ref_out,
            cams="none",
            backend="torch",
            precision="fp32",
            batch_size=4,
            workers=1,
            progress=False,
        )
    )
    ref = rows_of(ref_out / "results.csv")
    assert sorted(ref) == sorted(merged)
    probs = [c for c in next(iter(ref.values())) if c.startswith("p_")]
    assert probs
    for rel, row in ref.items():
        got = merged[rel]
        np.testing.assert_allclose([float(got[c]) for c in probs], [float(row[c]) for c in probs], atol=1.5e-4)
        assert {c: v for c, v in got.items() if not c.startswith("p_")} == {
            c: v for c, v in row.items() if not c.startswith("p_")
        }, rel


def test_two_task_ddp_finetune_under_srun_matches_torchrun(tmp_path):
    """pipelines/slurm/train_multinode.sbatch on the one-machine cluster: 2 srun tasks stand in for 2 nodes,
    each runs torchrun (c10d rendezvous on the first node, one process each, gloo on CPU); the weights equal
    a plain `torchrun --standalone --nproc-per-node 2` run of the same fine-tune (tests/test_train_ddp.py's)."""
    import json
    import os
    import subprocess
    import sys

    import torch
    from slurm_cluster import free_port

    from medxray.data.synthetic import synthesize

    root = synthesize(tmp_path / "phantom", n_images=90, seed=1, image_size=64, workers=1)
    args = (
        "--model densenet121 --pretrained none --image-size 32 --batch-size 8 --epochs 1 --precision fp32 "
        "--num-workers 0"
    )
    ref = tmp_path / "torchrun"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "medxray.cli",
        "-q",
        "finetune",
        "--data-root",
        str(root),
        "--out",
        str(ref),
        "--no-progress",
        *args.split(),
    ]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    recipe = (Path(__file__).resolve().parents[1] / "pipelines" / "slurm" / "train_multinode.sbatch").read_text()
    script = tmp_path / "train.sbatch"  # one machine, no GPUs: drop the GPU request, keep everything else
    script.write_text("\n".join(line for line in recipe.splitlines() if "--gpus-per-node" not in line) + "\n")
    out = tmp_path / "slurm-run"
    with SlurmCluster(tmp_path / "slurm", cpus=2) as cluster:
        env = {
            "DATA_ROOT": str(root),
            "OUT": str(out),
            "MEDXRAY_PYTHON": sys.executable,
            "FINETUNE_ARGS": args,
            "RDZV_PORT": str(free_port()),
        }
        job = cluster.run(
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            "--mem=1G",
            f"--output={tmp_path / 'train.log'}",
            f"--chdir={tmp_path}",
            "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items()),
            str(script),
        ).stdout.strip()
        wait_for(
            "the training job",
            lambda: cluster.job_states(job).get(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
            600,
            cluster,
            poll=1,
        )
        state = cluster.job_states(job)[job]
    log = (tmp_path / "train.log").read_text()
    assert state == "COMPLETED", log[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["world_size"] == 2  # rank 0 alone wrote, two processes trained
    from medxray.checkpoint import load_checkpoint

    sa, sb = load_checkpoint(out / "last.pt").state_dict, load_checkpoint(ref / "last.pt").state_dict
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            # parameters: the averaged gradient of two ranks is the same sum whichever agent became rank 0
            # (bit-identical here); BatchNorm running statistics are rank 0's, which under the c10d
            # rendezvous may be the other half of each step's batch (they were identical when measured)
            tol = 0.0 if "running" not in k else 0.25
            torch.testing.assert_close(sa[k], sb[k], atol=tol, rtol=0, msg=k)
