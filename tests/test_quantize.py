"""int8 post-training quantisation behind the accuracy gate, on a small random model and real NIH
chest images from the shared sample (as a partial download): the gate's arithmetic, and one
OpenVINO Core per process. The gate's accept and reject paths on a trained model are
tests/test_quantize_gate.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from conftest import make_test_checkpoint, nih_sample_pngs  # noqa: E402

from medxray.inference import Predictor  # noqa: E402
from medxray.quantize import accuracy_gate, quantize_predictor  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def real_inputs():
    from medxray.data.imageio import read_image

    files = nih_sample_pngs()[:96]
    imgs = []
    for f in files:
        arr = np.asarray(read_image(f)[0])
        imgs.append(arr.astype(np.float32) / float(np.iinfo(arr.dtype).max))
    return imgs


def _predictor(tmp_path, seed: int, precision: str = "fp32") -> Predictor:
    ckpt = make_test_checkpoint(
        tmp_path / f"m{seed}.pt", architecture="densenet_bc_100_k12", image_size=SIZE, seed=seed
    )
    p = Predictor.from_checkpoint(ckpt, device="cpu", backend="openvino", precision=precision, batch_size=16)
    assert p.backend == "openvino"
    return p


def _split(p: Predictor, imgs):
    """Calibration, validation (+ labels), check. A random-init network barely tells one chest film
    from another, so the validation set also holds inverted and darkened films: its fp32 outputs
    then spread well beyond int8 noise, and labels split at the median are ones fp32 ranks well."""
    x = p.preprocess(imgs).numpy()
    val_imgs = imgs[32:80] + [1.0 - a for a in imgs[32:56]] + [0.4 * a for a in imgs[56:80]]
    val = p.preprocess(val_imgs).numpy()
    probs = p.predict_tensor(p.preprocess(val_imgs))
    y = (probs > np.median(probs, axis=0)).astype(np.int64)
    return x[:32], val, y, x[80:96]


def test_gate_logic():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(200, 2))
    ref = np.clip(y * 0.3 + rng.random((200, 2)) * 0.7, 0, 1).astype(np.float32)
    ok = accuracy_gate(["a", "b"], ref, ref + 1e-4, y, ref[:10], ref[:10] + 0.01)
    assert ok.passed
    shuffled = ref.copy()
    shuffled[:, 0] = rng.permutation(shuffled[:, 0])
    assert not accuracy_gate(["a", "b"], ref, shuffled, y, ref[:10], ref[:10]).passed
    assert not accuracy_gate(["a", "b"], ref, ref, y, ref[:10], ref[:10] + 0.03).passed
    one_class = np.zeros_like(y)
    assert not accuracy_gate(["a", "b"], ref, ref, one_class, ref[:10], ref[:10]).passed


def _alternate_stack_is_mapped() -> bool:
    """Whether this thread's signal alternate stack (if any) lies in mapped memory (Linux)."""
    import ctypes

    class StackT(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    cur = StackT()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(cur)) == 0
    if cur.ss_flags & 2 or not cur.ss_sp:  # SS_DISABLE: no alternate stack
        return True
    with open("/proc/self/maps") as fh:
        spans = [[int(v, 16) for v in line.split()[0].split("-")] for line in fh]
    return any(lo <= cur.ss_sp and cur.ss_sp + cur.ss_size <= hi for lo, hi in spans)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")
def test_openvino_leaves_signal_handling_intact(tmp_path, real_inputs):
    """Two OpenVINO Cores destroyed out of order left the main thread's sigaltstack pointing at freed
    memory, and the next Python-handled signal (here SIGCHLD) killed the whole process with SIGSEGV.
    medxray keeps one Core per process (medxray.hardware.openvino_core)."""
    import gc
    import signal
    import subprocess
    import sys

    p = _predictor(tmp_path, seed=2)
    calib, val, y, check = _split(p, real_inputs)
    quantize_predictor(p, calib, val, y, check)
    q = _predictor(tmp_path, seed=2, precision="auto")
    q.predict(real_inputs[:4])
    del p, q
    gc.collect()
    assert _alternate_stack_is_mapped()
    # and a Python-handled signal really arrives on this thread (with a dangling stack: SIGSEGV here)
    before = signal.getsignal(signal.SIGCHLD)
    hits = []
    signal.signal(signal.SIGCHLD, lambda s, f: hits.append(s))
    try:
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    finally:
        signal.signal(signal.SIGCHLD, before)
    assert hits
