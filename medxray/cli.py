"""`medxray <command>`: thin argument parsing and dispatch.

Each subcommand is one ``_add_<name>`` function that declares its arguments and a handler that
imports the library lazily (so `medxray --help` is fast) and calls one library function. User
errors (:class:`medxray.errors.MedxrayError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from medxray import __version__
from medxray.errors import MedxrayError, output_error
from medxray.site.cli import add_site_parser

log = logging.getLogger("medxray")


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors already; keep its one-line message, no traceback."""


class TableChoices:
    """The keys of a library table (a dict or tuple), read when argparse first needs them.

    ``load`` returns the table; it imports its module lazily, so building the parser (and
    `medxray --help`) never imports torch: argparse reads the choices only to validate a value
    typed for the option or to format that subcommand's help. A row added to the table is
    accepted and listed without a CLI edit.
    """

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load

    def _keys(self) -> tuple[str, ...]:
        return tuple(self._load())

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, value: object) -> bool:
        return value in self._keys()

    def __repr__(self) -> str:  # names the table, not its rows (tests/test_cli_contract.py records it)
        return f"TableChoices({self._load.__name__})"


def add_table_option(parser: argparse.ArgumentParser, *flags: str, table: TableChoices, **kwargs) -> argparse.Action:
    """``parser.add_argument(*flags, **kwargs)`` with ``choices=table``.

    The choices are set on the returned action after ``add_argument``: argparse formats a
    metavar-less option once while adding it, which would read (and import) the table at build time.
    """
    action = parser.add_argument(*flags, **kwargs)
    action.choices = table
    return action


def _map_methods() -> Iterable[str]:
    from medxray.cam import MAP_METHODS

    return MAP_METHODS


def _score_cam_methods() -> Iterable[str]:
    from medxray.scoring.config import CAM_METHODS

    return CAM_METHODS


def _score_cam_modes() -> Sequence[str]:
    from medxray.scoring.config import CAM_MODES

    return CAM_MODES


def _ood_policies() -> Sequence[str]:
    from medxray.scoring.gate import OOD_POLICIES

    return OOD_POLICIES


def _backends() -> Sequence[str]:
    from medxray.inference import BACKENDS

    return BACKENDS


def _predictor_precisions() -> Sequence[str]:
    from medxray.inference import PRECISIONS

    return PRECISIONS


def _precisions() -> Sequence[str]:
    from medxray.hardware import PRECISIONS

    return PRECISIONS


def _architectures() -> Iterable[str]:
    from medxray.models.variants import VARIANTS

    return VARIANTS


def _datasets() -> Sequence[str]:
    from medxray.data import DATASETS

    return DATASETS


# Options with a fixed set of values take it from these tables (each read on first use).
MAP_METHOD_CHOICES = TableChoices(_map_methods)
SCORE_CAM_METHOD_CHOICES = TableChoices(_score_cam_methods)
SCORE_CAM_MODE_CHOICES = TableChoices(_score_cam_modes)
OOD_POLICY_CHOICES = TableChoices(_ood_policies)
BACKEND_CHOICES = TableChoices(_backends)
PREDICTOR_PRECISION_CHOICES = TableChoices(_predictor_precisions)
PRECISION_CHOICES = TableChoices(_precisions)
ARCHITECTURE_CHOICES = TableChoices(_architectures)
DATASET_CHOICES = TableChoices(_datasets)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model variants with parameter counts and GFLOPs")
    p.add_argument(
        "--flops",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GMACs/GFLOPs at each variant's input size (default on; computed from the architecture)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="build every network and count with torch instead (minutes on a CPU; same numbers)",
    )
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from medxray.models import describe_variants

    rows = describe_variants(with_flops=args.flops, measure=args.measure)
    header = f"{'name':<22}{'stem':<10}{'input':>7}{'classes':>9}{'params':>14}{'GMACs':>9}{'GFLOPs':>9}  imagenet"
    print(header)
    print("-" * len(header))
    for r in rows:
        macs = f"{r['gmacs']:.2f}" if r.get("gmacs") is not None else "-"
        flops = f"{2 * r['gmacs']:.2f}" if r.get("gmacs") is not None else "-"
        print(
            f"{r['name']:<22}{r['stem']:<10}{r['input_size']:>7}{r['num_classes']:>9}{r['params']:>14,}"
            f"{macs:>9}{flops:>9}  {'yes' if r['imagenet_weights'] else 'no'}"
        )
    print(
        "\nparams for ImageNet variants with 1000 classes, CIFAR variants with 10 (paper tables);"
        " GFLOPs count a multiply-add as 2."
    )
    return 0


def _add_app(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="start the clinician-review web app (Streamlit) on this machine")
    p.add_argument("--checkpoint", type=Path, default=None, help="model checkpoint (from `medxray finetune`)")
    p.add_argument(
        "--results",
        type=Path,
        action="append",
        default=None,
        help="a folder of `medxray score-dicom --out` results (or a folder above several) that reviewers "
        "may open; repeat for several. Folders outside these are refused",
    )
    p.add_argument(
        "--reviews",
        type=Path,
        default=None,
        help="folder of the review database (default: ~/.local/share/medxray/reviews)",
    )
    p.add_argument("--max-upload-mb", type=int, default=64, help="largest accepted upload in whole MB (default 64)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    p.add_argument("--browser", action="store_true", help="open a web browser on the app")
    add_table_option(
        p,
        "--backend",
        table=BACKEND_CHOICES,
        default="auto",
        help="inference backend (default auto: OpenVINO on CPU, torch on CUDA)",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument(
        "--identity-header",
        default="",
        metavar="HEADER",
        help="take the reviewer's name from this request header (e.g. X-Forwarded-User); only behind "
        "a reverse proxy that overwrites it; needs --proxy-secret-file",
    )
    who.add_argument(
        "--login",
        action="store_true",
        help="reviewers sign in with Streamlit's st.login (OIDC, configured in .streamlit/secrets.toml)",
    )
    p.add_argument(
        "--proxy-secret-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --identity-header: file (chmod 600) holding the secret the proxy sends in the "
        "X-Medxray-Proxy-Secret header; requests without it are refused",
    )
    p.set_defaults(func=_run_app)


def _run_app(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from medxray.review.settings import (
        APP_ENV_VARS,
        AppSettings,
        check_app_settings,
        default_reviews_dir,
        streamlit_command,
    )

    cfg = AppSettings(
        checkpoint=args.checkpoint,
        results=tuple(args.results or ()),
        reviews=args.reviews or default_reviews_dir(),
        max_upload_mb=args.max_upload_mb,
        backend=args.backend,
        identity_header=args.identity_header,
        login=args.login,
        proxy_secret_file=args.proxy_secret_file,
    )
    check_app_settings(cfg)
    argv, env = streamlit_command(cfg, host=args.host, port=args.port, open_browser=args.browser)
    print(f"medxray app: http://{args.host}:{args.port}  (reviews in {cfg.reviews}; Ctrl-C stops)", flush=True)
    # The flags decide: stale MEDXRAY_* app variables of the calling shell do not leak in.
    full_env = {**{k: v for k, v in os.environ.items() if k not in APP_ENV_VARS}, **env}
    if os.name == "posix":  # become the server: signals (Ctrl-C, systemd's SIGTERM) reach it directly
        os.execve(argv[0], argv, full_env)
    return subprocess.call(argv, env=full_env)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    # Options left out stay out of the namespace (SUPPRESS), so a --config file or a resumed
    # run's stored config is only overridden by what was typed.
    p = sub.add_parser(
        "finetune",
        help="fine-tune a DenseNet on chest X-rays (CheXNet recipe by default)",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--dataset", help="chestxray14 (default), chexpert or csv")
    p.add_argument("--data-root", dest="data_root", help="folder with the dataset's images and label file")
    add_table_option(
        p,
        "--model",
        table=ARCHITECTURE_CHOICES,
        metavar="MODEL",
        help="architecture (default densenet121; see `medxray models`)",
    )
    p.add_argument(
        "--pretrained",
        help="imagenet (default; needs torchvision's file in the torch hub cache), "
        "none, or a path to a torchvision-format state dict",
    )
    p.add_argument("--epochs", type=int, help="maximum epochs (default 10)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="images per step (default 16)")
    p.add_argument("--image-size", dest="image_size", type=int, help="square input size in pixels (default 224)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    p.add_argument("--out", help="run directory (default runs/<dataset>-<model>-<time>)")
    p.add_argument(
        "--config",
        dest="config_file",
        help="YAML file setting any option by name (see medxray.training.config.TrainConfig)",
    )
    p.add_argument("--resume", help="continue the run in this directory after its last completed epoch")
    p.add_argument("--device", help="auto (default: CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, help="seed of weights init, data order and augmentation (default 0)")
    add_table_option(
        p,
        "--precision",
        table=PRECISION_CHOICES,
        metavar="PRECISION",
        help="auto (default: bf16 where supported), bf16, fp16 (CUDA) or fp32",
    )
    p.add_argument("--scheduler", help="plateau (default: lr/10 on val-loss plateau), cosine or none")
    p.add_argument("--pos-weight", dest="pos_weight", help="none (default) or balanced (negatives/positives per class)")
    p.add_argument(
        "--early-stopping-patience",
        dest="early_stopping_patience",
        type=int,
        help="stop after this many epochs without a better val mean AUROC (default 3; 0 = off)",
    )
    p.add_argument("--weight-decay", dest="weight_decay", type=float)
    p.add_argument("--drop-rate", dest="drop_rate", type=float)
    p.add_argument(
        "--val-fraction", dest="val_fraction", type=float, help="share of patients for validation (default 0.1)"
    )
    p.add_argument("--view", help="all (default), PA or AP")
    p.add_argument("--num-workers", dest="num_workers", type=int, help="DataLoader workers (default: by machine)")
    p.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=int)
    p.add_argument(
        "--allow-missing",
        dest="allow_missing",
        action="store_true",
        help="drop images missing from the data root instead of stopping",
    )
    p.add_argument(
        "--init-from",
        dest="init_from",
        help="start from this medxray checkpoint (its architecture and "
        "weights; head rows matched by finding): site fine-tuning",
    )
    p.add_argument(
        "--freeze-blocks",
        dest="freeze_blocks",
        type=int,
        help="keep the stem and the first N dense blocks fixed (0-4; default 0)",
    )
    p.add_argument(
        "--freeze-bn",
        dest="freeze_bn",
        action="store_true",
        help="keep BatchNorm statistics and parameters fixed (small local sets)",
    )
    p.add_argument(
        "--csv",
        dest="csv_path",
        help="--dataset csv: the manifest (image path, patient id, optional split, one column per finding)",
    )
    p.add_argument(
        "--uncertain",
        choices=("ignore", "ones", "zeros"),
        help="--dataset chexpert: uncertain (-1) labels are masked (default), positive or negative",
    )
    for flag, dest, text in (
        ("compile", "compile", "torch.compile the model"),
        ("channels-last", "channels_last", "channels_last memory format (default on)"),
        ("memory-efficient", "memory_efficient", "recompute dense-layer concatenations (less memory)"),
        ("tensorboard", "tensorboard", "TensorBoard logs in RUN_DIR/tensorboard (if installed)"),
        ("progress", "progress", "progress bar (default on)"),
        ("deterministic", "deterministic", "deterministic algorithms (slower)"),
    ):
        p.add_argument(f"--{flag}", dest=dest, action=argparse.BooleanOptionalAction, help=text)
    p.set_defaults(func=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from medxray.training.config import make_config
    from medxray.training.loop import finetune

    skip = {"func", "command", "verbose", "quiet", "config_file"}
    opts = {k: v for k, v in vars(args).items() if k not in skip}
    # Dataset-specific flags travel in dataset_options, on top of any the config file sets.
    ds_flags = {k: opts.pop(k) for k in ("csv_path", "uncertain") if k in opts}
    if ds_flags:
        from medxray.training.config import load_config_file

        file_opts = load_config_file(args.config_file) if getattr(args, "config_file", None) else {}
        opts["dataset_options"] = {**dict(file_opts.get("dataset_options") or {}), **ds_flags}
    res = finetune(make_config(getattr(args, "config_file", None), **opts))
    print(f"run: {res.run_dir}  ({res.epochs_completed} epochs, {res.stopped_reason})")
    print(f"best: {res.best_checkpoint}  (epoch {res.best_epoch}, val mean AUROC {res.best_val_auroc:.4f})")
    print(f"next: medxray evaluate --checkpoint {res.best_checkpoint}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
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


def _add_demo(sub: argparse._SubParsersAction) -> None:
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


def _add_ood_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ood-calibrate",
        help="add out-of-distribution statistics to a checkpoint (for score-dicom's OOD check)",
        description="Computes the model's pooled features on the training split, fits their mean and a shrunk "
        "covariance, chooses the threshold on the validation split (a percentile of its distances) "
        "and stores both in the checkpoint. `medxray finetune` does this at the end of every run; "
        "this command adds them to an older checkpoint.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint written by `medxray finetune` (rewritten in place)")
    p.add_argument(
        "--data-root", default=None, help="the training data's folder (default: the one the checkpoint records)"
    )
    p.add_argument(
        "--percentile",
        type=float,
        default=99.0,
        help="threshold = this percentile of the validation distances (default 99)",
    )
    p.add_argument("--components", type=int, default=64, help="principal components kept (default 64)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_run_ood_calibrate)


def _run_ood_calibrate(args: argparse.Namespace) -> int:
    from medxray.ood import calibrate_checkpoint

    stats = calibrate_checkpoint(
        args.checkpoint,
        data_root=args.data_root,
        device=args.device,
        batch_size=args.batch_size,
        n_components=args.components,
        percentile=args.percentile,
    )
    info = stats.info
    print(
        f"OOD statistics written into {args.checkpoint}: {info['n_train']} training images, "
        f"{info['n_components']} components, threshold {stats.threshold:.2f} ({info['threshold_rule']}, "
        f"{info['n_val']} validation images)"
    )
    return 0


def _add_score_dicom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score-dicom",
        help="score a folder of DICOM files: results.csv (one row per file), CAM overlays, optional SR",
        description="Walks INPUT recursively, decodes in worker processes, scores in batches and appends one row "
        "per file to OUT/results.csv as it completes. Killed runs resume when re-run with the same "
        "arguments. Exit 0 when the run completes (bad files become error rows), 1 when CAM overlays / "
        "SRs could not be written (a re-run writes them), 2 for usage errors, an unusable checkpoint "
        "or a read-only / full output folder.",
    )
    p.add_argument(
        "input", metavar="INPUT_DIR", nargs="?", help="folder of DICOM files (searched recursively; any extension)"
    )
    p.add_argument(
        "--checkpoint",
        help="checkpoint written by `medxray finetune`, or a model registry folder "
        "(`medxray site promote`: its current version at this run) (required to score)",
    )
    p.add_argument("--out", help="output folder (results.csv, cams/, sr/, run.json) (required to score)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decode processes (default: one per CPU core at background priority; all but one with CUDA)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    add_table_option(
        p,
        "--cams",
        table=SCORE_CAM_MODE_CHOICES,
        default="positive",
        help="CAM overlay PNGs for positive findings (default), all findings, or none",
    )
    add_table_option(
        p,
        "--cam-method",
        table=SCORE_CAM_METHOD_CHOICES,
        default="checkpoint",
        metavar="CAM_METHOD",
        help="map method: 'checkpoint' (default: the method its localisation figures were measured "
        "with) or one of those `medxray evaluate --help` lists",
    )
    p.add_argument(
        "--overlay-max-side",
        type=int,
        default=1024,
        help="long side of CAM overlays in pixels (default 1024, a display's size; 0 = original size)",
    )
    p.add_argument("--sr", action="store_true", help="also write a DICOM Comprehensive SR per scored image")
    p.add_argument(
        "--shard",
        default=None,
        metavar="K/N|auto",
        help="score only shard K of N (1-based, by a hash of the path); rows go to "
        "results.shard-K-of-N.csv, merged into results.csv when all shards finished. 'auto': "
        "K and N from a SLURM job array (SLURM_ARRAY_TASK_ID/_COUNT) or a Kubernetes Indexed "
        "Job (JOB_COMPLETION_INDEX with $MEDXRAY_SHARD_COUNT or --shard-count)",
    )
    p.add_argument(
        "--shard-count",
        type=int,
        default=None,
        metavar="N",
        help="with --shard auto in a Kubernetes Indexed Job: the Job's completions",
    )
    p.add_argument(
        "--lock-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="if another scorer is writing the same OUT and shard (a requeued task while the old one "
        "dies), wait this long for it before giving up (default 0: refuse at once)",
    )
    p.add_argument(
        "--merge",
        metavar="OUT",
        default=None,
        help="only merge the finished shards in OUT into OUT/results.csv (idempotent; refuses an "
        "incomplete run, naming the missing shards); for a job that runs after the array",
    )
    p.add_argument(
        "--emit",
        choices=("slurm", "k8s"),
        default=None,
        help="write scheduler recipes for this run instead of scoring: a SLURM array + dependent merge "
        "job, or a Kubernetes Indexed Job + merge Job, one shard per task (--shard-count N)",
    )
    p.add_argument("--emit-dir", default=None, help="where --emit writes (default ./medxray-ENGINE)")
    p.add_argument("--cpus-per-task", type=int, default=4, help="--emit: CPUs per task (workers and threads)")
    p.add_argument("--mem-gb", type=int, default=8, help="--emit: memory per task, GB")
    p.add_argument("--gpus-per-task", type=int, default=0, help="--emit: GPUs per task")
    p.add_argument("--partition", default=None, help="--emit slurm: the partition")
    p.add_argument("--image", default="registry.example.org/medxray:latest", help="--emit k8s: the container image")
    p.add_argument(
        "--k8s-mount",
        default="/data",
        help="--emit k8s: where the shared ReadWriteMany volume (PVC medxray-data) holding INPUT_DIR and "
        "OUT is mounted; the checkpoint's folder comes read-only from PVC medxray-models",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_table_option(p, "--backend", table=BACKEND_CHOICES, default="auto")
    add_table_option(p, "--precision", table=PREDICTOR_PRECISION_CHOICES, default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU inference threads (default: the cores the decode workers leave free)",
    )
    p.add_argument(
        "--modalities", default="CR,DX", help="comma-separated modality allow-list (default CR,DX; 'any' accepts all)"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="refuse images with more pixels (default: $MEDXRAY_MAX_PIXELS, else 60 MP)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the results, CAM overlays and SRs of an earlier run in OUT instead of resuming",
    )
    p.add_argument(
        "--accept-body-parts",
        default="CHEST",
        metavar="PARTS",
        help="comma-separated Body Part Examined values scored (default CHEST; 'any' turns the check off); "
        "others get status skipped, code not_chest; a file naming none is scored with a warning",
    )
    add_table_option(
        p,
        "--ood-policy",
        table=OOD_POLICY_CHOICES,
        default="warn",
        help="an image the model's features place outside its training images: ok with a warning "
        "(default) or skipped with code out_of_distribution (needs OOD statistics in the "
        "checkpoint: `medxray ood-calibrate`)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_score_dicom, score_parser=p)


def _run_score_dicom(args: argparse.Namespace) -> int:
    from medxray.limits import pixel_limit
    from medxray.scoring import ScoreConfig, score_directory

    if args.merge:
        from medxray.scoring.run import merge_run

        print(merge_run(args.merge).line())
        return 0
    missing = [
        name for name, v in (("INPUT_DIR", args.input), ("--checkpoint", args.checkpoint), ("--out", args.out)) if not v
    ]
    if missing:  # an argparse usage error (exit 2), as when these were required arguments
        args.score_parser.error(
            f"the following arguments are required: {', '.join(missing)} (or --merge OUT to merge a sharded run)"
        )
    if args.emit:
        return _emit_recipes(args)
    mods = (
        None
        if args.modalities.strip().lower() == "any"
        else [m.strip().upper() for m in args.modalities.split(",") if m.strip()]
    )
    checkpoint = args.checkpoint  # a file, or a model registry whose current version each run reads
    cfg = ScoreConfig(
        input_dir=args.input,
        checkpoint=checkpoint,
        out=args.out,
        workers=args.workers,
        batch_size=args.batch_size,
        cams=args.cams,
        cam_method=args.cam_method,
        sr=args.sr,
        shard=args.shard,
        device=args.device,
        backend=args.backend,
        precision=args.precision,
        threads=args.threads,
        allowed_modalities=mods,
        max_pixels=pixel_limit(args.max_pixels),
        overlay_max_side=args.overlay_max_side or None,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        accept_body_parts=args.accept_body_parts,
        ood_policy=args.ood_policy,
        shard_count=args.shard_count,
        lock_wait=args.lock_wait,
    )
    summary = score_directory(cfg)
    print(summary.line())
    if summary.merged:
        print(f"all shards finished: merged {summary.merged}")
    if summary.outputs_failed:  # an output that failed to write is a failure of the run
        print(
            f"medxray score-dicom: error: the CAM overlays / SR of {summary.outputs_failed} scored file(s) could "
            f"not be written to {cfg.out} (see the warnings); free space or fix the folder, then re-run the same "
            "command to write them",
            file=sys.stderr,
        )
        return 1
    return 0


# score-dicom options a recipe passes through when the user changed them from their defaults
_EMIT_PASS = (
    ("batch_size", "--batch-size"),
    ("cams", "--cams"),
    ("cam_method", "--cam-method"),
    ("overlay_max_side", "--overlay-max-side"),
    ("sr", "--sr"),
    ("device", "--device"),
    ("backend", "--backend"),
    ("precision", "--precision"),
    ("modalities", "--modalities"),
    ("max_pixels", "--max-pixels"),
    ("accept_body_parts", "--accept-body-parts"),
    ("ood_policy", "--ood-policy"),
)


def _medxray_executable() -> str:
    """This installation's ``medxray`` (a venv's bin/medxray on a shared file system), else plain ``medxray``."""
    import shutil

    beside = Path(sys.executable).parent / "medxray"
    return str(beside) if beside.is_file() else (shutil.which("medxray") or "medxray")


def _emit_recipes(args: argparse.Namespace) -> int:
    import os

    from medxray.errors import ConfigError
    from medxray.scoring.scheduler import RecipeArgs, write_recipes

    if not args.shard_count:
        raise ConfigError("--emit needs --shard-count N (the number of shards: array tasks / completions)")
    passed: list[str] = []
    for attr, flag in _EMIT_PASS:
        v = getattr(args, attr)
        if v != args.score_parser.get_default(attr):
            passed += [flag] if v is True else [flag, str(v)]
    k8s = args.emit == "k8s"
    path = (lambda p: str(p)) if k8s else os.path.abspath  # pods see their own paths; SLURM nodes share ours
    rec = RecipeArgs(
        input_dir=path(args.input),
        checkpoint=path(args.checkpoint),
        out=path(args.out),
        shards=args.shard_count,
        cpus=args.cpus_per_task,
        memory_gb=args.mem_gb,
        gpus=args.gpus_per_task,
        partition=args.partition,
        image=args.image,
        mount_path=args.k8s_mount,
        score_args=tuple(passed),
        command="medxray" if k8s else _medxray_executable(),
    )
    for p in write_recipes(args.emit, rec, args.emit_dir or f"medxray-{args.emit}"):
        print(f"wrote {p}")
    return 0


def _add_pacs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve-dicom",
        help="run the DICOM node: C-STORE SCP in, score by series, results back to a PACS",
        description="Receives images by C-STORE, scores each series once it is idle with the "
        "score-dicom engine and C-STOREs an SR (+ CAM Secondary Captures) to the "
        "destination. Stop with Ctrl-C / SIGTERM; restart resumes. See pipelines/node.yaml.",
    )
    p.add_argument("--config", required=True, help="node YAML (AE title, port, allowed callers, destination, ...)")
    p.add_argument("--port", type=int, default=None, help="override the config's port")
    p.set_defaults(func=_run_serve_dicom)
    p = sub.add_parser(
        "score-pacs",
        help="pull new CR/DX images from Orthanc, score them, store results back",
        description="Reads Orthanc's change log after a cursor kept in --work, downloads new CR/DX "
        "instances, scores them with the score-dicom engine and POSTs the SR (+ SC) "
        "back. Re-run (e.g. from cron) to continue from the cursor.",
    )
    p.add_argument("--orthanc", required=True, metavar="URL", help="Orthanc REST URL, e.g. http://127.0.0.1:8042")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by `medxray finetune`")
    p.add_argument("--work", required=True, help="state folder (cursor, inbox, results.csv, outbox)")
    p.add_argument("--deidentified-sr", action="store_true", help="SR/SC with an empty patient module")
    p.add_argument("--no-sc", action="store_true", help="send the SR only, no CAM Secondary Captures")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=_run_score_pacs)


def _run_serve_dicom(args: argparse.Namespace) -> int:
    from medxray.pacs import load_node_config, serve

    serve(load_node_config(args.config, {"port": args.port} if args.port else None))
    return 0


def _run_score_pacs(args: argparse.Namespace) -> int:
    from medxray.pacs import ResultPolicy, score_pacs

    policy = ResultPolicy(
        deidentified_sr=args.deidentified_sr,
        secondary_capture=not args.no_sc,
        scoring={"batch_size": args.batch_size, "workers": args.workers},
    )
    summary = score_pacs(args.orthanc, args.checkpoint, args.work, policy=policy)
    print(summary.line())
    return 0 if not summary.queued_left else 1


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare the preprocessing cache, synthesise phantom data, verify a data root")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
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


# Every subcommand registers here, in the order `medxray --help` lists them.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models,
    _add_app,
    _add_finetune,
    _add_evaluate,
    _add_ood_calibrate,
    _add_demo,
    _add_score_dicom,
    _add_pacs,
    _add_data,
    add_site_parser,
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
