"""Input pipeline: one epoch from the preprocessing cache vs decoding the 1024x1024 PNGs.

Both sides are the same data set (a phantom data root this script writes to a temp folder),
the same transforms (the deterministic list, or the training list with --augment) and the same
DataLoader settings. The only difference is where the pixels come from: the memmapped uint8
cache, or the PNG files. Both are warm in the page cache, so this measures CPU cost, not disk.

    .venv/bin/python bench/loader.py [--images 300] [--size 224] [--cache-size 256] [--workers 0] [--augment]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader

from medxray.data import build_datasets
from medxray.data.prepare import prepare_cache
from medxray.data.synthetic import synthesize


def epoch(dataset, batch_size: int, workers: int) -> tuple[float, int]:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    n = 0
    t0 = time.perf_counter()
    for batch in loader:
        n += batch["image"].shape[0]
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=224, help="network input size")
    ap.add_argument("--cache-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for both sides")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--augment", action="store_true", help="use the training list (random transforms) on both sides")
    ap.add_argument("--root", default=None, help="reuse this phantom data root instead of a temp one")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)  # one core per loader process, as in DataLoader workers

    with tempfile.TemporaryDirectory(prefix="medxray-bench-") as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "phantom"
        t = time.perf_counter()
        synthesize(root, n_images=args.images, seed=0)
        t_synth = time.perf_counter() - t
        rep = prepare_cache("chestxray14", root, args.cache_size, progress=False)
        print(
            f"phantom data: {args.images} SYNTHETIC 1024x1024 PNGs in {t_synth:.1f} s; cache at {args.cache_size} px "
            f"built in {rep['seconds']:.1f} s ({rep['images_per_s']} images/s, {rep['processed_now']} decoded)"
        )

        def everything(use_cache: bool):
            s = build_datasets("chestxray14", root, image_size=args.size, use_cache=use_cache, augment=args.augment)
            assert (s.summary["cache"] is not None) == use_cache
            parts = [s.train, s.val, s.test]
            if args.augment:  # every part through the training list
                for p in parts:
                    p.augment = True
            return ConcatDataset(parts)

        results = {}
        for name, use_cache in (("png", False), ("cache", True)):
            ds = everything(use_cache)
            epoch(torch.utils.data.Subset(ds, range(min(16, len(ds)))), args.batch_size, args.workers)  # warm-up
            secs, n = epoch(ds, args.batch_size, args.workers)
            results[name] = n / secs
            print(f"{name:>6}: {n} images in {secs:6.2f} s = {n / secs:8.1f} images/s")
    ratio = results["cache"] / results["png"]
    transforms = "training list (random)" if args.augment else "deterministic list"
    print(
        f"cache vs PNG decode: {ratio:.1f}x images/s ({transforms}, {args.size} px, workers={args.workers}; "
        f"target >= 10x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
