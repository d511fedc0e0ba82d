"""A real one-machine SLURM cluster for tests: munged + slurmctld + slurmd, all under one folder.

Debian's ``slurm-wlm`` and ``munge`` packages (``make system-deps``). Everything is private to the
folder: munged with its own key and socket (slurm finds it through ``AuthInfo=socket=...``), slurmctld
and slurmd on free loopback ports, state and spool under the folder, no cgroups
(``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``). The client commands find the
cluster through ``$SLURM_CONF`` (:meth:`SlurmCluster.env`). :meth:`SlurmCluster.stop` ends every daemon.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


def find_daemon(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def missing_tools() -> list[str]:
    return [n for n in (*DAEMONS, "sbatch", "scontrol", "scancel", "squeue", "sacct") if not find_daemon(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """``with SlurmCluster(folder, cpus) as c: c.run("sbatch", ...)``; raises RuntimeError with the
    daemons' log tails when the cluster does not come up."""

    def __init__(self, folder: Path, cpus: int = 2):
        self.dir = Path(folder)
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self.socket = self.dir / "munge" / "munge.socket"

    # ---- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def start(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(d / sub, 0o711 if sub == "munge" else 0o700)  # the socket's folder: execute for all
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn(
            "munged",
            [
                find_daemon("munged"),
                "--foreground",
                "--force",
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--pid-file={d / 'munge' / 'munged.pid'}",
                f"--seed-file={d / 'munge' / 'munged.seed'}",
                f"--log-file={d / 'log' / 'munged.log'}",
            ],
        )
        self._wait(lambda: self.socket.exists(), "munged socket")
        ctld_port, slurmd_port = free_port(), free_port()
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=medxraytest",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.socket}",
                    f"StateSaveLocation={d / 'state'}",
                    f"SlurmdSpoolDir={d / 'spool'}",
                    f"SlurmctldPidFile={d / 'slurmctld.pid'}",
                    f"SlurmdPidFile={d / 'slurmd.pid'}",
                    f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    f"JobCompLoc={d / 'log' / 'jobcomp.log'}",
                    "MpiDefault=none",
                    "SwitchType=switch/none",
                    "SchedulerType=sched/backfill",
                    "SchedulerParameters=sched_interval=2",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    "MinJobAge=600",
                    "KillWait=5",
                    "InactiveLimit=0",
                    "SlurmctldTimeout=30",
                    "SlurmdTimeout=30",
                    "MessageTimeout=20",
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4096 State=UNKNOWN",
                    f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
                    "",
                ]
            )
        )
        env = self.env()
        self._spawn("slurmctld", [find_daemon("slurmctld"), "-D", "-i", "-f", str(self.conf)], env)
        self._wait(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, "slurmctld")
        self._spawn("slurmd", [find_daemon("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], env)
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T", check=False).stdout, "slurmd (node idle)")

    def _spawn(self, name: str, argv: list, env: dict | None = None) -> None:
        log = open(self.dir / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(
            [str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, env=env or self.env(), start_new_session=True
        )
        log.close()

    def _wait(self, ready, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what} did not come up ({'exited: ' + ', '.join(dead) if dead else 'timeout'})\n{self.logs()}"
                )
            time.sleep(0.3)

    def logs(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what is left, then end slurmd, slurmctld and munged (TERM, then KILL)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False, timeout=15)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    # ---- clients --------------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [find_daemon(argv[0]) or argv[0], *argv[1:]],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}\n{self.logs()}")
        return r

    def job_states(self, job: str) -> dict[str, str]:
        """{job id (array tasks as JOBID_K): state} as slurmctld reports them (pending and finished too)."""
        r = self.run("scontrol", "show", "job", "-o", job, check=False)
        states = {}
        for line in r.stdout.splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            key = f.get("JobId", "")
            if f.get("ArrayTaskId"):
                key = f"{f.get('ArrayJobId')}_{f['ArrayTaskId']}"
            states[key] = f.get("JobState", "")
        return states
