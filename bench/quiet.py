"""The benches' quiet-machine rule: judge the machine, not the bench (issue 21 "Targets").

The 1-minute load average read at a bench's end counts the bench's own work, so every run used
to flag itself. Instead, before each timed phase, :func:`sample` reads ``/proc/loadavg`` and the
CPU time (utime + stime, ``/proc/PID/stat``) that processes OUTSIDE the bench's own process
tree spent during a short window. A phase is busy when those other processes used more than
:data:`OTHERS_MAX_PER_CORE` of the machine during the window. (The load average is printed, not
judged: it decays over a minute and still carries the bench's previous phase.) Linux only;
elsewhere the phase is reported as "not judged".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

OTHERS_MAX_PER_CORE = 0.10  # other processes' CPU, as a share of all cores, above which a phase is busy


@dataclass(frozen=True)
class Sample:
    """Machine state just before a timed phase: 1-minute load average, the CPU (cores) that
    processes outside the bench used over ``window_s`` seconds, and the busiest of them."""

    phase: str
    load1: float
    others_cores: float
    window_s: float
    top: str
    cores: int

    @property
    def busy(self) -> bool | None:
        if self.others_cores < 0:
            return None
        return self.others_cores > OTHERS_MAX_PER_CORE * self.cores

    def line(self) -> str:
        if self.busy is None:
            return f"[{self.phase}] load {self.load1:.2f}; other processes not judged (no /proc)"
        verdict = "BUSY" if self.busy else "quiet"
        return (
            f"[{self.phase}] load {self.load1:.2f} on {self.cores} CPUs; other processes used "
            f"{self.others_cores:.2f} cores over {self.window_s:.1f} s ({verdict}; limit "
            f"{OTHERS_MAX_PER_CORE * self.cores:.2f}){'; busiest: ' + self.top if self.top else ''}"
        )


def _stats() -> dict[int, tuple[int, int, str]]:
    """{pid: (ppid, utime + stime in clock ticks, command name)} of every readable process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as fh:
                raw = fh.read().decode("ascii", "replace")
        except OSError:
            continue
        name = raw[raw.find("(") + 1 : raw.rfind(")")]
        f = raw[raw.rfind(")") + 2 :].split()
        out[int(d)] = (int(f[1]), int(f[11]) + int(f[12]), name)
    return out


def _own_tree(stats: dict[int, tuple[int, int, str]], root: int) -> set[int]:
    mine = {root}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in stats.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    return mine


def sample(phase: str, window_s: float = 2.0) -> Sample:
    """Measure the machine for ``window_s`` seconds before ``phase`` (see the module docstring)."""
    cores = os.cpu_count() or 1
    load1 = os.getloadavg()[0]
    if not os.path.isdir("/proc/self"):
        return Sample(phase, load1, -1.0, 0.0, "", cores)
    tick = os.sysconf("SC_CLK_TCK")
    a = _stats()
    t0 = time.perf_counter()
    time.sleep(window_s)
    b = _stats()
    dt = time.perf_counter() - t0
    mine = _own_tree(b, os.getpid()) | _own_tree(a, os.getpid())
    used = {pid: (b[pid][1] - a[pid][1]) / tick for pid in b if pid in a and pid not in mine}
    others = sum(max(0.0, v) for v in used.values()) / dt
    top = sorted(used.items(), key=lambda kv: -kv[1])[:3]
    top_s = ", ".join(f"{b[pid][2]} {v / dt:.2f}" for pid, v in top if v > 0)
    return Sample(phase, load1, others, dt, top_s, cores)


def verdict(samples: list[Sample]) -> str:
    """One line: were all phases quiet?"""
    judged = [s for s in samples if s.busy is not None]
    if not judged:
        return "machine not judged (no /proc)"
    busy = [s.phase for s in judged if s.busy]
    return (
        "quiet before every timed phase"
        if not busy
        else f"UNRELIABLE: other processes were busy before {', '.join(busy)}"
    )
