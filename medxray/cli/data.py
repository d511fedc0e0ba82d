"""`medxray data prepare | synth | verify`: the preprocessing cache, phantom data roots, data checks."""

from __future__ import annotations

import argparse
import sys

from medxray.cli.common import DATASET_CHOICES, Parser, add_table_option


def add_data(sub: argparse._SubParsersAction) -> None:
    """Register `medxray data` and its actions prepare, synth and verify."""
    p = sub.add_parser("data", help="prepare the preprocessing cache, synthesise phantom data, verify a data root")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=Parser)
    dsub.required = True

    pr = dsub.add_parser("prepare", help="decode + resize every image once into a uint8 memmap cache (resumable)")
    add_table_option(pr, "--dataset", table=DATASET_CHOICES, default="chestxray14")
    pr.add_argument("--data-root", required=True, help="folder holding images/ (or images_001/images ...)")
    pr.add_argument("--size", type=int, default=256, help="cached side length in pixels (>= training size)")
    pr.add_argument("--workers", type=int, default=None, help="decode processes (default: CPU count, max 8)")
    pr.add_argument("--cache-dir", default=None, help="where to write it (default DATA_ROOT/medxray_cache)")
    pr.add_argument("--allow-missing", action="store_true", help="skip image files that are missing")
    pr.add_argument("--csv", dest="csv_path", default=None, help="CSV manifest (--dataset csv)")
    pr.set_defaults(func=_run_data_prepare)

    sy = dsub.add_parser("synth", help="write a SYNTHETIC phantom ChestX-ray14 data root (for demos and tests)")
    sy.add_argument("--out", required=True, help="new or empty folder to write the data root to")
    sy.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a phantom data root already in --out that has other parameters",
    )
    sy.add_argument("--images", type=int, default=1000, help="number of images (default 1000)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--workers", type=int, default=None, help="drawing processes (default: CPU count, max 8)")
    sy.add_argument(
        "--layout", choices=("flat", "nested"), default="flat", help="images/ (flat) or images_001/images ... (nested)"
    )
    sy.set_defaults(func=_run_data_synth)

    ve = dsub.add_parser("verify", help="check the shipped manifests and, with --data-root, a data root and its cache")
    add_table_option(ve, "--dataset", table=DATASET_CHOICES, default="chestxray14")
    ve.add_argument("--data-root", default=None)
    ve.add_argument("--decode", default="200", help="decode this many images to check them, or 'all' (default 200)")
    ve.add_argument("--cache-dir", default=None)
    ve.add_argument("--csv", dest="csv_path", default=None, help="CSV manifest (--dataset csv)")
    ve.add_argument(
        "--allow-missing",
        action="store_true",
        help="a partial download: count missing images but do not report them as a problem",
    )
    ve.set_defaults(func=_run_data_verify)


def _data_options(args: argparse.Namespace) -> dict:
    opts = {}
    if getattr(args, "cache_dir", None):
        opts["cache_dir"] = args.cache_dir
    if getattr(args, "csv_path", None):
        opts["csv_path"] = args.csv_path
    return opts


def _run_data_prepare(args: argparse.Namespace) -> int:
    from medxray.data.prepare import prepare_cache

    r = prepare_cache(
        args.dataset,
        args.data_root,
        args.size,
        workers=args.workers,
        allow_missing=args.allow_missing,
        progress=not args.quiet,
        **_data_options(args),
    )
    print(
        f"cache {r['path']}: {r['state']}, {r['done']} images done, {r['bad']} unreadable, {r['todo']} to do "
        f"({r['processed_now']} now in {r['seconds']} s, {r['images_per_s'] or 0} images/s)"
    )
    return 0 if r["state"] == "complete" else 1


def _run_data_synth(args: argparse.Namespace) -> int:
    from medxray.data.synthetic import synthesize

    out = synthesize(
        args.out,
        args.images,
        args.seed,
        workers=args.workers,
        layout=args.layout,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    print(f"SYNTHETIC phantom data root (not real radiographs): {out}")
    return 0


def _run_data_verify(args: argparse.Namespace) -> int:
    import json

    from medxray.data.verify import verify_data
    from medxray.errors import ConfigError

    if args.decode == "all":
        decode = None
    else:
        try:
            decode = int(args.decode)
        except ValueError:
            raise ConfigError(f"--decode must be a number or 'all', got {args.decode!r}") from None
    report = verify_data(
        args.dataset, args.data_root, decode=decode, allow_missing=args.allow_missing, **_data_options(args)
    )
    print(json.dumps(report, indent=1, default=str))
    for problem in report.get("problems", []):
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if report.get("problems") else 0
