"""Runnable batch-scoring pipeline: a YAML config (+ key=value overrides) -> medxray.scoring.

    python pipelines/score_dicom.py --config pipelines/score_dicom.yaml input_dir=/pacs/tonight out=/scored/tonight

Thin on purpose: parsing and exit codes here, all logic in :mod:`medxray.scoring`. Exit code 0
when the run completed (bad files become error rows), 2 for configuration / checkpoint errors.
A killed run resumes when started again with the same config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

DEFAULT_CONFIG = Path(__file__).with_suffix(".yaml")


def main(argv: Sequence[str] | None = None) -> int:
    from medxray.errors import MedxrayError
    from medxray.scoring import load_score_config, score_directory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"YAML config (default {DEFAULT_CONFIG.name})")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config options")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        summary = score_directory(load_score_config(args.config, args.overrides))
    except MedxrayError as exc:
        print(f"score_dicom: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(summary.line())
    if summary.merged:
        print(f"all shards finished: merged {summary.merged}")
    return 0


if __name__ == "__main__":  # workers are spawned: the guard keeps them from re-running the pipeline
    sys.exit(main())
