"""`medxray models`, `medxray finetune` and `medxray ood-calibrate`: the model table, training, OOD statistics."""

from __future__ import annotations

import argparse

from medxray.cli.common import ARCHITECTURE_CHOICES, PRECISION_CHOICES, add_table_option


def add_models(sub: argparse._SubParsersAction) -> None:
    """Register `medxray models`."""
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


def add_finetune(sub: argparse._SubParsersAction) -> None:
    # Options left out stay out of the namespace (SUPPRESS), so a --config file or a resumed
    # run's stored config is only overridden by what was typed.
    """Register `medxray finetune`."""
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


def add_ood_calibrate(sub: argparse._SubParsersAction) -> None:
    """Register `medxray ood-calibrate`."""
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
