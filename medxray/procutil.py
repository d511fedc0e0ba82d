"""Worker processes that die with their parent: :func:`exit_with_parent`.

A worker process (the scorer's decode pool, a training DataLoader worker, the cache builder's
pool, the DICOM node's engine) that outlives a ``kill -9`` of its parent is re-parented to
PID 1 and blocks forever, holding its memory. Each worker calls :func:`exit_with_parent` once,
at start-up (a pool initializer or a ``worker_init_fn``):

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` through :mod:`ctypes` (``man 2 PR_SET_PDEATHSIG``),
  so the kernel kills the worker the moment its parent dies, even while it is busy in C code.
  The kernel ties the signal to the *thread* that created the worker: create pools from a
  thread that outlives them (medxray creates and shuts down every pool in the same call).
- Elsewhere, or when ``prctl`` is unavailable: a daemon watchdog thread that polls
  :func:`os.getppid` and calls :func:`os._exit` once the parent has gone.

Both first check that the parent is still the expected one, so a parent that died before the
worker got this far is noticed too. The ``multiprocessing`` resource tracker needs no call: it
exits when the last process holding its pipe (the parent and the workers) is gone.

Must not import any other medxray module, nor torch, numpy or MONAI at module level: every worker
imports it first.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHAN_EXIT_CODE = 70  # os._exit status of a watchdog exit (EX_SOFTWARE): the parent is gone

# pid -> mechanism armed in that process (a forked child inherits this dict but not the kernel's
# setting, which fork clears, so it is keyed by pid)
_armed: dict[int, str] = {}


def expected_parent_pid() -> int:
    """The PID of the process that started this one: ``multiprocessing``'s record when this is a
    multiprocessing child (that survives a race with the parent's death), else :func:`os.getppid`."""
    import multiprocessing as mp

    parent = mp.parent_process()
    return int(parent.pid) if parent is not None and parent.pid else os.getppid()


def exit_with_parent(parent_pid: int | None = None, *, poll_s: float = 1.0) -> str:
    """Make this process exit when its parent process dies; returns the mechanism used.

    ``parent_pid``: the parent to follow (default :func:`expected_parent_pid`). ``poll_s``: the
    watchdog's polling interval in seconds (fallback only). Returns ``"pdeathsig"`` (Linux
    kernel signal), ``"watchdog"`` (polling thread) or the mechanism armed by an earlier call.
    If the parent is already gone, the process exits at once (``os._exit``, no clean-up: a
    worker holds nothing its parent has not journalled). Never raises.
    """
    if os.getpid() in _armed:
        return _armed[os.getpid()]
    parent = int(parent_pid) if parent_pid else expected_parent_pid()
    if _set_pdeathsig(signal.SIGKILL):
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(ORPHAN_EXIT_CODE)
        how = "pdeathsig"
    else:
        start_watchdog(parent, poll_s=poll_s)
        how = "watchdog"
    _armed[os.getpid()] = how
    log.debug("process %d exits with its parent %d (%s)", os.getpid(), parent, how)
    return how


def _set_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False where there is no Linux prctl."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc symbol (musl static builds, sandboxes)
        return False


def _watch(parent: int, poll_s: float) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(ORPHAN_EXIT_CODE)
        time.sleep(poll_s)


def start_watchdog(parent_pid: int | None = None, *, poll_s: float = 1.0) -> threading.Thread:
    """The portable fallback on its own: a daemon thread that exits the process once its parent
    is gone (polling :func:`os.getppid` every ``poll_s`` seconds). For tests and platforms
    without ``prctl``; :func:`exit_with_parent` chooses it by itself where needed."""
    parent = int(parent_pid) if parent_pid else expected_parent_pid()
    if os.getppid() != parent:
        os._exit(ORPHAN_EXIT_CODE)
    t = threading.Thread(target=_watch, args=(parent, float(poll_s)), name="medxray-parent-watchdog", daemon=True)
    t.start()
    return t


def dataloader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` for training/evaluation DataLoaders: MONAI's per-worker seeding of the
    random transforms (what MONAI's DataLoader does by default), then :func:`exit_with_parent`."""
    from monai.data.utils import worker_init_fn

    worker_init_fn(worker_id)
    exit_with_parent()
