"""Benchmark: one training step of our DenseNet-121 vs torchvision's, and memory-efficient vs plain.

Speed: forward + backward + SGD step on the same fp32 batch (default bs 16, 224x224, CPU),
alternating ours and torchvision's for several rounds so background load hits both alike; the
median images/s of each and their ratio are printed (target: ours >= 1.0x torchvision).

Memory: each mode runs in its own process (bs 32 by default) and reports the peak resident
memory the training step added on top of the loaded model (target: memory-efficient <= 0.6x plain).

    python bench/model_step.py [--batch 16] [--size 224] [--rounds 5] [--mem-batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torchvision

from medxray.models import create_model


def _build(kind: str) -> torch.nn.Module:
    if kind == "torchvision":
        return torchvision.models.densenet121(weights=None)
    return create_model("densenet121", memory_efficient=(kind == "efficient"))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mem_child(kind: str, batch: int, size: int) -> None:
    torch.manual_seed(0)
    model = _build(kind).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    _step(model, opt, x[:2], y[:2])  # allocate optimizer state and warm up kernels
    opt.zero_grad(set_to_none=False)
    before = _rss_bytes()
    _step(model, opt, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"kind": kind, "before": before, "peak": peak}))


def _measure_memory(kind: str, batch: int, size: int) -> dict:
    # A fixed mmap threshold makes glibc return every large tensor to the OS when it is freed, so
    # the process's peak RSS is the peak of live tensors rather than of allocator fragmentation.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, __file__, "--mem-child", kind, "--mem-batch", str(batch), "--size", str(size)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mem-batch", type=int, default=32)
    ap.add_argument("--mem-child", choices=["plain", "efficient", "torchvision"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_child:
        _mem_child(args.mem_child, args.mem_batch, args.size)
        return

    # Memory first, each mode in a fresh process, before this process has trained anything:
    # peak RSS read after a large training step in the parent came out inflated and unsteady.
    mem = {k: _measure_memory(k, args.mem_batch, args.size) for k in ("plain", "efficient", "torchvision")}
    for k, m in mem.items():
        print(
            f"peak memory {k:<12} step adds {(m['peak'] - m['before']) / 2**20:8.0f} MiB "
            f"(process peak {m['peak'] / 2**20:6.0f} MiB), bs {args.mem_batch}"
        )
    added = {k: max(1, m["peak"] - m["before"]) for k, m in mem.items()}
    print(f"memory ratio efficient / plain = {added['efficient'] / added['plain']:.3f}  (target <= 0.6)")
    print(f"memory ratio plain / torchvision = {added['plain'] / added['torchvision']:.3f}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32, "
        f"densenet121 bs {args.batch} {args.size}x{args.size}"
    )
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    runs = {}
    for kind in ("ours", "torchvision"):
        model = _build("plain" if kind == "ours" else kind).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        _step(model, opt, x, y)  # warm-up
        runs[kind] = (model, opt, [], [])
    for _ in range(args.rounds):
        for model, opt, wall, cpu in runs.values():
            w0, c0 = time.perf_counter(), time.process_time()
            _step(model, opt, x, y)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    speed = {k: args.batch / statistics.median(r[2]) for k, r in runs.items()}
    # CPU seconds per image: steadier than wall time when other processes share the cores.
    cpu_speed = {k: args.batch / statistics.median(r[3]) for k, r in runs.items()}
    for k in runs:
        print(f"train step  {k:<12}{speed[k]:7.2f} img/s wall, {cpu_speed[k]:7.2f} img per CPU-second")
    print(
        f"speed ratio ours / torchvision = {speed['ours'] / speed['torchvision']:.3f} wall, "
        f"{cpu_speed['ours'] / cpu_speed['torchvision']:.3f} CPU time  (target >= 1.0)"
    )


if __name__ == "__main__":
    main()
