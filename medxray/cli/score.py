"""`medxray score-dicom`: score a folder of DICOM files, merge a sharded run, or write scheduler recipes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medxray.cli.common import (
    BACKEND_CHOICES,
    OOD_POLICY_CHOICES,
    PREDICTOR_PRECISION_CHOICES,
    SCORE_CAM_METHOD_CHOICES,
    SCORE_CAM_MODE_CHOICES,
    add_table_option,
)


def add_score_dicom(sub: argparse._SubParsersAction) -> None:
    """Register `medxray score-dicom`."""
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
        help="decode processes (default: one per CPU core; all but one with CUDA)",
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
        "--max-maps",
        type=int,
        default=None,
        metavar="N",
        help="at most N maps (and overlay PNGs) per image, its most probable findings first "
        "(default: one per finding --cams selects)",
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
        max_maps=args.max_maps,
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
    ("max_maps", "--max-maps"),
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
