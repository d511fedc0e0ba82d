"""Scoring throughput on a real one-machine SLURM cluster: 1, 2 and 4 array tasks over the same files.

Not a test: prints, per task count, the wall time from `sbatch` of the array to the end of its merge job,
images/s, the slowest task's own scoring time, and the merge job's time; plus the load average (other
work on the machine skews every number). Uses the recipes `score-dicom --emit slurm` writes.

    python bench/slurm_scaling.py [N_FILES]
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from archive_helpers import make_archive  # noqa: E402
from conftest import make_test_checkpoint  # noqa: E402
from slurm_cluster import SlurmCluster, missing_tools  # noqa: E402


def main() -> int:
    from medxray.cli import main as medxray

    if missing_tools():
        print(f"SLURM not installed ({', '.join(missing_tools())}): make system-deps")
        return 1
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 240
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "archive"
        make_archive(src, n)
        ckpt = make_test_checkpoint(tmp / "m.pt")
        with SlurmCluster(tmp / "slurm", cpus=cpus) as cluster:
            for shards in (1, 2, 4):
                out, jobs = tmp / f"out{shards}", tmp / f"jobs{shards}"
                medxray(
                    [
                        "-q",
                        "score-dicom",
                        str(src),
                        "--checkpoint",
                        str(ckpt),
                        "--out",
                        str(out),
                        "--emit",
                        "slurm",
                        "--shard-count",
                        str(shards),
                        "--cpus-per-task",
                        "1",
                        "--mem-gb",
                        "1",
                        "--emit-dir",
                        str(jobs),
                        "--cams",
                        "none",
                        "--backend",
                        "torch",
                        "--precision",
                        "fp32",
                        "--batch-size",
                        "8",
                    ]
                )
                (out / "logs").mkdir(parents=True)
                load0 = os.getloadavg()[0]
                t0 = time.monotonic()
                array = cluster.run("sbatch", "--parsable", str(jobs / "score_array.sbatch")).stdout.strip()
                merge = cluster.run(
                    "sbatch", "--parsable", f"--dependency=afterany:{array}", str(jobs / "merge.sbatch")
                ).stdout.strip()
                while cluster.job_states(merge).get(merge) not in ("COMPLETED", "FAILED", "CANCELLED"):
                    time.sleep(0.5)
                wall = time.monotonic() - t0
                task_s = []
                for log in (out / "logs").glob("score-*.log"):
                    m = re.search(r"in ([0-9.]+) s = ", log.read_text())
                    task_s.append(float(m.group(1)) if m else float("nan"))
                state = cluster.job_states(merge).get(merge)
                print(
                    f"{shards} task(s) on {cpus} CPUs, {n} files: {wall:.1f} s sbatch->merged = "
                    f"{n / wall:.2f} images/s; "
                    f"slowest task scored in {max(task_s):.1f} s; merge job {state}; "
                    f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
