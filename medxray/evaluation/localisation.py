"""Localisation scoring of class activation maps against ground-truth boxes.

The finding's CAM, normalised to [0, 1], is thresholded; each connected region's bounding box is
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
import torch.nn.functional as F

from medxray.cam import class_activation_maps

IOBB_THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
# ChestX-ray14's box file calls Infiltration "Infiltrate".
FINDING_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}


def normalise01(cam: np.ndarray) -> np.ndarray:
    """Min-max scale a map to [0, 1]; a constant map becomes all zeros."""
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



def localise_image(
    features: torch.Tensor, weight: torch.Tensor, boxes: Sequence[Mapping[str, Any]], *, name: str,
    orig_size: Sequence[int] | None, size: int, index_of: Mapping[str, int], probs: torch.Tensor,
    cam_threshold: float,
) -> list[dict[str, Any]]:
    """Localisation records of one image: one per ground-truth box of a finding the model predicts.

    ``features``: (1, K, h, w) final feature map; ``weight``: (C, K) classifier weights;
    ``boxes``: the image's ground-truth boxes as ``{"finding", "x", "y", "w", "h"}`` in pixels of
    the original image of ``orig_size`` (H, W); ``size``: the side of the model's square input,
    to which CAMs are upsampled and boxes scaled; ``probs``: (C,) the image's probabilities.
    Each record holds ``iobb``, ``pointing_hit``, ``n_boxes``, ``name``, ``finding``, ``prob``.
    Images without a usable box or size give no records.
    """
    gts = [b for b in boxes if FINDING_ALIASES.get(b["finding"], b["finding"]) in index_of]
    if not gts or not orig_size or min(orig_size) <= 0:
        return []
    cls = sorted({index_of[FINDING_ALIASES.get(b["finding"], b["finding"])] for b in gts})
    cams = class_activation_maps(features.float(), weight, cls)
    cams = F.interpolate(cams, size=(size, size), mode="bilinear", align_corners=False)[0].cpu().numpy()
    sy, sx = size / orig_size[0], size / orig_size[1]
    records = []
    for b in gts:
        finding = FINDING_ALIASES.get(b["finding"], b["finding"])
        cam01 = normalise01(cams[cls.index(index_of[finding])])
        gt = (b["x"] * sx, b["y"] * sy, (b["x"] + b["w"]) * sx, (b["y"] + b["h"]) * sy)
        rec = localise_one(cam01, gt, cam_threshold)
        rec.update(name=name, finding=finding, prob=float(probs[index_of[finding]]))
        records.append(rec)
    return records
