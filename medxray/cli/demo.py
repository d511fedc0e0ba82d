"""`medxray demo`: the end-to-end demo on synthetic phantom images."""

from __future__ import annotations

import argparse
import logging


def add_demo(sub: argparse._SubParsersAction) -> None:
    """Register `medxray demo`."""
    p = sub.add_parser(
        "demo", help="end-to-end demo on synthetic phantom images: train, evaluate, CAMs, score a real DICOM"
    )
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--quick", action="store_true", help="a ~1-minute smoke version (tiny data, low AUROC expected)")
    p.add_argument("--images", type=int, default=None, help="phantom images to synthesise")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from medxray.demo import DemoOptions, run_demo

    opts = DemoOptions.preset("quick" if args.quick else "default", out=args.out, seed=args.seed, device=args.device)
    for key in ("images", "epochs", "image_size"):
        if getattr(args, key) is not None:
            setattr(opts, key, getattr(args, key))
    # The demo tells its own story; the libraries' step-by-step detail stays available with -v.
    quiet = (
        []
        if args.verbose
        else [
            logging.getLogger(n) for n in ("medxray.data", "medxray.inference", "medxray.scoring", "medxray.evaluation")
        ]
    )
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    try:
        res = run_demo(opts, echo=lambda line: print(line, flush=True))
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    return 0 if res.ok else 1
