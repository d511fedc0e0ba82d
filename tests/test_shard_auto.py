"""`score-dicom --shard auto` under SLURM arrays / Kubernetes Indexed Jobs, the per-shard lock across
processes, and `score-dicom --merge OUT` as its own step (issue 23 items 1-2)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from archive_helpers import make_archive

from medxray.errors import ConfigError
from medxray.scoring import ScoreConfig, score_directory
from medxray.scoring.discovery import in_shard
from medxray.scoring.run import merge_run
from medxray.scoring.scheduler import resolve_shard, shard_from_env

FAST = dict(backend="torch", precision="fp32", batch_size=8, workers=1, progress=False, cams="none")
MEDXRAY = [sys.executable, "-m", "medxray.cli"]


def slurm_env(task: int, lo: int, hi: int, step: int = 1) -> dict[str, str]:
    return {
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_MIN": str(lo),
        "SLURM_ARRAY_TASK_MAX": str(hi),
        "SLURM_ARRAY_TASK_STEP": str(step),
        "SLURM_ARRAY_TASK_COUNT": str((hi - lo) // step + 1),
        "SLURM_ARRAY_JOB_ID": "1234",
        "SLURM_JOB_ID": "1240",
    }


def test_shard_from_slurm_array_env():
    # --array=0-3, --array=1-4 and --array=0-6:2 all number the tasks as shards 1..4 of 4
    assert [shard_from_env(slurm_env(t, 0, 3)) for t in range(4)] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [shard_from_env(slurm_env(t, 1, 4)) for t in range(1, 5)] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [shard_from_env(slurm_env(t, 0, 6, 2)) for t in (0, 2, 4, 6)] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # Slurm before 21.08 exports no _MAX/_STEP for some arrays: the count and the minimum are enough
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert shard_from_env(env) == (3, 4)
    # a list with gaps (--array=1,2,7: count 3, max 7) cannot be numbered 1..3 by arithmetic
    with pytest.raises(ConfigError, match="evenly stepped"):
        shard_from_env({**slurm_env(7, 1, 7), "SLURM_ARRAY_TASK_COUNT": "3"})
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_COUNT"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "2"})
    with pytest.raises(ConfigError, match="not an integer"):
        shard_from_env({**slurm_env(1, 0, 3), "SLURM_ARRAY_TASK_ID": "x"})
    with pytest.raises(ConfigError, match="disagrees"):
        shard_from_env(slurm_env(1, 0, 3), count=8)


def test_shard_from_kubernetes_indexed_job_env():
    assert shard_from_env({"JOB_COMPLETION_INDEX": "0", "MEDXRAY_SHARD_COUNT": "5"}) == (1, 5)
    assert shard_from_env({"JOB_COMPLETION_INDEX": "4", "MEDXRAY_SHARD_COUNT": "5"}) == (5, 5)
    assert shard_from_env({"JOB_COMPLETION_INDEX": "2"}, count=3) == (3, 3)  # --shard-count
    assert shard_from_env({"JOB_COMPLETION_INDEX": "2", "MEDXRAY_SHARD_COUNT": "9"}, count=3) == (3, 3)
    with pytest.raises(ConfigError, match="MEDXRAY_SHARD_COUNT"):
        shard_from_env({"JOB_COMPLETION_INDEX": "2"})  # Kubernetes does not export completions
    with pytest.raises(ConfigError, match="outside 0..2"):
        shard_from_env({"JOB_COMPLETION_INDEX": "3", "MEDXRAY_SHARD_COUNT": "3"})


def test_explicit_shard_wins_and_no_scheduler_is_an_error():
    env = slurm_env(3, 0, 3)
    assert resolve_shard("2/8", env) == (2, 8)
    assert resolve_shard("auto", env) == (4, 4) and resolve_shard(" AUTO ", env) == (4, 4)
    assert resolve_shard(None, env) is None
    with pytest.raises(ConfigError, match="no scheduler shard.*--shard K/N"):
        resolve_shard("auto", {"PATH": "/usr/bin"})


def test_cli_shard_auto_reads_the_array_env_and_refuses_without_one(scoring_checkpoint, tmp_path, monkeypatch, capsys):
    from medxray.cli import main

    src, out = tmp_path / "in", tmp_path / "o"
    make_archive(src, 12)
    base = [
        "score-dicom",
        str(src),
        "--checkpoint",
        str(scoring_checkpoint),
        "--out",
        str(out),
        "--cams",
        "none",
        "--workers",
        "1",
        "--backend",
        "torch",
        "--precision",
        "fp32",
        "--no-progress",
        "--shard",
        "auto",
    ]
    for k in list(os.environ):
        if k.startswith(("SLURM_", "JOB_COMPLETION", "MEDXRAY_SHARD")):
            monkeypatch.delenv(k)
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "no scheduler shard" in err and "Traceback" not in err
    for task in (1, 2):  # an --array=1-2 job; the second task's finish merges
        for k, v in slurm_env(task, 1, 2).items():
            monkeypatch.setenv(k, v)
        assert main(base) == 0
    assert "all shards finished: merged" in capsys.readouterr().out
    rows = read_rows(out / "results.csv")
    assert sorted(rows) == sorted(str(p.relative_to(src)) for p in src.rglob("*.dcm"))
    assert {r for r in read_rows(out / "results.shard-2-of-2.csv")} == {r for r in rows if in_shard(r, (2, 2))}
    assert json.loads((out / "run.shard-1-of-2.json").read_text())["shard"] == [1, 2]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # explicit K/N wins over the array's variables
    assert main([*base[:-1], "2/2"]) == 0
    assert "scored 0 now" in capsys.readouterr().out


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len({r["path"] for r in rows}), f"duplicate rows in {path}"
    return {r["path"]: r for r in rows}


def test_files_added_between_task_starts(scoring_checkpoint, tmp_path):
    """Shard membership hashes the relative path, so files added while an array runs never move old
    files between shards: a new file is scored iff its shard lists the folder after it appeared; the
    merge reports the others and which shards to re-run, and re-running them (a resume) completes the run."""
    src, out = tmp_path / "in", tmp_path / "out"
    old = make_archive(src, 40)
    s1 = score_directory(ScoreConfig(src, scoring_checkpoint, out, shard="1/2", **FAST))
    new = make_archive(src, 20, start=1000)  # arrive after task 1 listed the folder, before task 2 starts
    s2 = score_directory(ScoreConfig(src, scoring_checkpoint, out, shard="2/2", **FAST))
    assert s1.total == sum(in_shard(r, (1, 2)) for r in old)
    assert s2.total == sum(in_shard(r, (2, 2)) for r in old + new)
    late = [r for r in new if in_shard(r, (1, 2))]
    assert late and len(late) < len(new), "the generated names must land in both shards"
    m = merge_run(out)
    assert (m.rows, m.unlisted, m.rerun_shards) == (len(old) + len(new) - len(late), len(late), (1,))
    assert set(read_rows(out / "results.csv")) == set(old) | (set(new) - set(late))
    s1b = score_directory(ScoreConfig(src, scoring_checkpoint, out, shard="1/2", **FAST))
    assert (s1b.scored, s1b.skipped) == (len(late), s1.total)  # resumes: only the late files are scored
    m = merge_run(out)
    assert (m.rows, m.unlisted) == (len(old) + len(new), 0)
    assert set(read_rows(out / "results.csv")) == set(old) | set(new)


def test_merge_is_its_own_idempotent_step_and_refuses_incomplete_runs(scoring_checkpoint, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    make_archive(src, 24)
    score_directory(ScoreConfig(src, scoring_checkpoint, out, shard="2/3", **FAST))
    cli = [*MEDXRAY, "score-dicom", "--merge", str(out)]
    r = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "missing shard(s) 1/3 (never started), 3/3 (never started)" in r.stderr
    assert not (out / "results.csv").exists()
    # a shard that was killed: its run record says not complete
    score_directory(ScoreConfig(src, scoring_checkpoint, out, shard="1/3", **FAST))
    state = json.loads((out / "run.shard-1-of-3.json").read_text())
    (out / "run.shard-1-of-3.json").write_text(json.dumps({**state, "complete": False}))
    with pytest.raises(ConfigError, match=r"1/3 \(not finished: killed or failed\), 3/3 \(never started\)"):
        merge_run(out)
    score_directory(ScoreConfig(src, scoring_checkpoint, out, shard="1/3", **FAST))  # the requeued task resumes
    s3 = score_directory(ScoreConfig(src, scoring_checkpoint, out, shard="3/3", **FAST))
    assert s3.merged  # the last shard to finish merges too; the explicit step must agree with it
    first = (out / "results.csv").read_bytes()
    (out / "results.csv").unlink()
    for _ in range(2):
        r = subprocess.run(cli, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "merged 3 shards: 24 rows" in r.stdout
        assert (out / "results.csv").read_bytes() == first
    # a shard run with other arguments is refused, not mixed in
    state = json.loads((out / "run.shard-2-of-3.json").read_text())
    (out / "run.shard-2-of-3.json").write_text(json.dumps({**state, "cams": "all"}))
    with pytest.raises(ConfigError, match=r"shard 2/3 was run with different arguments.*cams"):
        merge_run(out)


@pytest.mark.slow
def test_second_process_on_a_shard_refuses_or_waits(scoring_checkpoint, tmp_path, capsys):
    """Two real scorer processes on one shard (a requeue while the old task is still dying): the second
    refuses with a message, or with --lock-wait waits for the first and then finds its work done."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_archive(src, 16)
    base = [
        *MEDXRAY,
        "score-dicom",
        str(src),
        "--checkpoint",
        str(scoring_checkpoint),
        "--out",
        str(out),
        "--cams",
        "none",
        "--workers",
        "1",
        "--backend",
        "torch",
        "--precision",
        "fp32",
        "--no-progress",
        "--shard",
        "1/2",
    ]
    first = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "run.shard-1-of-2.json").exists():  # written right after the lock is taken
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        os.killpg(first.pid, signal.SIGSTOP)  # hold it there, lock and all (like a task stuck dying)
        assert first.poll() is None
        from medxray.cli import main

        assert main(base[3:]) == 2  # this test's process is the second scorer
        err = capsys.readouterr().err
        assert "another scorer is already writing" in err and "--lock-wait" in err and "Traceback" not in err
        log = tmp_path / "waiter.err"
        with open(log, "w") as err:
            waiter = subprocess.Popen([*base, "--lock-wait", "120"], stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.monotonic() + 90
        while "waiting up to 120 s" not in log.read_text():
            assert waiter.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(1)
        assert waiter.poll() is None, "the waiter must wait while the first holds the lock"
        os.killpg(first.pid, signal.SIGCONT)
        out1, err1 = first.communicate(timeout=180)
        assert first.returncode == 0, err1
        out2, _ = waiter.communicate(timeout=180)
        assert waiter.returncode == 0, log.read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    n1 = sum(in_shard(str(p.relative_to(src)), (1, 2)) for p in src.rglob("*.dcm"))
    assert f"scored 0 now ({n1} already done)" in out2  # the second found every row written: no duplicates
    rows = read_rows(out / "results.shard-1-of-2.csv")
    assert len(rows) == n1


# ---- recipes (issue 23 item 3) ----------------------------------------------------------------

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def test_shipped_recipes_are_what_emit_writes():
    """pipelines/slurm and pipelines/k8s are `--emit` output for EXAMPLE_RECIPE: one definition, kept in step."""
    from medxray.scoring.scheduler import EXAMPLE_RECIPE, render_recipes

    for engine, folder in (("slurm", "slurm"), ("k8s", "k8s")):
        for name, text in render_recipes(engine, EXAMPLE_RECIPE).items():
            assert (PIPELINES / folder / name).read_text() == text, f"regenerate pipelines/{folder}/{name}"
    for script in (PIPELINES / "slurm").glob("*.sbatch"):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, (script.name, r.stderr)


def test_emitted_kubernetes_manifests_validate_against_the_schema(tmp_path):
    """The Kubernetes 1.37 OpenAPI schema, strict (unknown fields refused), offline via kubernetes-validate."""
    import yaml

    kv = pytest.importorskip("kubernetes_validate", reason="dev extra: kubernetes-validate")
    from medxray.cli import main

    assert (
        main(
            [
                "score-dicom",
                "/data/in",
                "--checkpoint",
                "/models/m.pt",
                "--out",
                "/data/out",
                "--emit",
                "k8s",
                "--shard-count",
                "8",
                "--cpus-per-task",
                "6",
                "--mem-gb",
                "12",
                "--gpus-per-task",
                "1",
                "--sr",
                "--cams",
                "none",
                "--emit-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    score = yaml.safe_load((tmp_path / "score-indexed-job.yaml").read_text())
    merge = yaml.safe_load((tmp_path / "merge-job.yaml").read_text())
    for doc in (score, merge):
        kv.validate(doc, "1.37.0", strict=True)
    spec = score["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 8, 8)
    assert spec["backoffLimitPerIndex"] == 3 and spec["template"]["spec"]["restartPolicy"] == "Never"
    c = spec["template"]["spec"]["containers"][0]
    assert c["command"][:2] == ["medxray", "score-dicom"] and "--sr" in c["command"]
    assert c["command"][c["command"].index("--shard") + 1] == "auto"
    assert {"name": "MEDXRAY_SHARD_COUNT", "value": "8"} in c["env"]  # Kubernetes does not export completions
    assert c["resources"]["requests"] == {"cpu": "6", "memory": "12Gi", "nvidia.com/gpu": "1"}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"].get("readOnly") is True and not mounts["/data"].get("readOnly")
    claims = {v["name"]: v.get("persistentVolumeClaim", {}) for v in spec["template"]["spec"]["volumes"]}
    assert claims["models"].get("readOnly") is True
    assert merge["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "medxray",
        "score-dicom",
        "--merge",
        "/data/out",
    ]
    # the validator is not vacuous: a misspelt or mistyped field is refused
    bad = json.loads(json.dumps(score))
    bad["spec"]["backoffLimitPerIndx"] = 3
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.37.0", strict=True)
    bad = json.loads(json.dumps(score))
    bad["spec"]["completions"] = "eight"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.37.0", strict=True)


def test_emit_refuses_what_a_recipe_cannot_express(tmp_path, capsys):
    from medxray.cli import main

    base = [
        "score-dicom",
        "/data/in",
        "--checkpoint",
        "/models/m.pt",
        "--out",
        "/data/out",
        "--emit-dir",
        str(tmp_path),
    ]
    assert main([*base, "--emit", "slurm"]) == 2
    assert "--shard-count" in capsys.readouterr().err
    assert main(["score-dicom", "/elsewhere/in", *base[2:], "--emit", "k8s", "--shard-count", "2"]) == 2
    assert "not under the shared volume" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert main([*base, "--emit", "slurm", "--shard-count", "3", "--partition", "gpu", "--gpus-per-task", "1"]) == 0
    text = (tmp_path / "score_array.sbatch").read_text()
    assert "#SBATCH --array=0-2" in text and "#SBATCH --partition=gpu" in text and "--gpus-per-task=1" in text
    assert "--shard auto" in text and "--dependency=afterany" in text
