"""Where the time goes in OpenVINO's bf16 and int8 DenseNet-121 graphs (issue 21: why int8 is not 1.8x).

    python bench/int8_layers.py              # 224 px, batch 16, 2 threads
    python bench/int8_layers.py --batch 4

Compiles the bench checkpoint's OpenVINO graph twice on the CPU exactly as the Predictor does
(:func:`medxray.backends.openvino.compile_config`: one single-threaded stream per thread): bf16 and
the NNCF int8 graph (:func:`medxray.quantize.quantize_model`, f32 for the layers it leaves in
float), both with per-layer performance counters, runs the same batch through each, split over
the streams (interleaved, best of ``--reps``), and prints each graph's time by
operation type (Convolution, the BatchNorm-as-multiply-add and ReLU eltwise nodes, Concat,
pooling, reorders), the share of convolutions, and the int8 / bf16 ratio per type. Amdahl's law
then says what int8 can reach: ``total_bf16 / (conv_bf16 / s + rest_bf16)`` for a convolution
speed-up ``s``. DenseNet's pre-activation blocks (concat -> BN -> ReLU -> conv) keep BN and ReLU
on the wide concatenated tensors outside any convolution, where int8 does not help.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from quiet import sample, verdict  # noqa: E402
from score_dicom import make_checkpoint  # noqa: E402


def by_type(reqs) -> tuple[dict[str, float], float]:
    """Milliseconds per node type (OpenVINO's profiling info of the last inference, summed over the
    streams' requests: core-milliseconds) and the total."""
    out: dict[str, float] = defaultdict(float)
    for req in reqs:
        for info in req.profiling_info:
            if info.status.name == "EXECUTED":
                out[info.node_type] += info.real_time.total_seconds() * 1000.0
    return dict(out), sum(out.values())


def run(reqs, x, reps: int) -> tuple[float, dict[str, float], float]:
    """Best wall time (ms) of ``reps`` batches and the per-type split of that best run."""
    from medxray.backends.openvino import run_on_streams

    best, split, tot = float("inf"), {}, 0.0
    for _ in range(reps):
        t = time.perf_counter()
        run_on_streams(reqs, x)
        wall = (time.perf_counter() - t) * 1000.0
        if wall < best:
            best = wall
            split, tot = by_type(reqs)
    return best, split, tot


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as exc:
        print(f"int8_layers: skipped, the openvino extra is not installed ({exc}); pip install -e '.[openvino]'")
        return 0
    from medxray.backends.openvino import compile_config, run_on_streams
    from medxray.hardware import openvino_core
    from medxray.inference import Predictor
    from medxray.quantize import quantize_model

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "bench.pt", a.image_size)
        ref = Predictor.from_checkpoint(ckpt, device="cpu", backend="openvino", precision="fp32", batch_size=a.batch)
        fp32 = ref.openvino_fp32_model()
    s = a.image_size
    calib = np.random.default_rng(0).standard_normal((32, 3, s, s)).astype(np.float32)
    graphs = {"bf16": fp32, "int8": quantize_model(fp32, calib)}
    core = openvino_core()
    reqs = {}
    for name, graph in graphs.items():
        config, streams = compile_config(name, a.threads)
        compiled = core.compile_model(graph, "CPU", {**config, "PERF_COUNT": True})
        reqs[name] = [compiled.create_infer_request() for _ in range(streams)]
    x = np.random.default_rng(1).standard_normal((a.batch, 3, s, s)).astype(np.float32)
    for r in reqs.values():
        run_on_streams(r, x)
    samples = [sample("layers")]
    res: dict[str, list] = {k: [float("inf"), {}, 0.0] for k in reqs}
    for _ in range(3):  # interleaved rounds; the best of each kept
        for k, r in reqs.items():
            best, split, tot = run(r, x, a.reps)
            if best < res[k][0]:
                res[k] = [best, split, tot]
    types = sorted(set(res["bf16"][1]) | set(res["int8"][1]), key=lambda t: -res["bf16"][1].get(t, 0.0))
    print(
        f"batch {a.batch} at {s} px, {a.threads} single-threaded streams; node time summed over graph and streams (ms)"
    )
    print(f"{'node type':22s} {'bf16':>9s} {'int8':>9s} {'int8/bf16':>9s}")
    for t in types:
        b, i = res["bf16"][1].get(t, 0.0), res["int8"][1].get(t, 0.0)
        if max(b, i) < 0.005 * res["bf16"][2]:
            continue
        print(f"{t:22s} {b:9.1f} {i:9.1f} {i / b if b else float('nan'):9.2f}")
    (wb, sb, tb), (wi, si, ti) = res["bf16"], res["int8"]
    conv_b, conv_i = sb.get("Convolution", 0.0), si.get("Convolution", 0.0)
    print(f"{'sum of nodes':22s} {tb:9.1f} {ti:9.1f} {ti / tb:9.2f}")
    print(f"wall per batch: bf16 {wb:.1f} ms, int8 {wi:.1f} ms: int8 {wb / wi:.2f}x bf16")
    print(
        f"convolutions: {100 * conv_b / tb:.0f}% of bf16's node time, {100 * conv_i / ti:.0f}% of int8's; "
        f"int8 convolutions {conv_b / max(conv_i, 1e-9):.2f}x faster; everything else "
        f"{(tb - conv_b) / max(ti - conv_i, 1e-9):.2f}x"
    )
    for sp in (2.0, 4.0, float("inf")):
        bound = tb / (conv_b / sp + (tb - conv_b))
        print(f"Amdahl: with convolutions {sp:g}x faster and the rest as in bf16, int8 <= {bound:.2f}x bf16")
    print(verdict(samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
