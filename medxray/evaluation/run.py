"""The evaluation job: ``evaluate(checkpoint, ...) -> EvalResult``, scoring a split (with optional TTA)
and writing its outputs.

What it measures, and why that way:

* per-class AUROC with 95% bootstrap confidence intervals (images resampled jointly, so the mean
  AUROC gets an interval too) and AUPRC, the numbers CheXNet and Wang et al. report;
* operating thresholds per class (Youden's J, and the threshold giving 90% specificity). They are
  chosen on the validation split by default, so the sensitivity and specificity reported on the
  test split are not fitted to it. They are written back into the checkpoint's metadata, where
  the scorer and the app read them;
* calibration (expected calibration error, reliability plot), ROC and PR curves as PNG;
* optional TenCrop test-time augmentation;
* localisation on images with boxes: the class activation map (features . classifier weights,
  no hooks) is thresholded into boxes, scored by IoBB at T = 0.1 ... 0.9 as in Wang et al. 2017,
  plus the pointing game;
* a Markdown + HTML report placing our AUROC beside CheXNet's and Wang's and saying which split
  and data the numbers rest on.

The metrics live in :mod:`medxray.evaluation.metrics`, localisation in
:mod:`medxray.evaluation.localisation`, plots and the report in :mod:`medxray.evaluation.report`.
This module must not import training (:mod:`medxray.training`, :mod:`medxray.train`): shared
helpers come from :mod:`medxray.hardware`, :mod:`medxray.fileio` and :mod:`medxray.data`.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medxray.data import DATASETS, build_datasets
from medxray.data.loading import IndexedDataset, make_loader
from medxray.data.manifest import PHANTOM_MARKER
from medxray.errors import CheckpointError, ConfigError, DataError
from medxray.evaluation.localisation import localise_image, summarise_localisation
from medxray.evaluation.metrics import (
    auprc_per_class,
    auroc_per_class,
    bootstrap_auroc,
    calibration,
    operating_points,
    sens_spec_at,
)
from medxray.evaluation.report import write_plots, write_report
from medxray.evaluation.result import EvalResult
from medxray.fileio import atomic_output, atomic_write_text, json_line
from medxray.hardware import autocast

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")

# --------------------------------------------------------------------------------------------
# scoring a split


def ten_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, S, S) -> (N*10, C, S, S): upscale by 1/0.875 (CheXNet's 256/224), take 4 corners +
    centre, and their mirror images."""
    big = int(round(size / 0.875))
    up = F.interpolate(x, size=(big, big), mode="bilinear", align_corners=False)
    o = big - size
    c = o // 2
    crops = [up[..., :size, :size], up[..., :size, o:], up[..., o:, :size], up[..., o:, o:], up[..., c:c + size, c:c + size]]
    crops += [torch.flip(t, dims=(-1,)) for t in crops]
    return torch.stack(crops, 1).reshape(-1, *x.shape[1:])


@torch.no_grad()
def score_split(
    model: torch.nn.Module, dataset: Any, *, device: torch.device, precision: str, batch_size: int, tta: bool = False,
    boxes: Mapping[str, Sequence[Mapping[str, Any]]] | None = None, label_names: Sequence[str] = (),
    cam_threshold: float = 0.5, num_workers: int = 0, progress: bool = False,
) -> dict[str, Any]:
    """Probabilities for every image of ``dataset``; localisation records for images that have boxes.

    Returns ``probs``, ``labels``, ``masks`` as (N, C) arrays in dataset order, ``names``, and
    ``localisation`` (records of :func:`medxray.evaluation.localisation.localise_image`).
    ``tta``: average the sigmoid over TenCrop's ten crops (:func:`ten_crop`).
    """
    loader = make_loader(IndexedDataset(dataset), batch_size=batch_size, seed=0, num_workers=num_workers,
                         pin_memory=device.type == "cuda")
    model.eval()
    index_of = {n: i for i, n in enumerate(label_names)}
    weight = model.classifier.weight.detach().float()
    probs, labels, masks, names, loc = [], [], [], [], []
    it: Any = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc="scoring", unit="batch", leave=False)
    for batch in it:
        x = batch["image"].to(device).contiguous(memory_format=torch.channels_last)
        size = x.shape[-1]
        with autocast(device, precision):
            feats = model.forward_features(x)
            logits = model.classifier(feats.float().mean(dim=(2, 3)))
            if tta:
                # one forward per crop position keeps memory at one batch's worth
                crops = ten_crop(x, size).reshape(x.shape[0], 10, *x.shape[1:])
                p = torch.stack([torch.sigmoid(model(crops[:, k].contiguous(memory_format=torch.channels_last)).float())
                                 for k in range(10)]).mean(0)
        p = p if tta else torch.sigmoid(logits.float())
        probs.append(p.cpu().numpy())
        labels.append(batch["label"].numpy())
        masks.append(batch["mask"].numpy())
        names.extend(batch["name"])
        if not boxes:
            continue
        for i, name in enumerate(batch["name"]):
            loc.extend(localise_image(feats[i:i + 1], weight, boxes.get(name, []), name=name,
                                      orig_size=batch["orig_size"][i], size=size, index_of=index_of, probs=p[i],
                                      cam_threshold=cam_threshold))
    c = len(label_names)
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros((0, c), dtype=np.float32))  # noqa: E731
    return {"probs": cat(probs), "labels": cat(labels), "masks": cat(masks), "names": names, "localisation": loc}


# --------------------------------------------------------------------------------------------
# the evaluation job


def evaluate(
    checkpoint: str | Path,
    *,
    dataset: str | None = None,
    data_root: str | Path | None = None,
    split: str = "test",
    out_dir: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 32,
    tta: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold_split: str | None = "val",
    write_thresholds: bool = True,
    localisation: bool = True,
    cam_threshold: float = 0.5,
    num_workers: int | None = None,
    data_note: str | None = None,
    splits: Any = None,
    progress: bool = False,
) -> EvalResult:
    """Evaluate ``checkpoint`` on one split and write metrics, plots and a report to ``out_dir``.

    Dataset options (view, validation fraction and seed, ...) default to the ones the checkpoint
    was trained with, so ``split="val"`` is the same validation split training used.
    ``threshold_split``: where operating thresholds are chosen (``None``: on ``split`` itself).
    """
    from medxray.checkpoint import load_checkpoint, model_from_checkpoint, update_metadata
    from medxray.data.transforms import check_preprocessing
    from medxray.hardware import default_num_workers, resolve_device, resolve_precision

    ckpt_path = Path(checkpoint)
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if threshold_split is not None and threshold_split not in SPLITS:
        raise ConfigError(f"threshold split must be one of {', '.join(SPLITS)}, got {threshold_split!r}")
    ckpt = load_checkpoint(ckpt_path)
    meta = ckpt.metadata
    image_size = check_preprocessing(meta.get("preprocessing", {}))
    model = model_from_checkpoint(ckpt)
    train_cfg = dict(meta.get("config") or {})
    dataset = dataset or meta.get("dataset") or train_cfg.get("dataset") or "chestxray14"
    if splits is None:
        splits = _build_eval_splits(dataset, data_root or train_cfg.get("data_root"), image_size, train_cfg)
    label_names = list(ckpt.label_names)
    if list(splits.label_names) != label_names:
        raise CheckpointError(
            f"{ckpt_path} predicts {len(label_names)} findings ({', '.join(label_names[:4])}, ...) but the "
            f"{dataset} data has {len(splits.label_names)} ({', '.join(list(splits.label_names)[:4])}, ...); "
            f"evaluate it on the dataset it was trained for"
        )
    ds = getattr(splits, split, None)
    if ds is None or len(ds) == 0:
        raise DataError(f"the {dataset} data has no {split} split here; choose another with --split")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model.to(dev).to(memory_format=torch.channels_last)
    workers = default_num_workers(dev) if num_workers is None else num_workers
    out = Path(out_dir) if out_dir else ckpt_path.parent / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)

    boxes = getattr(splits, "boxes", None) if localisation else None
    log.info("scoring %d %s images (%s, %s%s)", len(ds), split, dev, prec, ", TenCrop" if tta else "")
    scored = score_split(model, ds, device=dev, precision=prec, batch_size=batch_size, tta=tta, boxes=boxes,
                         label_names=label_names, cam_threshold=cam_threshold, num_workers=workers, progress=progress)
    P, Y, M = scored["probs"], scored["labels"], scored["masks"]
    aurocs = auroc_per_class(P, Y, M)
    finite = [a for a in aurocs if math.isfinite(a)]
    mean_auroc = float(np.mean(finite)) if finite else float("nan")
    boot = bootstrap_auroc(P, Y, M, n_boot=n_bootstrap, seed=seed)
    auprc = auprc_per_class(P, Y, M)
    calib = calibration(P, Y, M)

    # thresholds: chosen on threshold_split (default val), applied to this split
    th_split = threshold_split if threshold_split and threshold_split != split else split
    if th_split != split and (getattr(splits, th_split, None) is None or len(getattr(splits, th_split)) == 0):
        log.warning("no %s split to choose thresholds on; choosing them on %s itself", th_split, split)
        th_split = split
    if th_split == split:
        ops = operating_points(P, Y, M, label_names)
    else:
        log.info("choosing operating thresholds on the %s split", th_split)
        th = score_split(model, getattr(splits, th_split), device=dev, precision=prec, batch_size=batch_size,
                         tta=tta, label_names=label_names, num_workers=workers)
        ops = operating_points(th["probs"], th["labels"], th["masks"], label_names)
    youden = {n: float(ops[n]["youden"]["threshold"]) if ops.get(n) else 0.5 for n in label_names}
    spec90 = {n: float(ops[n]["spec90"]["threshold"]) if ops.get(n) else 0.5 for n in label_names}
    at_youden = sens_spec_at(P, Y, M, [youden[n] for n in label_names])
    at_spec90 = sens_spec_at(P, Y, M, [spec90[n] for n in label_names])
    loc = summarise_localisation(scored["localisation"], label_names) if scored["localisation"] else None

    files = _write_outputs(out, label_names, scored, P, Y, M)
    files.update(write_plots(out, label_names, P, Y, M, aurocs, calib))
    summary = getattr(splits, "summary", {}) or {}
    metrics = {
        "checkpoint": str(ckpt_path), "model_version": meta.get("model_version"), "dataset": dataset,
        "split": split, "n_images": int(len(P)), "tta": tta, "mean_auroc": mean_auroc,
        "mean_auroc_ci95": list(boot["mean"]), "n_bootstrap": boot["n_boot"],
        "auroc": dict(zip(label_names, aurocs)), "auroc_ci95": {n: list(ci) for n, ci in zip(label_names, boot["per_class"])},
        "auprc": dict(zip(label_names, auprc)), "ece": calib["ece"], "ece_per_class": dict(zip(label_names, calib["per_class"])),
        "threshold_split": th_split, "thresholds_youden": youden, "thresholds_spec90": spec90,
        "at_youden": {n: {"sensitivity": s, "specificity": sp} for n, (s, sp) in zip(label_names, at_youden)},
        "at_spec90": {n: {"sensitivity": s, "specificity": sp} for n, (s, sp) in zip(label_names, at_spec90)},
        "localisation": loc, "data_manifest_hash": getattr(splits, "manifest_hash", None),
        "data_summary": summary, "evaluated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    files["metrics"] = out / "metrics.json"
    atomic_write_text(files["metrics"], json.dumps(json.loads(json_line(metrics)), indent=2))
    result = EvalResult(
        out_dir=out, checkpoint=ckpt_path, split=split, n_images=int(len(P)), label_names=label_names,
        auroc=dict(zip(label_names, aurocs)), auroc_ci=dict(zip(label_names, boot["per_class"])),
        mean_auroc=mean_auroc, mean_auroc_ci=tuple(boot["mean"]), auprc=dict(zip(label_names, auprc)),
        thresholds=youden, threshold_split=th_split, operating_points=ops, calibration=calib, localisation=loc,
        report_md=out / "report.md", report_html=out / "report.html", files=files,
    )
    note = data_note or _data_note(splits, data_root or train_cfg.get("data_root"))
    write_report(result, meta, dataset, str(data_root or train_cfg.get("data_root") or ""), summary, note,
                  at_youden, at_spec90, metrics)
    if write_thresholds:
        merged_metrics = dict(meta.get("metrics") or {})
        merged_metrics.update({f"{split}_mean_auroc": mean_auroc, f"{split}_auroc": metrics["auroc"],
                               f"{split}_auroc_ci95": metrics["auroc_ci95"], f"{split}_ece": calib["ece"]})
        update_metadata(ckpt_path, {
            "thresholds": youden,
            "thresholds_spec90": spec90,
            "operating_points": ops,
            "threshold_split": th_split,
            "metrics": json.loads(json_line(merged_metrics)),
        })
        log.info("wrote per-class thresholds (Youden J on %s) into %s", th_split, ckpt_path)
    return result


def _build_eval_splits(dataset: str, data_root: Any, image_size: int, train_cfg: Mapping[str, Any]) -> Any:
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if not data_root:
        raise ConfigError("--data-root is required: the folder holding the dataset's images and label file")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder; pass the folder that holds the {dataset} data")
    opts = {k: train_cfg[k] for k in ("val_fraction", "split_seed", "view", "max_per_patient", "allow_missing", "use_cache")
            if k in train_cfg}
    return build_datasets(dataset=dataset, data_root=root, image_size=image_size, augment=False, **opts,
                          **dict(train_cfg.get("dataset_options") or {}))


def _data_note(splits: Any, data_root: Any) -> str | None:
    summary = getattr(splits, "summary", {}) or {}
    if summary.get("synthetic") or (data_root and (Path(data_root) / PHANTOM_MARKER).exists()):
        return ("These images are synthetic phantoms generated by medxray.data.synthetic, not radiographs: the numbers "
                "check that the pipeline learns and are not comparable with the published results.")
    return None


def _write_outputs(out: Path, label_names: Sequence[str], scored: Mapping[str, Any], P: np.ndarray, Y: np.ndarray,
                   M: np.ndarray) -> dict[str, Path]:
    path = out / "predictions.csv"
    with atomic_output(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name"] + [f"p_{n}" for n in label_names] + [f"y_{n}" for n in label_names])
        for name, p, y, m in zip(scored["names"], P, Y, M):
            w.writerow([name] + [f"{v:.6f}" for v in p] + ["" if mk == 0 else int(v) for v, mk in zip(y, m)])
    files = {"predictions": path}
    if scored["localisation"]:
        lp = out / "localisation.csv"
        with atomic_output(lp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["name", "finding", "prob", "iobb", "pointing_hit", "n_boxes"])
            for r in scored["localisation"]:
                w.writerow([r["name"], r["finding"], f"{r['prob']:.6f}", f"{r['iobb']:.4f}", int(r["pointing_hit"]), r["n_boxes"]])
        files["localisation"] = lp
    return files

