"""Gradient maps on a busy CPU: several single-threaded streams instead of one multi-threaded one.

Why: the scorer's decode and overlay workers share the cores with inference. An OpenMP
parallel region waits at its barrier for its slowest thread, so when one of torch's intra-op
threads is preempted by a worker the others spin: measured on this project's 2-core CPU, the
default map (``layercam-denseblock1``, bf16) took 0.46-0.89 s per map with 2 intra-op threads
beside other work, and 0.08-0.15 s per map as 2 streams of 1 thread each on the same images
(identical maps: images in eval mode do not interact). Each stream is a thread of this
process whose own intra-op thread count is 1; torch releases the GIL inside its kernels, so the
streams run on separate cores. The split balances (image, class) pairs, not images.

:class:`MapStreams` changes nothing about the maps: every stream calls
:meth:`medxray.inference.Predictor.maps_tensor` (THE map definition,
:func:`medxray.cam.compute_maps`) on a contiguous slice of the batch. On a GPU, or with one
stream, it is a plain call (on the CPU with an ``idle`` callback, one stream thread, so the
caller can work while it computes).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

    from medxray.inference import Predictor

log = logging.getLogger(__name__)


@contextmanager
def one_intraop_thread() -> Iterator[None]:
    """Torch ops in the calling thread run on that thread only, for the ``with`` block; the
    previous count is restored after. For one image's map (the app): measured on a quiet 2-core
    CPU, 0.19-0.21 s per map with 1 or 2 intra-op threads alike, and beside other work 0.6-0.9 s
    with 1 thread against 9-17 s with 2 (the barrier stall described above)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _one_thread() -> None:
    """Stream thread initialiser: this thread's torch ops run on this thread only."""
    import torch

    torch.set_num_threads(1)


def balanced_slices(pairs_per_image: Sequence[int], streams: int) -> list[slice]:
    """Contiguous slices of the images, at most ``streams`` of them, each with about the same
    number of (image, class) pairs. Empty slices are dropped; ``[]`` for no images.

    >>> balanced_slices([2, 2, 2, 2], 2)
    [slice(0, 2, None), slice(2, 4, None)]
    """
    n = len(pairs_per_image)
    if n == 0:
        return []
    k = max(1, min(int(streams), n))
    cum = np.cumsum(np.asarray(pairs_per_image, dtype=np.int64))
    total = int(cum[-1])
    cuts = [0]
    for s in range(1, k):
        # first image whose cumulative pair count reaches s/k of the total, after the last cut
        at = int(np.searchsorted(cum, total * s / k, side="left")) + 1
        cuts.append(min(max(at, cuts[-1] + 1), n - (k - s)))
    cuts.append(n)
    return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


class MapStreams:
    """Runs :meth:`Predictor.maps_tensor` for a batch over ``streams`` single-threaded streams.

    ``streams``: how many (>= 1); 1 (or a non-CPU predictor) means one plain call in the
    caller's thread with the caller's thread settings. :meth:`close` stops the threads.
    """

    def __init__(self, streams: int) -> None:
        self.streams = max(1, int(streams))
        self._pool: ThreadPoolExecutor | None = None

    def maps(
        self,
        predictor: Predictor,
        x: torch.Tensor,
        classes: Sequence[int],
        method: str,
        wanted: np.ndarray,
        idle: Callable[[Sequence[Future]], None] | None = None,
    ) -> np.ndarray:
        """Maps (N, K, S, S) float32 in [0, 1] for the batch ``x`` (N, 3, S, S), the K
        ``classes``, only the (image, class) pairs ``wanted`` (N, K) bool marks (the others
        all 0): exactly what ``predictor.maps_tensor(x, classes, method, wanted=wanted)``
        returns. Raises what that raises (ConfigError for an unknown method or class).

        ``idle``: called on the calling thread, repeatedly, while the streams compute (with their
        futures, to wait on beside the caller's own): the scorer collects finished decode and
        overlay jobs and feeds its workers there, so a batch's seconds of maps do not hold back
        the rows finished meanwhile or leave the workers without files. It must return soon
        after one of the futures completes."""
        slices = balanced_slices(wanted.sum(axis=1).tolist(), self.streams)
        on_cpu = str(getattr(predictor, "device", "cpu")) == "cpu"
        if not on_cpu or (len(slices) <= 1 and idle is None):
            return predictor.maps_tensor(x, list(classes), method=method, wanted=wanted)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="medxray-maps", initializer=_one_thread)
        futs = [
            self._pool.submit(predictor.maps_tensor, x[s], list(classes), method=method, wanted=wanted[s])
            for s in slices
        ]
        if idle is not None:
            while not all(f.done() for f in futs):
                idle(futs)
        return np.concatenate([f.result() for f in futs])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
