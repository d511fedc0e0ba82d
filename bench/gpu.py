"""The GPU check: one script, under 5 minutes on one GPU, for the day a GPU is lent.

What it measures, each against its peer in the same process:

1. Training step (model only), 224 px, batch ``--batch-size``: medxray's in-repo DenseNet-121 through
   ``medxray.training.steps.train_step`` (bf16 autocast, channels_last, fused Adam; also under
   ``torch.compile``) against ``torchvision.models.densenet121`` with the same autocast and layout
   (the fair peer) and in plain fp32 (the textbook peer). Steps interleaved ours/peer; images/s from the
   median step (a GPU is not shared the way this project's CPUs are).
2. Fine-tuning end to end: ``medxray.training.loop.finetune`` on a phantom synthesised here, from the
   preprocessed cache, for a fixed number of steps: images/s of the whole loop beside the model-only
   figure, so a data pipeline that starves the GPU shows as the gap between the two.
3. Scoring: ``Predictor`` images/s on preprocessed batches without maps and with the checkpoint's
   default gradient maps for every finding the model calls positive (maps per image printed).
4. The CUDA-marked tests (``pytest -m gpu``).

Anchors for scale (published, not measured here): timm's DenseNet-121 AMP training 914 img/s with
channels_last on an RTX 3090; an H100/H200 should exceed 2,500 img/s.

    .venv/bin/python bench/gpu.py                       # on a GPU machine
    .venv/bin/python bench/gpu.py --device cpu --quick  # a dry run of the script itself on a CPU

Prints one line per figure and a ``RESULT`` summary; exits 1 when no CUDA device is present (unless
``--device cpu``), 2 when a CUDA test fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def _interleave(
    fns: dict[str, Callable[[], None]], steps: int, warmup: int, sync: Callable[[], None]
) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin after warm-up."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            times[k].append(_timed(fn, sync))
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_figures(
    device: torch.device, batch: int, size: int, steps: int, compile_model: bool
) -> dict[str, float]:
    """Images/s of one optimiser step for ours (eager and compiled) and torchvision's densenet121."""
    import torchvision

    from medxray.hardware import autocast, resolve_precision
    from medxray.models import create_model
    from medxray.training.config import TrainConfig
    from medxray.training.steps import make_optimizer, train_step

    precision = resolve_precision("auto", device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = (torch.rand(batch, 14, generator=g) < 0.2).float().to(device)
    m = torch.ones_like(y)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def ours_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        return lambda: train_step(model, x, y, m, opt, scaler, device=device, precision=precision, channels_last=True)

    torch.manual_seed(0)
    ours = create_model("densenet121", num_classes=14).to(device).to(memory_format=torch.channels_last).train()
    fns: dict[str, Callable[[], None]] = {"ours": ours_step(ours, make_optimizer(ours, TrainConfig(), device))}
    if compile_model:
        comp = create_model("densenet121", num_classes=14).to(device).to(memory_format=torch.channels_last).train()
        opt_c = make_optimizer(comp, TrainConfig(), device)
        fns["ours+compile"] = ours_step(torch.compile(comp), opt_c)  # type: ignore[arg-type]

    loss_fn = torch.nn.BCEWithLogitsLoss()

    def peer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, amp: bool) -> Callable[[], None]:
        xin = x.contiguous(memory_format=torch.channels_last) if amp else x

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            if amp:
                with autocast(device, precision):
                    loss = loss_fn(model(xin).float(), y)
            else:
                loss = loss_fn(model(xin), y)
            loss.backward()
            opt.step()

        return step

    tv_amp = torchvision.models.densenet121(num_classes=14).to(device).to(memory_format=torch.channels_last).train()
    fns["torchvision amp+cl"] = peer_step(tv_amp, torch.optim.Adam(tv_amp.parameters(), lr=1e-3), True)
    tv_fp32 = torchvision.models.densenet121(num_classes=14).to(device).train()
    fns["torchvision fp32"] = peer_step(tv_fp32, torch.optim.Adam(tv_fp32.parameters(), lr=1e-3), False)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    med = _interleave(fns, steps, warmup=3 if compile_model else 2, sync=sync)
    return {k: batch / v for k, v in med.items()}


def finetune_figure(device: torch.device, root: Path, batch: int, size: int, steps: int) -> tuple[float, Path]:
    """Images/s of ``finetune`` end to end (data loading included) for ``steps`` steps, and its checkpoint."""
    from medxray.training.config import make_config
    from medxray.training.loop import finetune

    cfg = make_config(
        dataset="chestxray14",
        data_root=str(root),
        pretrained="none",
        image_size=size,
        epochs=1,
        batch_size=batch,
        max_steps_per_epoch=steps,
        device=str(device),
        early_stopping_patience=0,
        scheduler="none",
        progress=False,
        out=str(root.parent / "run"),
    )
    t = time.perf_counter()
    res = finetune(cfg)
    elapsed = time.perf_counter() - t
    return steps * batch / elapsed, res.best_checkpoint


def scoring_figures(device: torch.device, ckpt: Path, batch: int, size: int, reps: int) -> dict[str, float]:
    """Scorer images/s without maps and with the default maps of the positive findings."""
    import numpy as np

    from medxray.inference import Predictor

    pred = Predictor.from_checkpoint(ckpt, device=str(device))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, generator=g)
    probs = pred.predict_tensor(x)
    thr = np.asarray([pred.thresholds[n] for n in pred.label_names])
    positive = sorted({int(j) for j in np.nonzero(probs >= thr)[1]}) or [int(np.argmax(probs.max(0)))]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    med = _interleave(
        {
            "no maps": lambda: pred.predict_tensor(x),
            "maps": lambda: (pred.predict_tensor(x), pred.maps_tensor(x, positive)),
        },
        reps,
        warmup=1,
        sync=sync,
    )
    out = {k: batch / v for k, v in med.items()}
    out["maps per image"] = float(len(positive))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps of each model")
    ap.add_argument("--images", type=int, default=1024, help="phantom images synthesised for the end-to-end run")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile figure")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the script (CPU)")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args(argv)

    from medxray.data.prepare import prepare_cache
    from medxray.data.synthetic import synthesize
    from medxray.hardware import resolve_device

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this is the GPU check (use --device cpu --quick for a dry run)")
        return 1
    device = resolve_device(args.device)
    batch, size, steps, n_img = args.batch_size, args.image_size, args.steps, args.images
    if args.quick:
        batch, size, steps, n_img = 4, 64, 2, 48
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, batch {batch}, {size} px")
    t_all = time.perf_counter()
    results: dict[str, float] = {}

    fig = train_step_figures(device, batch, size, steps, compile_model=not args.no_compile and not args.quick)
    for k, v in fig.items():
        print(f"train step  {k:22s} {v:9.1f} img/s")
    print(
        f"train step  ratio ours / torchvision amp+cl {fig['ours'] / fig['torchvision amp+cl']:.2f}, "
        f"ours / torchvision fp32 {fig['ours'] / fig['torchvision fp32']:.2f}"
    )
    results.update({f"train {k}": v for k, v in fig.items()})

    with tempfile.TemporaryDirectory(prefix="medxray-gpu-") as tmp:
        root = synthesize(
            Path(tmp) / "phantom", n_images=n_img, seed=0, image_size=max(size, 64 if args.quick else 256)
        )
        prepare_cache("chestxray14", root, size=size, progress=False)
        e2e, ckpt = finetune_figure(device, root, batch, size, steps=max(2, min(steps * 2, n_img // batch)))
        print(
            f"finetune end to end {e2e:9.1f} img/s, start-up and one validation pass included "
            f"({e2e / fig['ours']:.2f} of the model-only step)"
        )
        results["finetune end to end"] = e2e
        sc = scoring_figures(device, ckpt, batch, size, reps=3 if args.quick else 10)
        print(
            f"scoring     no maps {sc['no maps']:9.1f} img/s, maps {sc['maps']:9.1f} img/s "
            f"({sc['maps per image']:.0f} maps per image; ratio {sc['maps'] / sc['no maps']:.2f})"
        )
        results.update({f"score {k}": v for k, v in sc.items()})

    rc = 0
    if not args.skip_tests and device.type == "cuda":
        t = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        print(f"pytest -m gpu: exit {p.returncode} ({time.perf_counter() - t:.0f} s)")
        rc = 0 if p.returncode == 0 else 2
    print(
        "RESULT "
        + ", ".join(f"{k}={v:.1f}" for k, v in results.items())
        + f", total {time.perf_counter() - t_all:.0f} s on {name}"
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
