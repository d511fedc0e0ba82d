"""`medxray <command>`: thin argument parsing and dispatch.

One module per command group (:mod:`medxray.cli.train`, :mod:`~medxray.cli.evaluate`,
:mod:`~medxray.cli.score`, :mod:`~medxray.cli.pacs`, :mod:`~medxray.cli.data`,
:mod:`~medxray.cli.app`, :mod:`~medxray.cli.demo`; the site loop's in :mod:`medxray.site.cli`).
Each subcommand is one ``add_<name>`` function that declares its arguments and a handler that
imports the library lazily (so `medxray --help` is fast) and calls one library function. User
errors (:class:`medxray.errors.MedxrayError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from medxray import __version__
from medxray.cli.app import add_app
from medxray.cli.common import Parser
from medxray.cli.data import add_data
from medxray.cli.demo import add_demo
from medxray.cli.evaluate import add_evaluate
from medxray.cli.pacs import add_pacs
from medxray.cli.score import add_score_dicom
from medxray.cli.train import add_finetune, add_models, add_ood_calibrate
from medxray.errors import MedxrayError, output_error
from medxray.site.cli import add_site_parser

# Every subcommand registers here, in the order `medxray --help` lists them.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_models,
    add_app,
    add_finetune,
    add_evaluate,
    add_ood_calibrate,
    add_demo,
    add_score_dicom,
    add_pacs,
    add_data,
    add_site_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The `medxray` argument parser with every subcommand registered (imports no torch)."""
    parser = Parser(prog="medxray", description="Chest X-ray transfer learning with an in-repo DenseNet-BC.")
    parser.add_argument("--version", action="version", version=f"medxray {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
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
    """Run one `medxray` command (``argv`` default ``sys.argv[1:]``); return its exit code.

    The handler's code (0 done; 1 where the command documents it), 2 for a user error
    (:class:`medxray.errors.MedxrayError`, or a full / read-only output folder) printed as one
    line, 130 when interrupted. argparse's usage errors exit 2 themselves (``SystemExit``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except MedxrayError as exc:
        print(f"medxray {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a full or read-only disk met where no library call expected it: still one line
        where = Path(exc.filename).parent if exc.filename else "the output folder"
        err = output_error(exc, where)
        if err is None:
            raise
        print(f"medxray {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"medxray {args.command}: interrupted", file=sys.stderr)
        return 130
