"""`medxray evaluate`: a checkpoint, an external predictions file, or two of either compared."""

from __future__ import annotations

import argparse

from medxray.cli.common import MAP_METHOD_CHOICES, PRECISION_CHOICES, add_table_option


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """Register `medxray evaluate`."""
    p = sub.add_parser(
        "evaluate",
        help="AUROC with CIs, thresholds, calibration, localisation and a report",
        description="Evaluate a checkpoint (--checkpoint), an external predictions file "
        "(--predictions: one row per image, a column per finding) or compare two of "
        "either (--compare A B: paired AUROC differences, DeLong's test).",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="checkpoint from `medxray finetune` (best.pt)")
    what.add_argument(
        "--predictions",
        metavar="FILE.csv",
        help="score this predictions file against the official ChestX-ray14 labels and split",
    )
    what.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="two checkpoints or two predictions files, compared on the same images",
    )
    p.add_argument("--dataset", default=None, help="default: the dataset the checkpoint was trained on")
    p.add_argument("--data-root", default=None, help="default: the data root the checkpoint was trained on")
    p.add_argument(
        "--split",
        default="test",
        help="test (default), val or train; with --predictions also 'file': exactly the images the file names",
    )
    p.add_argument(
        "--columns",
        default=None,
        metavar="FINDING=COLUMN,...",
        help="--predictions: which column holds which finding, when the names are not X, p_X, prob_X "
        "or the display / torchxrayvision name",
    )
    p.add_argument("--out", default=None, help="output folder (default: next to the checkpoint, eval-<split>)")
    p.add_argument("--tta", action="store_true", help="TenCrop test-time augmentation (10x slower)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (default 1000)")
    p.add_argument(
        "--threshold-split",
        default="val",
        help="split on which operating thresholds are chosen (default val; 'same' = the evaluated split)",
    )
    p.add_argument(
        "--write-thresholds",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write thresholds and metrics into the checkpoint's metadata (default on)",
    )
    p.add_argument(
        "--localisation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CAM box localisation on images with ground-truth boxes (default on)",
    )
    p.add_argument("--cam-threshold", type=float, default=0.5, help="CAM level that makes boxes (default 0.5)")
    add_table_option(
        p,
        "--cam-method",
        table=MAP_METHOD_CHOICES,
        default=None,
        metavar="CAM_METHOD",
        help="map method scored and recorded in the checkpoint: %(choices)s (default: the checkpoint's "
        "recorded method, else the measured best; see bench/localisation.py)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    add_table_option(
        p,
        "--precision",
        table=PRECISION_CHOICES,
        default="fp32",
        help="fp32 (default: exact, hardware-independent numbers), bf16/fp16 (faster, probabilities "
        "coarser), auto (bf16 where native); the report names the one used",
    )
    p.add_argument("--num-workers", type=int, default=None)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    import math

    th_split = None if args.threshold_split == "same" else args.threshold_split
    if args.compare:
        return _run_compare(args, th_split)
    if args.predictions:
        from medxray.evaluation.external import evaluate_predictions, parse_columns

        res = evaluate_predictions(
            args.predictions,
            dataset=args.dataset or "chestxray14",
            data_root=args.data_root,
            split=args.split,
            out_dir=args.out,
            threshold_split=th_split,
            n_bootstrap=args.bootstrap,
            columns=parse_columns(args.columns),
        )
    else:
        from medxray.evaluation.run import evaluate

        res = evaluate(
            args.checkpoint,
            dataset=args.dataset,
            data_root=args.data_root,
            split=args.split,
            out_dir=args.out,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            tta=args.tta,
            n_bootstrap=args.bootstrap,
            threshold_split=th_split,
            write_back=args.write_thresholds,
            localisation=args.localisation,
            cam_threshold=args.cam_threshold,
            cam_method=args.cam_method,
            num_workers=args.num_workers,
            progress=not args.quiet,
        )
    if res.coverage_note:
        print(res.coverage_note)
    print(f"{'finding':<20}{'AUROC':>8}   95% CI")
    for name in res.label_names:
        lo, hi = res.auroc_ci[name]
        a = res.auroc[name]
        print(f"{name:<20}{a:>8.3f}   {lo:.3f}-{hi:.3f}" if math.isfinite(a) else f"{name:<20}{'n/a':>8}")
    lo, hi = res.mean_auroc_ci
    print(
        f"{'mean':<20}{res.mean_auroc:>8.3f}   {lo:.3f}-{hi:.3f}   ({res.n_images} {res.split} images, {res.precision})"
    )
    if res.thresholds_fallback:
        print(
            f"fallback thresholds (0.5; no positive or negative on {res.threshold_split}): "
            f"{', '.join(res.thresholds_fallback)}"
        )
    if res.localisation:
        o = res.localisation["overall"]
        print(
            f"localisation: {o['n']} boxes, IoBB>0.5 accuracy {o['iobb_accuracy']['0.5']:.3f}, "
            f"pointing game {o['pointing_game']:.3f}"
        )
    print(f"report: {res.report_html}  (and {res.report_md.name}, plots in {res.out_dir})")
    return 0


def _run_compare(args: argparse.Namespace, th_split: str | None) -> int:
    from medxray.evaluation.compare import compare_sources

    a, b = args.compare
    opts = {"dataset": args.dataset, "data_root": args.data_root, "threshold_split": th_split}
    if not a.lower().endswith(".csv"):
        opts.update(
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            tta=args.tta,
            num_workers=args.num_workers,
        )
    comp, ra, _ = compare_sources(
        a, b, out_dir=args.out or "comparison", split=args.split, n_bootstrap=args.bootstrap, **opts
    )
    if ra.coverage_note:
        print(ra.coverage_note)
    print(f"A = {a}\nB = {b}\n{comp.n_images} {args.split} images; B - A per finding:")
    for name, r in comp.rows.items():
        print(f"{name:<20}{r['verdict']}")
    print(f"comparison: {comp.files['md']}  (and .csv, .json; each model's report in A/ and B/)")
    return 0
