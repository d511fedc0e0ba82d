"""Localisation scoring of class activation maps against ground-truth boxes.

The finding's map (:func:`medxray.cam.compute_maps`: the map the app and the scorer show, ReLU
and max-normalised to [0, 1] at the network input) is thresholded; each connected region's bounding box is
compared with the ground-truth box by IoBB (intersection over the predicted box's area) and
counted correct above T = 0.1 ... 0.9, as in Wang et al. 2017 (ChestX-ray8, CVPR). The pointing
game (Zhang et al. 2016) asks whether the CAM's maximum lies inside the box. Boxes are
(x0, y0, x1, y1) in pixels of the map, x1/y1 exclusive.

Must not import training, the evaluation job (:mod:`medxray.evaluation.run`) or report code.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medxray.cam import compute_maps

IOBB_THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
# ChestX-ray14's box file calls Infiltration "Infiltrate".
FINDING_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}


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
        return {
            "n": len(rs),
            "iobb_accuracy": {str(t): float((v > t).mean()) for t in IOBB_THRESHOLDS},
            "mean_iobb": float(v.mean()),
            "pointing_game": float(np.mean([r["pointing_hit"] for r in rs])),
        }

    per = {n: summary([r for r in records if r["finding"] == n]) for n in label_names}
    return {
        "per_finding": {k: v for k, v in per.items() if v["n"]},
        "overall": summary(list(records)),
        "thresholds": list(IOBB_THRESHOLDS),
    }


def localisation_metadata(
    summary: Mapping[str, Any] | None, *, split: str, method: str, synthetic: bool
) -> dict[str, Any]:
    """The per-finding localisation figures a checkpoint carries (JSON-able).

    ``{"method", "split", "source": "phantom"|"real", "thresholds", "per_finding": {finding:
    {"n_boxes", "pointing_game", "iobb_accuracy": {T: acc}, "mean_iobb"}}}``; a finding without
    boxes is absent (shown as "not measured", never as a number). ``summary`` is
    :func:`summarise_localisation`'s output, or None when no image had boxes.
    """
    per = {}
    for finding, s in ((summary or {}).get("per_finding") or {}).items():
        if s.get("n"):
            per[finding] = {
                "n_boxes": int(s["n"]),
                "pointing_game": float(s["pointing_game"]),
                "iobb_accuracy": {k: float(v) for k, v in s["iobb_accuracy"].items()},
                "mean_iobb": float(s["mean_iobb"]),
            }
    return {
        "method": method,
        "split": split,
        "source": "phantom" if synthetic else "real",
        "thresholds": list(IOBB_THRESHOLDS),
        "per_finding": per,
    }


def localise_batch(
    model: torch.nn.Module,
    x: torch.Tensor,
    boxes: Sequence[Sequence[Mapping[str, Any]]],
    *,
    names: Sequence[str],
    orig_sizes: Sequence[Sequence[int] | None],
    index_of: Mapping[str, int],
    probs: np.ndarray | torch.Tensor,
    method: str | None = None,
    cam_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Localisation records of a batch: one per ground-truth box of a finding the model predicts.

    The maps are :func:`medxray.cam.compute_maps` (the one map definition the app and the scorer
    show), computed with ``method`` (None = the default) only for the boxed images and classes.
    ``x``: the preprocessed batch (N, 3, S, S); ``boxes[i]``: image i's ground-truth boxes as
    ``{"finding", "x", "y", "w", "h"}`` in pixels of its original image of ``orig_sizes[i]``
    (H, W), scaled here to the input; ``probs``: (N, C). Each record holds ``iobb``,
    ``pointing_hit``, ``n_boxes``, ``name``, ``finding``, ``prob``. Images without a usable box
    or size give no records.
    """
    wanted = []
    for i, bs in enumerate(boxes):
        gts = [b for b in bs if FINDING_ALIASES.get(b["finding"], b["finding"]) in index_of]
        size = orig_sizes[i]
        if gts and size and min(size) > 0:
            wanted.append((i, gts))
    if not wanted:
        return []
    cls = sorted({index_of[FINDING_ALIASES.get(b["finding"], b["finding"])] for _, gts in wanted for b in gts})
    sel = [i for i, _ in wanted]
    res = compute_maps(model, x[sel], cls, method=method)
    side_y, side_x = int(x.shape[-2]), int(x.shape[-1])
    records = []
    for j, (i, gts) in enumerate(wanted):
        sy, sx = side_y / orig_sizes[i][0], side_x / orig_sizes[i][1]
        for b in gts:
            finding = FINDING_ALIASES.get(b["finding"], b["finding"])
            c = index_of[finding]
            gt = (b["x"] * sx, b["y"] * sy, (b["x"] + b["w"]) * sx, (b["y"] + b["h"]) * sy)
            rec = localise_one(res.maps[j, cls.index(c)], gt, cam_threshold)
            rec.update(name=names[i], finding=finding, prob=float(probs[i][c]))
            records.append(rec)
    return records
