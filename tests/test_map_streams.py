"""The scorer's gradient maps as several single-threaded streams (medxray.scoring.mapstreams):
the same maps as one call, pairs balanced over the streams, and the threads really single-threaded."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from medxray.inference import Predictor
from medxray.scoring.mapstreams import MapStreams, balanced_slices


def test_slices_balance_pairs_not_images():
    assert balanced_slices([2, 2, 2, 2], 2) == [slice(0, 2), slice(2, 4)]
    # one image holds most of the pairs: it gets a stream to itself
    assert balanced_slices([1, 1, 1, 9], 2) == [slice(0, 3), slice(3, 4)]
    assert balanced_slices([5, 1, 1, 1], 2) == [slice(0, 1), slice(1, 4)]
    # more streams than images: one image per stream, no empty slice
    assert balanced_slices([1, 3], 4) == [slice(0, 1), slice(1, 2)]
    assert balanced_slices([], 3) == []
    for counts in ([3, 1, 4, 1, 5, 9, 2, 6], [1] * 7, [14, 1, 1]):
        for k in (1, 2, 3):
            sl = balanced_slices(counts, k)
            assert sl[0].start == 0 and sl[-1].stop == len(counts)
            assert all(a.stop == b.start for a, b in zip(sl[:-1], sl[1:]))
            assert len(sl) == min(k, len(counts))


@pytest.fixture(scope="module")
def predictor(scoring_checkpoint):
    return Predictor.from_checkpoint(scoring_checkpoint, device="cpu", backend="torch", precision="bf16")


def test_streams_give_the_maps_of_one_call(predictor):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 3, 64, 64, generator=g)
    x = (x - 0.5) / 0.25
    classes = [0, 4, 7]
    wanted = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=bool)
    ref = predictor.maps_tensor(x, classes, method="layercam-denseblock1", wanted=wanted)
    streams = MapStreams(2)
    seen: list[int] = []
    orig = predictor.maps_tensor

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        assert threading.current_thread().name.startswith("medxray-maps")
        return orig(*a, **k)

    predictor.maps_tensor = spy  # type: ignore[method-assign]
    try:
        got = streams.maps(predictor, x, classes, "layercam-denseblock1", wanted)
    finally:
        del predictor.maps_tensor
        streams.close()
    assert seen == [1, 1]  # two streams, each on one intra-op thread
    assert got.shape == ref.shape == (5, 3, 64, 64)
    assert float(np.abs(got - ref).max()) == 0.0
    assert not got[~wanted].any()  # unwanted pairs stay 0
    assert got[wanted].max() == pytest.approx(1.0)


def test_one_stream_is_a_plain_call(predictor):
    x = torch.zeros(2, 3, 64, 64)
    wanted = np.ones((2, 1), dtype=bool)
    streams = MapStreams(1)
    out = streams.maps(predictor, x, [2], "cam", wanted)
    assert out.shape == (2, 1, 64, 64)
    assert streams._pool is None  # no thread was started


def test_the_caller_works_while_the_streams_compute(predictor):
    """``idle`` runs on the calling thread until every stream is done (the scorer writes the rows
    of finished overlay jobs there); the maps are those of one call, with one stream or two."""
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(3, 3, 64, 64, generator=g) - 0.5) / 0.25
    wanted = np.array([[1, 1], [0, 1], [1, 0]], dtype=bool)
    ref = predictor.maps_tensor(x, [1, 3], method="layercam-denseblock1", wanted=wanted)
    caller = threading.current_thread()
    for k in (1, 2):
        calls: list[int] = []

        def idle(futures, calls=calls):
            assert threading.current_thread() is caller and futures
            calls.append(1)
            for f in futures:  # returns once a stream is done, as the scorer's callback does
                f.result()

        streams = MapStreams(k)
        try:
            got = streams.maps(predictor, x, [1, 3], "layercam-denseblock1", wanted, idle=idle)
        finally:
            streams.close()
        assert calls, f"{k} stream(s): the caller was called back while the maps computed"
        assert float(np.abs(got - ref).max()) == 0.0


def test_one_intraop_thread_for_a_block_then_the_old_count():
    from medxray.scoring.mapstreams import one_intraop_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_intraop_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_intraop_thread():
            raise RuntimeError("a failing map")
        assert torch.get_num_threads() == 2  # restored on the way out of an error too
    finally:
        torch.set_num_threads(before)
