"""Training-step throughput: medxray's default CPU configuration vs a plain torchvision fp32 loop.

Ours: the in-repo DenseNet-121 through ``medxray.training.steps.train_step`` exactly as ``finetune`` runs
it on this machine (precision "auto" -> bf16 autocast where the CPU supports it, channels_last,
fused Adam, masked BCE). Peer: ``torchvision.models.densenet121`` in fp32 with the textbook loop
(``BCEWithLogitsLoss``, ``torch.optim.Adam``). Same batch (16 x 3 x 224 x 224, 14 labels), same
process, steps interleaved ours/peer so that load from other processes hits both alike. The
fastest step of each gives images/s and the ratio (on a shared machine the minimum is the
estimate least disturbed by other processes); medians are printed beside them.

    .venv/bin/python bench/train_step.py [--steps 6] [--batch-size 16] [--image-size 224] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps of each (after 2 warm-up steps)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--precision", default="auto", help="ours: auto (default), bf16, fp16 (cuda) or fp32")
    ap.add_argument("--target", type=float, default=2.5, help="speed-up the default configuration should reach")
    args = ap.parse_args(argv)

    import torchvision

    from medxray.hardware import resolve_device, resolve_precision
    from medxray.models import create_model
    from medxray.training.config import TrainConfig
    from medxray.training.steps import make_optimizer, masked_bce_with_logits, train_step

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    y = (torch.rand(args.batch_size, 14, generator=g) < 0.2).float()
    m = torch.ones_like(y)

    torch.manual_seed(0)
    ours = create_model("densenet121", num_classes=14).to(device).to(memory_format=torch.channels_last).train()
    ours_opt = make_optimizer(ours, TrainConfig(), device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    peer = torchvision.models.densenet121(num_classes=14).to(device).train()
    peer_opt = torch.optim.Adam(peer.parameters(), lr=1e-3, betas=(0.9, 0.999))
    peer_loss = torch.nn.BCEWithLogitsLoss()
    xd, yd = x.to(device), y.to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step_ours() -> float:
        t = time.perf_counter()
        train_step(ours, x, y, m, ours_opt, scaler, device=device, precision=precision, channels_last=True)
        sync()
        return time.perf_counter() - t

    def step_peer() -> float:
        t = time.perf_counter()
        peer_opt.zero_grad()
        loss = peer_loss(peer(xd), yd)
        loss.backward()
        peer_opt.step()
        sync()
        return time.perf_counter() - t

    # Same numbers check: the losses of both on this batch at init are BCE of ~zero logits.
    with torch.no_grad():
        l0 = float(
            masked_bce_with_logits(ours(x.to(device).contiguous(memory_format=torch.channels_last)), yd, m.to(device))
        )
    print(
        f"device {device}, ours: in-repo densenet121 + {precision} autocast + channels_last + fused Adam; "
        f"peer: torchvision densenet121 fp32; batch {args.batch_size}x3x{args.image_size}x{args.image_size}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; initial loss {l0:.3f}",
        flush=True,
    )
    for _ in range(2):  # warm-up: oneDNN kernel creation, allocator
        step_ours()
        step_peer()
    t_ours, t_peer = [], []
    for i in range(args.steps):
        t_ours.append(step_ours())
        t_peer.append(step_peer())
        print(f"  step {i + 1}: ours {t_ours[-1]:.2f}s  peer {t_peer[-1]:.2f}s", flush=True)
    bs = args.batch_size
    best_ours, best_peer = min(t_ours), min(t_peer)
    med_ours, med_peer = statistics.median(t_ours), statistics.median(t_peer)
    ratio = best_peer / best_ours
    print(f"ours  {bs / best_ours:7.2f} img/s  (fastest step {best_ours:.3f}s; median {bs / med_ours:.2f} img/s)")
    print(f"peer  {bs / best_peer:7.2f} img/s  (fastest step {best_peer:.3f}s; median {bs / med_peer:.2f} img/s)")
    print(
        f"ratio {ratio:.2f}x by fastest step, {med_peer / med_ours:.2f}x by median "
        f"(target >= {args.target:.1f}x: {'met' if ratio >= args.target else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
