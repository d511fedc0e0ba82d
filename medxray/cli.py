"""`medxray <command>`: thin argument parsing and dispatch.

Each subcommand is one ``_add_<name>`` function that declares its arguments and a handler that
imports the library lazily (so `medxray --help` is fast) and calls one library function. User
errors (:class:`medxray.errors.MedxrayError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from medxray import __version__
from medxray.errors import MedxrayError

log = logging.getLogger("medxray")


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors already; keep its one-line message, no traceback."""


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model variants with parameter counts and GFLOPs")
    p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                   help="measure GFLOPs at each variant's input size (default on)")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from medxray.models import describe_variants

    rows = describe_variants(with_flops=args.flops)
    header = f"{'name':<22}{'stem':<10}{'input':>7}{'classes':>9}{'params':>14}{'GMACs':>9}{'GFLOPs':>9}  imagenet"
    print(header)
    print("-" * len(header))
    for r in rows:
        macs = f"{r['gmacs']:.2f}" if r.get("gmacs") is not None else "-"
        flops = f"{2 * r['gmacs']:.2f}" if r.get("gmacs") is not None else "-"
        print(f"{r['name']:<22}{r['stem']:<10}{r['input_size']:>7}{r['num_classes']:>9}{r['params']:>14,}"
              f"{macs:>9}{flops:>9}  {'yes' if r['imagenet_weights'] else 'no'}")
    print("\nparams for ImageNet variants with 1000 classes, CIFAR variants with 10 (paper tables);"
          " GFLOPs count a multiply-add as 2.")
    return 0


# Every subcommand registers here, in the order `medxray --help` lists them.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="medxray", description="Chest X-ray transfer learning with an in-repo DenseNet-BC.")
    parser.add_argument("--version", action="version", version=f"medxray {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger("medxray")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except MedxrayError as exc:
        print(f"medxray {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"medxray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
