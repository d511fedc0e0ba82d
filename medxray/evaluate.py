"""Evaluation of a fine-tuned checkpoint: ``evaluate(checkpoint, ...) -> EvalResult``.

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
"""

from __future__ import annotations

import csv
import datetime
import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medxray.cam import class_activation_maps
from medxray.data.synthetic import PHANTOM_MARKER
from medxray.errors import CheckpointError, ConfigError, DataError
from medxray.fileio import atomic_output, atomic_write_text

log = logging.getLogger(__name__)

IOBB_THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
SPLITS: tuple[str, ...] = ("train", "val", "test")
# ChestX-ray14's box file calls Infiltration "Infiltrate".
FINDING_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}


# --------------------------------------------------------------------------------------------
# metrics


def weighted_auroc(scores: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """AUROC for each row of ``weights`` (B, n) over samples (n,), ties counted one half.

    With integer bootstrap counts as weights this is the AUROC of each resample, computed for
    all resamples at once (a sort per class instead of one per resample).
    Returns NaN where a resample has no positive or no negative.
    """
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y) > 0.5
    W = np.ones((1, len(scores))) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if len(scores) == 0:
        return np.full(W.shape[0], np.nan)
    order = np.argsort(scores, kind="mergesort")
    s, yy, W = scores[order], y[order], W[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each run of equal scores
    gpos = np.add.reduceat(W * yy, starts, axis=1)
    gneg = np.add.reduceat(W * ~yy, starts, axis=1)
    neg_below = np.cumsum(gneg, axis=1) - gneg
    num = (gpos * (neg_below + 0.5 * gneg)).sum(1)
    den = gpos.sum(1) * gneg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def auroc_per_class(probs: np.ndarray, labels: np.ndarray, masks: np.ndarray | None = None) -> list[float]:
    """AUROC of each class over its known labels; NaN where a class lacks positives or negatives."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    masks = np.ones_like(labels) if masks is None else np.asarray(masks)
    out = []
    for c in range(probs.shape[1] if probs.ndim == 2 else 0):
        k = masks[:, c] > 0.5
        out.append(float(weighted_auroc(probs[k, c], labels[k, c])[0]))
    return out


def bootstrap_auroc(
    probs: np.ndarray, labels: np.ndarray, masks: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
    level: float = 0.95, chunk: int = 200,
) -> dict[str, Any]:
    """Percentile bootstrap CIs of per-class AUROC and of their mean (images resampled jointly)."""
    n, c = probs.shape
    if n_boot <= 0 or n == 0:
        nan = (float("nan"), float("nan"))
        return {"per_class": [nan] * c, "mean": nan, "n_boot": 0}
    rng = np.random.default_rng(seed)
    per = np.full((n_boot, c), np.nan)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)
        for j in range(c):
            k = masks[:, j] > 0.5
            per[done:done + b, j] = weighted_auroc(probs[k, j], labels[k, j], counts[:, k])
        done += b
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def ci(v: np.ndarray) -> tuple[float, float]:
        v = v[np.isfinite(v)]
        return (float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q))) if len(v) else (float("nan"),) * 2

    with np.errstate(invalid="ignore"), _nan_ok():
        means = np.nanmean(per, axis=1)
    return {"per_class": [ci(per[:, j]) for j in range(c)], "mean": ci(means), "n_boot": n_boot}


class _nan_ok:
    """Silence numpy's 'mean of empty slice' for all-NaN rows (a local, not a global, filter)."""

    def __enter__(self) -> None:
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)


def auprc_per_class(probs: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> list[float]:
    from sklearn.metrics import average_precision_score

    out = []
    for c in range(probs.shape[1]):
        k = masks[:, c] > 0.5
        y = labels[k, c] > 0.5
        out.append(float(average_precision_score(y, probs[k, c])) if 0 < y.sum() < len(y) else float("nan"))
    return out


def operating_points(
    probs: np.ndarray, labels: np.ndarray, masks: np.ndarray, label_names: Sequence[str], specificity: float = 0.9,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per class: the Youden-J threshold and the threshold reaching ``specificity`` (positive = p >= t)."""
    from sklearn.metrics import roc_curve

    out: dict[str, dict[str, dict[str, float]]] = {}
    for c, name in enumerate(label_names):
        k = masks[:, c] > 0.5
        y = labels[k, c] > 0.5
        if not 0 < y.sum() < len(y):
            out[name] = {}
            continue
        fpr, tpr, thr = roc_curve(y, probs[k, c])
        thr = np.clip(np.where(np.isfinite(thr), thr, 1.0), 0.0, 1.0)
        j = int(np.argmax(tpr - fpr))
        ok = np.flatnonzero(fpr <= 1.0 - specificity + 1e-12)
        s = int(ok[-1]) if len(ok) else 0
        key = f"spec{int(round(specificity * 100))}"
        out[name] = {
            "youden": {"threshold": float(thr[j]), "sensitivity": float(tpr[j]), "specificity": float(1 - fpr[j])},
            key: {"threshold": float(thr[s]), "sensitivity": float(tpr[s]), "specificity": float(1 - fpr[s])},
        }
    return out


def sens_spec_at(probs: np.ndarray, labels: np.ndarray, masks: np.ndarray, thresholds: Sequence[float]) -> list[tuple[float, float]]:
    """(sensitivity, specificity) of each class at a given threshold (positive = p >= t)."""
    out = []
    for c, t in enumerate(thresholds):
        k = masks[:, c] > 0.5
        y, pred = labels[k, c] > 0.5, probs[k, c] >= t
        sens = float((pred & y).sum() / y.sum()) if y.sum() else float("nan")
        spec = float((~pred & ~y).sum() / (~y).sum()) if (~y).sum() else float("nan")
        out.append((sens, spec))
    return out


def calibration(probs: np.ndarray, labels: np.ndarray, masks: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Expected calibration error over all known (image, finding) pairs, and per class.

    ECE = sum over equal-width probability bins of |observed rate - mean probability| weighted by
    the bin's share of pairs. ``bins`` holds what the reliability plot draws.
    """
    def ece_of(p: np.ndarray, y: np.ndarray) -> tuple[float, list[dict[str, float]]]:
        if len(p) == 0:
            return float("nan"), []
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
        bins, ece = [], 0.0
        for b in range(n_bins):
            sel = idx == b
            if not sel.any():
                continue
            conf, acc, share = float(p[sel].mean()), float(y[sel].mean()), float(sel.mean())
            ece += share * abs(acc - conf)
            bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "mean_prob": conf, "observed": acc,
                         "count": int(sel.sum())})
        return float(ece), bins

    known = masks > 0.5
    ece, bins = ece_of(probs[known], labels[known].astype(np.float64))
    per_class = [ece_of(probs[known[:, c], c], labels[known[:, c], c].astype(np.float64))[0]
                 for c in range(probs.shape[1])]
    return {"ece": ece, "bins": bins, "per_class": per_class, "n_bins": n_bins}


# --------------------------------------------------------------------------------------------
# localisation


def normalise01(cam: np.ndarray) -> np.ndarray:
    lo, hi = float(cam.min()), float(cam.max())
    return (cam - lo) / (hi - lo) if hi > lo else np.zeros_like(cam)


def cam_to_boxes(cam01: np.ndarray, threshold: float = 0.5) -> list[tuple[float, float, float, float]]:
    """Bounding boxes (x0, y0, x1, y1; x1/y1 exclusive) of the connected regions where cam >= threshold."""
    from scipy import ndimage

    lab, n = ndimage.label(cam01 >= threshold)
    boxes = []
    for sl in ndimage.find_objects(lab):
        if sl is None:
            continue
        ys, xs = sl
        boxes.append((float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)))
    return boxes


def iobb(pred: Sequence[float], gt: Sequence[float]) -> float:
    """Intersection over the *predicted* box's area (Wang et al. 2017)."""
    ix = max(0.0, min(pred[2], gt[2]) - max(pred[0], gt[0]))
    iy = max(0.0, min(pred[3], gt[3]) - max(pred[1], gt[1]))
    area = max(0.0, pred[2] - pred[0]) * max(0.0, pred[3] - pred[1])
    return ix * iy / area if area > 0 else 0.0


def localise_one(cam01: np.ndarray, gt_box: Sequence[float], cam_threshold: float) -> dict[str, Any]:
    """Best IoBB of the CAM's boxes against one ground-truth box, and whether the CAM's peak is inside it."""
    boxes = cam_to_boxes(cam01, cam_threshold)
    best = max((iobb(b, gt_box) for b in boxes), default=0.0)
    py, px = np.unravel_index(int(np.argmax(cam01)), cam01.shape)
    hit = gt_box[0] <= px + 0.5 <= gt_box[2] and gt_box[1] <= py + 0.5 <= gt_box[3]
    return {"iobb": float(best), "pointing_hit": bool(hit), "n_boxes": len(boxes)}


def summarise_localisation(records: Sequence[Mapping[str, Any]], label_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy (IoBB > T) per finding and overall, and the pointing-game hit rate."""
    def summary(rs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not rs:
            return {"n": 0}
        v = np.array([r["iobb"] for r in rs])
        return {"n": len(rs), "iobb_accuracy": {str(t): float((v > t).mean()) for t in IOBB_THRESHOLDS},
                "mean_iobb": float(v.mean()), "pointing_game": float(np.mean([r["pointing_hit"] for r in rs]))}

    per = {n: summary([r for r in records if r["finding"] == n]) for n in label_names}
    return {"per_finding": {k: v for k, v in per.items() if v["n"]}, "overall": summary(list(records)),
            "thresholds": list(IOBB_THRESHOLDS)}


# --------------------------------------------------------------------------------------------
# scoring


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
    """Probabilities for every image; localisation records for images that have boxes."""
    from medxray.train import IndexedDataset, autocast, make_loader

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
            gts = [b for b in boxes.get(name, []) if FINDING_ALIASES.get(b["finding"], b["finding"]) in index_of]
            orig = batch["orig_size"][i]
            if not gts or not orig or min(orig) <= 0:
                continue
            cls = sorted({index_of[FINDING_ALIASES.get(b["finding"], b["finding"])] for b in gts})
            cams = class_activation_maps(feats[i:i + 1].float(), weight, cls)
            cams = F.interpolate(cams, size=(size, size), mode="bilinear", align_corners=False)[0].cpu().numpy()
            sy, sx = size / orig[0], size / orig[1]
            for b in gts:
                finding = FINDING_ALIASES.get(b["finding"], b["finding"])
                cam01 = normalise01(cams[cls.index(index_of[finding])])
                gt = (b["x"] * sx, b["y"] * sy, (b["x"] + b["w"]) * sx, (b["y"] + b["h"]) * sy)
                rec = localise_one(cam01, gt, cam_threshold)
                rec.update(name=name, finding=finding, prob=float(p[i, index_of[finding]]))
                loc.append(rec)
    c = len(label_names)
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros((0, c), dtype=np.float32))  # noqa: E731
    return {"probs": cat(probs), "labels": cat(labels), "masks": cat(masks), "names": names, "localisation": loc}


# --------------------------------------------------------------------------------------------
# the evaluation job


@dataclass
class EvalResult:
    """Numbers and files of one evaluation."""

    out_dir: Path
    checkpoint: Path
    split: str
    n_images: int
    label_names: list[str]
    auroc: dict[str, float]
    auroc_ci: dict[str, tuple[float, float]]
    mean_auroc: float
    mean_auroc_ci: tuple[float, float]
    auprc: dict[str, float]
    thresholds: dict[str, float]
    threshold_split: str
    operating_points: dict[str, Any]
    calibration: dict[str, Any]
    localisation: dict[str, Any] | None
    report_md: Path
    report_html: Path
    files: dict[str, Path] = field(default_factory=dict)


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
    from medxray.hardware import resolve_device
    from medxray.train import default_num_workers, resolve_precision

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
    files.update(_plots(out, label_names, P, Y, M, aurocs, calib))
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
    from medxray.train import _json_dump_line

    files["metrics"] = out / "metrics.json"
    atomic_write_text(files["metrics"], json.dumps(json.loads(_json_dump_line(metrics)), indent=2))
    result = EvalResult(
        out_dir=out, checkpoint=ckpt_path, split=split, n_images=int(len(P)), label_names=label_names,
        auroc=dict(zip(label_names, aurocs)), auroc_ci=dict(zip(label_names, boot["per_class"])),
        mean_auroc=mean_auroc, mean_auroc_ci=tuple(boot["mean"]), auprc=dict(zip(label_names, auprc)),
        thresholds=youden, threshold_split=th_split, operating_points=ops, calibration=calib, localisation=loc,
        report_md=out / "report.md", report_html=out / "report.html", files=files,
    )
    note = data_note or _data_note(splits, data_root or train_cfg.get("data_root"))
    _write_report(result, meta, dataset, str(data_root or train_cfg.get("data_root") or ""), summary, note,
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
            "metrics": json.loads(_json_dump_line(merged_metrics)),
        })
        log.info("wrote per-class thresholds (Youden J on %s) into %s", th_split, ckpt_path)
    return result


def _build_eval_splits(dataset: str, data_root: Any, image_size: int, train_cfg: Mapping[str, Any]) -> Any:
    from medxray.train import DATASETS

    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if not data_root:
        raise ConfigError("--data-root is required: the folder holding the dataset's images and label file")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder; pass the folder that holds the {dataset} data")
    from medxray.data import build_datasets

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


# --------------------------------------------------------------------------------------------
# plots (matplotlib's object API: no pyplot global state)


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_output(path, "wb") as fh:
        fig.savefig(fh, format="png")


def _plots(out: Path, label_names: Sequence[str], P: np.ndarray, Y: np.ndarray, M: np.ndarray,
           aurocs: Sequence[float], calib: Mapping[str, Any]) -> dict[str, Path]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    files: dict[str, Path] = {}
    colors = [__import__("matplotlib").colormaps["tab20"](i % 20) for i in range(len(label_names))]
    for kind in ("roc", "pr"):
        fig = _figure(7.5, 6)
        ax = fig.add_subplot(1, 1, 1)
        for c, name in enumerate(label_names):
            k = M[:, c] > 0.5
            y = Y[k, c] > 0.5
            if not 0 < y.sum() < len(y):
                continue
            if kind == "roc":
                fpr, tpr, _ = roc_curve(y, P[k, c])
                ax.plot(fpr, tpr, color=colors[c], lw=1.3, label=f"{name} ({aurocs[c]:.3f})")
            else:
                prec, rec, _ = precision_recall_curve(y, P[k, c])
                ax.plot(rec, prec, color=colors[c], lw=1.3, label=f"{name} (prev. {y.mean():.2f})")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
            ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity", title="ROC curves (AUROC)")
        else:
            ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall curves")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "upper right", ncol=1)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files[kind] = out / f"{kind}.png"
        _save_figure(fig, files[kind])

    fig = _figure(5.5, 6)
    ax = fig.add_subplot(2, 1, (1, 1))
    bins = calib["bins"]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    if bins:
        ax.plot([b["mean_prob"] for b in bins], [b["observed"] for b in bins], "o-", color="tab:blue", label="model")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed frequency", title=f"Reliability (ECE {calib['ece']:.3f})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2 = fig.add_subplot(2, 1, 2)
    if bins:
        ax2.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["count"] for b in bins],
                width=1.0 / calib["n_bins"] * 0.9, color="tab:grey")
    ax2.set(xlim=(0, 1), xlabel="predicted probability", ylabel="pairs (image, finding)")
    ax2.set_yscale("log")
    fig.tight_layout()
    files["reliability"] = out / "reliability.png"
    _save_figure(fig, files["reliability"])
    return files


# --------------------------------------------------------------------------------------------
# report (one structure rendered to Markdown and to HTML)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _write_report(res: EvalResult, meta: Mapping[str, Any], dataset: str, data_root: str,
                  summary: Mapping[str, Any], note: str | None, at_youden: Sequence[tuple[float, float]],
                  at_spec90: Sequence[tuple[float, float]], metrics: Mapping[str, Any]) -> None:
    from medxray.labels import CHESTXRAY14_FINDINGS, CHEXNET_AUROC, WANG2017_AUROC

    names = res.label_names
    is_cx14 = list(names) == list(CHESTXRAY14_FINDINGS) and dataset == "chestxray14"
    blocks: list[tuple] = [("h1", "medxray evaluation report")]
    if note:
        blocks.append(("warn", note))
    pre = meta.get("preprocessing", {})
    blocks.append(("list", [
        f"Checkpoint: `{res.checkpoint}` ({meta.get('architecture')}, model version `{meta.get('model_version')}`, "
        f"{pre.get('image_size')} px, trained from `{meta.get('pretrained', 'n/a')}` initialisation)",
        f"Data: dataset `{dataset}` at `{data_root}`, split **{res.split}** ({res.n_images} images"
        + (f", {summary.get('patients', {}).get(res.split)} patients" if summary.get("patients", {}).get(res.split) else "")
        + f"), data manifest hash `{str(metrics.get('data_manifest_hash') or '')[:16]}`",
        f"Test-time augmentation: {'TenCrop (10 crops averaged)' if metrics.get('tta') else 'none'}; "
        f"bootstrap: {metrics.get('n_bootstrap')} resamples of images for 95% intervals",
        f"Evaluated {metrics.get('evaluated')}",
    ]))
    if is_cx14 and res.split == "test":
        blocks.append(("p", "The test split is ChestX-ray14's official patient-wise test list (test_list.txt, Wang et al. "
                            "2017). Wang et al.'s numbers are on that same split. CheXNet's come from its own random "
                            "70/10/20 patient split, which was never released, so they are a guide and not a like-for-like "
                            "comparison."))
    elif is_cx14:
        blocks.append(("p", f"These numbers are on the {res.split} split, not the official test list; the published "
                            "numbers beside them are test-set numbers."))

    header = ["Finding", "AUROC (95% CI)", "AUPRC", "prevalence"]
    if is_cx14:
        header += ["CheXNet 2017", "Wang et al. 2017"]
    rows = []
    for n in names:
        k = [i for i, m in enumerate(names) if m == n][0]
        lo, hi = res.auroc_ci[n]
        prev = None
        if summary.get("prevalence", {}).get(res.split):
            prev = summary["prevalence"][res.split].get(n)
        row = [n, f"{_fmt(res.auroc[n])} ({_fmt(lo)}-{_fmt(hi)})", _fmt(res.auprc[n]), _fmt(prev)]
        if is_cx14:
            row += [_fmt(CHEXNET_AUROC.get(n, float('nan'))), _fmt(WANG2017_AUROC.get(n, float('nan')))]
        rows.append(row)
        del k
    mean_row = ["**mean**", f"**{_fmt(res.mean_auroc)}** ({_fmt(res.mean_auroc_ci[0])}-{_fmt(res.mean_auroc_ci[1])})",
                _fmt(float(np.nanmean([v for v in res.auprc.values()])) if any(math.isfinite(v) for v in res.auprc.values()) else None), ""]
    if is_cx14:
        mean_row += [_fmt(float(np.mean(list(CHEXNET_AUROC.values())))), _fmt(float(np.mean(list(WANG2017_AUROC.values()))))]
    rows.append(mean_row)
    blocks += [("h2", "Per-class AUROC"), ("table", header, rows)]

    op_rows = []
    spec90 = metrics["thresholds_spec90"]
    for i, n in enumerate(names):
        op_rows.append([n, _fmt(res.thresholds[n]), _fmt(at_youden[i][0]), _fmt(at_youden[i][1]),
                        _fmt(spec90[n]), _fmt(at_spec90[i][0]), _fmt(at_spec90[i][1])])
    blocks += [("h2", "Operating points"),
               ("p", f"Thresholds were chosen on the **{res.threshold_split}** split and are applied here to the "
                     f"{res.split} split (positive = probability >= threshold). The Youden thresholds are written into "
                     f"the checkpoint's metadata, where the scorer and the viewer read them."),
               ("table", ["Finding", "Youden threshold", "sensitivity", "specificity", "90%-spec. threshold",
                          "sensitivity", "specificity"], op_rows)]
    blocks += [("h2", "Calibration"),
               ("p", f"Expected calibration error over all (image, finding) pairs with known labels: "
                     f"**{_fmt(res.calibration['ece'])}** ({res.calibration['n_bins']} equal-width bins)."),
               ("img", "reliability.png", "reliability diagram"),
               ("h2", "ROC and precision-recall curves"), ("img", "roc.png", "ROC curves"), ("img", "pr.png", "PR curves")]
    if res.localisation:
        loc = res.localisation
        lrows = []
        for n, s in list(loc["per_finding"].items()) + [("**all**", loc["overall"])]:
            lrows.append([n, str(s["n"])] + [_fmt(s["iobb_accuracy"][str(t)]) for t in IOBB_THRESHOLDS]
                         + [_fmt(s["mean_iobb"]), _fmt(s["pointing_game"])])
        blocks += [("h2", "Localisation (class activation maps)"),
                   ("p", "On images with ground-truth boxes: the finding's CAM is normalised to [0, 1], thresholded, and "
                         "each connected region's bounding box is compared with the ground truth. A box counts as "
                         "correct when IoBB (intersection over the predicted box's area) exceeds T, as in Wang et al. "
                         "2017. Pointing game: the CAM's maximum lies inside the ground-truth box."),
                   ("table", ["Finding", "boxes"] + [f"IoBB>{t}" for t in IOBB_THRESHOLDS] + ["mean IoBB", "pointing game"],
                    lrows)]
    atomic_write_text(res.out_dir / "report.md", _render_md(blocks))
    atomic_write_text(res.out_dir / "report.html", _render_html(blocks))


def _render_md(blocks: Sequence[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h1":
            out.append(f"# {b[1]}\n")
        elif kind == "h2":
            out.append(f"## {b[1]}\n")
        elif kind == "p":
            out.append(f"{b[1]}\n")
        elif kind == "warn":
            out.append(f"> **Note:** {b[1]}\n")
        elif kind == "list":
            out.append("\n".join(f"- {x}" for x in b[1]) + "\n")
        elif kind == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
            out.append("\n".join(lines) + "\n")
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})\n")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then render the two Markdown inline forms the report uses (**bold**, `code`)."""
    import re

    t = html.escape(str(text))
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _render_html(blocks: Sequence[tuple]) -> str:
    body = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "warn":
            body.append(f'<p class="warn"><b>Note:</b> {_inline(b[1])}</p>')
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(f'<p><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}"></p>')
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}.warn{background:#fff3cd;padding:.6em;border:1px solid #e0c36c}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>medxray evaluation report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
