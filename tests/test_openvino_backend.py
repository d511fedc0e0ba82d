"""medxray.backends: the OpenVINO backend (IR cache by weight hash, per-thread infer requests) and
the eager torch backend give the Predictor the same logits and feature maps; the Predictor trusts
a recorded fp32 comparison and falls back to torch fp32 when it says the backend disagrees.

A small DenseNet (densenet_40_k12, 64 px, 14 findings) converted once per module (conversion
traces the whole graph: the slow part; the file takes 20 s on a quiet 2-core CPU, 55 s under
load); inputs are the real RG1 chest radiograph of pydicom-data
and a flipped, noisier copy.
"""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from conftest import make_test_checkpoint  # noqa: E402

from medxray.backends import OpenVINOBackend, TorchBackend, openvino_cache_dir  # noqa: E402
from medxray.backends.openvino import load_or_convert, weights_key  # noqa: E402
from medxray.checkpoint import model_from_checkpoint  # noqa: E402
from medxray.inference import PROB_TOLERANCE, Predictor, preprocess  # noqa: E402
from medxray.models import create_model  # noqa: E402

ARCH, SIZE = "densenet_40_k12", 64


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    from pydicom.data import get_testdata_file

    from medxray.dicom import read_dicom

    rg1 = read_dicom(get_testdata_file("RG1_UNCR.dcm")).pixels
    rng = np.random.default_rng(7)
    noisy = np.clip(rg1[:, ::-1] + 0.05 * rng.standard_normal(rg1.shape).astype(np.float32), 0, 1)
    return torch.stack([preprocess(rg1, SIZE), preprocess(noisy, SIZE)])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("ov-backend-cache")
    mp.setenv("MEDXRAY_CACHE_DIR", str(root))
    yield root / "openvino"
    mp.undo()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cache):
    return make_test_checkpoint(tmp_path_factory.mktemp("ckpt") / "d40.pt", architecture=ARCH, image_size=SIZE)


@pytest.fixture(scope="module")
def model(checkpoint) -> torch.nn.Module:
    return model_from_checkpoint(checkpoint).eval()


@pytest.fixture(scope="module")
def ov(model, cache) -> OpenVINOBackend:
    """Converted once here; the Predictor test below finds these weights in the IR cache."""
    return OpenVINOBackend(model, architecture=ARCH, image_size=SIZE, precision="fp32")


def test_openvino_and_torch_backends_give_the_same_logits_and_features(model, ov, batch):
    eager = TorchBackend(model, torch.device("cpu"), "fp32")
    assert (eager.name, eager.precision, ov.name, ov.precision) == ("torch", "fp32", "openvino", "fp32")
    lg_ref, ft_ref = eager.infer(batch, want_features=True)
    lg, ft = ov.infer(batch, want_features=True)
    assert lg_ref.shape == lg.shape == (2, 14) and lg.dtype == np.float32
    assert ft is not None and ft_ref is not None and ft.shape == ft_ref.shape and ft.ndim == 4
    np.testing.assert_allclose(lg, lg_ref, atol=1e-3)
    np.testing.assert_allclose(ft, ft_ref, atol=1e-3)
    assert ov.infer(batch, want_features=False)[1] is None and eager.infer(batch, False)[1] is None
    with torch.no_grad():  # the backends' logits are the model's own forward pass
        np.testing.assert_allclose(model(batch).numpy(), lg_ref, atol=1e-5)
    assert ov.int8_note == ""  # int8 not asked for


def test_ir_cache_is_named_by_the_weights_and_survives_a_damaged_entry(model, ov, cache, monkeypatch):
    import openvino

    key = ov.key
    xml = cache / f"{key}.xml"
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert not list(cache.glob(".ov-*")), "the temporary conversion folder is removed"

    real_convert = openvino.convert_model
    calls: list[int] = []

    def counting_convert(*a, **k):
        calls.append(1)
        return real_convert(*a, **k)

    monkeypatch.setattr(openvino, "convert_model", counting_convert)
    assert load_or_convert(model, ARCH, SIZE)[1] == key and not calls, "read from the cache"
    # the key follows every weight and the input size
    other = create_model(ARCH, num_classes=14)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.classifier.bias[0] += 1e-3
    assert weights_key(other, ARCH, SIZE, openvino.__version__) != key
    assert weights_key(model, ARCH, SIZE + 32, openvino.__version__) != key
    assert weights_key(model, ARCH, SIZE, openvino.__version__) == key
    # a damaged entry is converted again and rewritten whole
    xml.write_text("<not an IR", encoding="utf-8")
    ov_model, again = load_or_convert(model, ARCH, SIZE)
    assert again == key and len(calls) == 1
    assert xml.read_text(encoding="utf-8").startswith("<?xml")
    assert [o.get_partial_shape().rank.get_length() for o in ov_model.outputs] == [2, 4]


def test_cache_off_records_nothing(model, ov, monkeypatch):
    assert ov.verification_record() == openvino_cache_dir() / f"{ov.key}.fp32.{_flags()}.verified.json"
    monkeypatch.setenv("MEDXRAY_CACHE_DIR", "off")
    assert openvino_cache_dir() is None
    assert ov.verification_record() is None
    assert TorchBackend(model, torch.device("cpu"), "fp32").verification_record() is None


def test_each_thread_gets_its_own_infer_request(ov, batch):
    serial = [ov.infer(batch[i : i + 1], True) for i in range(2)]
    requests: dict[int, list[object]] = {}
    results: dict[int, list[tuple]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(t: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                requests.setdefault(t, []).append(ov._requests()[0])
                results.setdefault(t, []).append(ov.infer(batch[t % 2 : t % 2 + 1], True))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert not errors
    per_thread = [set(map(id, reqs)) for reqs in requests.values()]
    assert all(len(s) == 1 for s in per_thread), "a thread reuses its request"
    assert len(set.union(*per_thread)) == 4, "no two threads share a request"
    for t, outs in results.items():
        for lg, ft in outs:
            np.testing.assert_array_equal(lg, serial[t % 2][0])
            np.testing.assert_array_equal(ft, serial[t % 2][1])


def test_predictor_trusts_the_recorded_comparison_and_falls_back_on_it(checkpoint, ov, cache, caplog):
    ckpt = checkpoint
    p = Predictor.from_checkpoint(ckpt, device="cpu", backend="openvino", precision="fp32")
    assert (p.backend, p.precision, p.weights_key) == ("openvino", "fp32", ov.key)
    records = list(cache.glob(f"{p.weights_key}.fp32.*.verified.json"))
    assert len(records) == 1, "the fp32 comparison is recorded next to the IR"
    measured = json.loads(records[0].read_text(encoding="utf-8"))["max_abs_prob_diff"]
    assert measured == p.verified_max_diff < PROB_TOLERANCE
    # a record saying this backend disagrees is believed without measuring again
    records[0].write_text(json.dumps({"max_abs_prob_diff": 0.5}), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="medxray.inference"):
        q = Predictor.from_checkpoint(ckpt, device="cpu", backend="openvino", precision="fp32")
    assert (q.backend, q.precision, q.weights_key, q.verified_max_diff) == ("torch", "fp32", None, 0.5)
    assert "falling back to torch fp32" in caplog.text
    images = [b[0].numpy() * 0.2 + 0.5 for b in torch.rand(2, 1, 80, 72)]
    np.testing.assert_allclose(q.predict(images), p.predict(images), atol=1e-3)


def _flags() -> str:
    from medxray.hardware import cpu_has_native_bf16

    return "bf16native" if cpu_has_native_bf16() else "nobf16"


def test_int8_is_used_only_behind_a_passed_gate_record(model, ov, cache):
    """No record: fp32 with the reason; a refused record: fp32 with the recorded reason."""
    asked = OpenVINOBackend(model, architecture=ARCH, image_size=SIZE, precision="fp32", want_int8=True)
    assert asked.precision == "fp32" and "no int8 model for these weights" in asked.int8_note
    record = cache / f"{ov.key}.int8.json"
    record.write_text(json.dumps({"passed": False, "reason": "AUROC of Mass moved by 0.0100"}), encoding="utf-8")
    try:
        refused = OpenVINOBackend(model, architecture=ARCH, image_size=SIZE, precision="fp32", want_int8=True)
    finally:
        record.unlink()
    assert refused.precision == "fp32"
    assert refused.int8_note == "int8 refused at conversion: AUROC of Mass moved by 0.0100"


def test_a_model_openvino_cannot_convert_runs_on_torch(checkpoint, tmp_path, monkeypatch, caplog):
    import openvino

    def unconvertible(*a, **k):
        raise RuntimeError("Model wasn't fully converted: aten::something_new\nmore detail")

    monkeypatch.setenv("MEDXRAY_CACHE_DIR", str(tmp_path / "empty-cache"))  # nothing cached to read
    monkeypatch.setattr(openvino, "convert_model", unconvertible)
    with caplog.at_level(logging.WARNING, logger="medxray.inference"):
        p = Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino", precision="fp32")
    assert (p.backend, p.precision, p.weights_key, p.int8_note) == ("torch", "fp32", None, "")
    assert "OpenVINO backend unavailable (RuntimeError: Model wasn't fully converted" in caplog.text
    assert "more detail" not in caplog.text, "one line of the reason"
    assert p.predict([np.full((70, 60), 0.4, np.float32)]).shape == (1, 14)


def test_streams_split_a_batch_and_give_the_one_stream_numbers(model, ov, batch):
    """With ``num_threads`` the backend compiles that many one-thread streams and splits each
    batch over them (the scorer's setting); the numbers are the latency-stream ones, in order."""
    three = OpenVINOBackend(model, architecture=ARCH, image_size=SIZE, precision="fp32", num_threads=3)
    assert (three.streams, ov.streams) == (3, 1)
    x = torch.cat([batch, batch.flip(0), batch[:1]])  # 5 images: parts of 2, 2 and 1
    lg_ref, ft_ref = ov.infer(x, want_features=True)
    lg, ft = three.infer(x, want_features=True)
    assert ft is not None and ft_ref is not None
    np.testing.assert_allclose(lg, lg_ref, atol=1e-4)
    np.testing.assert_allclose(ft, ft_ref, atol=1e-4)
    assert not np.allclose(lg[0], lg[1])  # different images stay in their own rows
    one, none = three.infer(x[:1], want_features=False)
    np.testing.assert_allclose(one, lg_ref[:1], atol=1e-4)
    assert none is None


def test_a_cached_model_scores_without_building_the_torch_module(checkpoint, ov, cache, batch):
    """A converted, verified model starts from the IR and the compiled-graph cache: the torch
    module (~0.1-0.3 s of a scorer's start) is built only when something needs it (gradient maps)."""
    for record in cache.glob(f"{ov.key}.fp32.*.verified.json"):  # another test may have forged it
        record.unlink()
    first = Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino", precision="fp32")
    assert first._model is not None, "the first start compares with fp32 eager: that needs the module"
    p = Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino", precision="fp32")
    assert (p.backend, p.weights_key, p.verified_max_diff) == ("openvino", ov.key, first.verified_max_diff)
    assert p._model is None, "probabilities from a cached IR need no torch module"
    probs = p.predict_tensor(batch)
    assert probs.shape == (2, 14) and p._model is None
    assert list((cache / "compiled" / ov.key).iterdir()), "the compiled graph is cached beside the IR"
    res = p.run(batch, maps=[0], method="gradcam-denseblock3")
    assert p._model is not None, "gradient maps build the module"
    assert res.maps is not None and res.maps.shape[:2] == (2, 1) and res.map_classes == (0,)
    np.testing.assert_allclose(res.probabilities, probs, atol=1e-3)
    # the same weights as a module give the same key as the state dict the lazy path hashed
    import openvino

    assert weights_key(p.model, ARCH, SIZE, openvino.__version__) == ov.key
    # weights stored as float64 are not hashed as stored: the module is built (float32), and its
    # key is the float32 weights' key, so the cached IR serves it
    from medxray.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    ck.state_dict = {k: v.double() if v.is_floating_point() else v for k, v in ck.state_dict.items()}
    q = Predictor.from_checkpoint(ck, device="cpu", backend="openvino", precision="fp32")
    assert q._model is not None and (q.backend, q.weights_key) == ("openvino", ov.key)


def test_the_cache_keeps_the_most_recently_used_models(tmp_path):
    """Disk bound: every file and compiled folder of the models beyond CACHE_MODELS most recently
    used is deleted, and so are conversion leftovers older than an hour; nothing else is touched."""
    import os
    import time

    from medxray.backends.openvino import prune_cache

    cache = tmp_path / "openvino"
    (cache / "compiled").mkdir(parents=True)
    now = time.time()
    keys = [f"{i:032x}" for i in range(6)]
    for age, k in enumerate(reversed(keys)):  # keys[-1] newest ... keys[0] oldest
        for name in (f"{k}.xml", f"{k}.bin", f"{k}.int8.xml", f"{k}.fp32.nobf16.verified.json"):
            (cache / name).write_text("x", encoding="utf-8")
        (cache / "compiled" / k).mkdir()
        (cache / "compiled" / k / "123.blob").write_bytes(b"b")
        os.utime(cache / f"{k}.xml", (now - 100 * (age + 1), now - 100 * (age + 1)))
    stale, fresh = cache / ".ov-stale", cache / ".ov-fresh"
    stale.mkdir(), fresh.mkdir()
    os.utime(stale, (now - 7200, now - 7200))
    (cache / "notes.txt").write_text("not ours", encoding="utf-8")
    dropped = prune_cache(cache, keys[0], keep=3)  # the oldest is used now: it stays
    assert sorted(dropped) == sorted(keys[1:4])
    for k in keys[1:4]:
        assert not list(cache.glob(f"{k}*")) and not (cache / "compiled" / k).exists()
    for k in (keys[0], keys[4], keys[5]):
        assert len(list(cache.glob(f"{k}*"))) == 4 and (cache / "compiled" / k / "123.blob").is_file()
    assert not stale.exists() and fresh.is_dir() and (cache / "notes.txt").is_file()
    assert prune_cache(cache, keys[0], keep=3) == [], "within the bound nothing more goes"
