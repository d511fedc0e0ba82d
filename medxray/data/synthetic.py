"""Phantom ChestX-ray14: real manifest rows drawn as synthetic, learnable images.

``synthesize(out_dir, n_images)`` writes a data root in NIH's exact on-disk layout: 1024x1024
8-bit PNGs in ``images/``, the label CSV with its real columns and rows, ``BBox_List_2017.csv``,
``train_val_list.txt`` and ``test_list.txt``. Every row is a real row of the shipped manifest:
real image names, patients, views and labels. Whole patients are taken from both official splits
and sampled so that every finding has enough positives in train and test (rare ones such as
Hernia are oversampled). The pixels are *not* real. Each one is a smooth chest-like background
(body, lungs, mediastinum, heart, ribs, noise) plus, for every positive finding, a pattern of
its own shape and texture in a region of its own. That pattern's bounding box goes into the
box file. A small DenseNet learns this in a few CPU epochs, so ``make demo`` and the tests can
train, evaluate and draw CAMs end to end without the 42 GB download.

A phantom root always carries ``MEDXRAY_PHANTOM.json`` and ``SYNTHETIC_DATA_README.txt``, and
loading it logs a warning: nothing measured on it says anything about real radiographs.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medxray.data.manifest import PHANTOM_MARKER
from medxray.errors import ConfigError, DataError
from medxray.fileio import atomic_output
from medxray.labels import CHESTXRAY14_FINDINGS

log = logging.getLogger(__name__)

PHANTOM_VERSION = 2  # 2: patterns placed anywhere in a wide region, either lung
PHANTOM_README = "SYNTHETIC_DATA_README.txt"
IMAGE_SIZE = 1024
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
BOX_NAME = {"Infiltration": "Infiltrate"}  # NIH's box file spells it this way

Patch = tuple[np.ndarray, int, int]  # (delta, top row, left col) in 1024-pixel coordinates


# --------------------------------------------------------------------------------------------
# drawing helpers (1024-pixel coordinates; patches are local so drawing stays cheap)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


def _soft(d: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (d < 0), 0 outside, with a linear ramp of width ``edge`` pixels."""
    return np.clip(0.5 - d / max(edge, 1e-3), 0.0, 1.0)


def _disc(h: int, w: int, cy: float, cx: float, r: float, edge: float = 2.0) -> np.ndarray:
    yy, xx = _grid(h, w)
    return _soft(np.hypot(yy - cy, xx - cx) - r, edge)


def _gauss(h: int, w: int, cy: float, cx: float, sy: float, sx: float) -> np.ndarray:
    yy, xx = _grid(h, w)
    g = np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    g[g < 0.02] = 0.0  # finite support, so the box holds the whole pattern
    return g


def _ring(h: int, w: int, cy: float, cx: float, r: float, width: float) -> np.ndarray:
    yy, xx = _grid(h, w)
    return _soft(np.abs(np.hypot(yy - cy, xx - cx) - r) - width / 2, 1.5)


# --------------------------------------------------------------------------------------------
# one pattern per finding: rng -> (delta patch, top, left); centres are fractions of the side


def _atelectasis(rng: np.random.Generator) -> Patch:
    h, w = 130, 240
    yy, xx = _grid(h, w)
    tilt = math.tan(math.radians(rng.uniform(-6, 6)))
    d = np.zeros((h, w), np.float32)
    for k in range(3):  # three parallel plate-like lines
        y0 = 25 + 38 * k + rng.uniform(-4, 4)
        line = _soft(np.abs(yy - (y0 + tilt * (xx - w / 2))) - 6, 2)
        line *= _soft(np.abs(xx - w / 2) - (95 - 12 * k), 3)
        d += 0.42 * line
    return _put(rng, "Atelectasis", d)


def _cardiomegaly(rng: np.random.Generator) -> Patch:
    a, b = 150 * rng.uniform(0.93, 1.07), 118 * rng.uniform(0.93, 1.07)
    h, w = int(2 * b + 10), int(2 * a + 10)
    yy, xx = _grid(h, w)
    d = 0.32 * _soft((np.hypot((yy - h / 2) / b, (xx - w / 2) / a) - 1.0) * b, 5)
    return _put(rng, "Cardiomegaly", d)


def _effusion(rng: np.random.Generator) -> Patch:
    h, w = 150, 230
    yy, xx = _grid(h, w)
    top = 70 - 55 * (xx / w) ** 2 + rng.uniform(-8, 8)  # meniscus rising to the lateral wall
    d = 0.45 * np.clip((yy - top) / 35.0, 0.0, 1.0)
    return _put(rng, "Effusion", d.astype(np.float32))


def _infiltration(rng: np.random.Generator) -> Patch:
    h, w = 150, 180
    d = np.zeros((h, w), np.float32)
    for _ in range(16):  # patchy, blotchy opacities
        s = rng.uniform(9, 15)
        d += 0.22 * _gauss(h, w, rng.uniform(3 * s, h - 3 * s), rng.uniform(3 * s, w - 3 * s), s, s)
    return _put(rng, "Infiltration", np.minimum(d, 0.4))


def _mass(rng: np.random.Generator) -> Patch:
    r = 55 * rng.uniform(0.9, 1.12)
    n = int(2 * r + 10)
    return _put(rng, "Mass", 0.48 * _disc(n, n, n / 2, n / 2, r, 3))


def _nodule(rng: np.random.Generator) -> Patch:
    h, w = 120, 170
    d = np.zeros((h, w), np.float32)
    for cy, cx in ((30, 35), (85, 60), (40, 120), (88, 140)):  # a cluster of small round nodules
        d = np.maximum(d, 0.55 * _disc(h, w, cy + rng.uniform(-8, 8), cx + rng.uniform(-8, 8), 17, 2))
    return _put(rng, "Nodule", d)


def _pneumonia(rng: np.random.Generator) -> Patch:
    h, w = 200, 200
    d = np.zeros((h, w), np.float32)
    for dy, dx in ((0, 0), (-25, 30), (25, -25)):  # lobulated soft cloud
        d += 0.24 * _gauss(h, w, h / 2 + dy + rng.uniform(-6, 6), w / 2 + dx + rng.uniform(-6, 6), 32, 32)
    return _put(rng, "Pneumonia", np.minimum(d, 0.38))


def _pneumothorax(rng: np.random.Generator) -> Patch:
    h, w = 300, 120
    yy, xx = _grid(h, w)
    # dark band without lung markings along the lateral wall, with a bright pleural line
    edge_x = 60 + 35 * np.sin(np.pi * yy / h) + rng.uniform(-6, 6)
    inside = np.sin(np.pi * yy / h) > 0.15
    dark = _soft(xx - edge_x, 2) * inside
    line = _soft(np.abs(xx - edge_x) - 2.5, 1.5) * inside
    d = -0.28 * dark + 0.4 * line
    return _put(rng, "Pneumothorax", d.astype(np.float32))


def _consolidation(rng: np.random.Generator) -> Patch:
    h, w = 110, 190
    yy, xx = _grid(h, w)
    blob = _soft((((np.abs(yy - h / 2) / 48) ** 4 + (np.abs(xx - w / 2) / 88) ** 4) ** 0.25 - 1.0) * 40, 4)
    d = 0.45 * blob
    for k in range(3):  # dark air bronchograms crossing the dense area
        y0 = 30 + 25 * k + rng.uniform(-4, 4)
        d -= 0.25 * blob * _soft(np.abs(yy - (y0 + 0.25 * (xx - w / 2))) - 2.5, 1.5)
    return _put(rng, "Consolidation", d.astype(np.float32))


def _edema(rng: np.random.Generator) -> Patch:
    h, w = 170, 420
    d = np.zeros((h, w), np.float32)
    for cx in (95, w - 95):  # symmetric perihilar "bat-wing" haze
        d += 0.34 * _gauss(h, w, h / 2 + rng.uniform(-6, 6), cx + rng.uniform(-6, 6), 30, 36)
    yy, xx = _grid(h, w)
    stripes = (np.sin(yy * 2 * np.pi / 14) > 0.6) * (d > 0)  # fine horizontal septal lines
    d += 0.1 * stripes
    return _put(rng, "Edema", d)


def _emphysema(rng: np.random.Generator) -> Patch:
    h, w = 110, 230
    d = np.zeros((h, w), np.float32)
    for cy, cx in ((35, 35), (70, 85), (35, 130), (72, 185), (30, 200)):  # bullae: dark with thin rims
        r = rng.uniform(20, 26)
        cy, cx = cy + rng.uniform(-4, 4), cx + rng.uniform(-4, 4)
        d -= 0.32 * _disc(h, w, cy, cx, r - 2.5, 1.5)  # hyperlucent: darker on balance
        d += 0.34 * _ring(h, w, cy, cx, r, 3)
    return _put(rng, "Emphysema", d)


def _fibrosis(rng: np.random.Generator) -> Patch:
    h, w = 210, 110
    yy, xx = _grid(h, w)
    period = 20.0
    phase = rng.uniform(0, period)
    a = np.abs(((xx + yy + phase) % period) - period / 2) < 2.0  # reticular net of crossing lines
    b = np.abs(((xx - yy + phase) % period) - period / 2) < 2.0
    window = _soft((np.hypot((yy - h / 2) / (h / 2 - 4), (xx - w / 2) / (w / 2 - 4)) - 1.0) * 50, 3)
    return _put(rng, "Fibrosis", (0.38 * (a | b) * window).astype(np.float32))


def _pleural_thickening(rng: np.random.Generator) -> Patch:
    h, w = 280, 60
    yy, xx = _grid(h, w)
    centre = 30 + 8 * np.sin(yy / h * np.pi * 2 + rng.uniform(0, 6.3))
    width = 11 + 4 * np.sin(yy / 23.0)  # lumpy band along the chest wall
    band = _soft(np.abs(xx - centre) - width, 2) * _soft(np.abs(yy - h / 2) - (h / 2 - 8), 4)
    return _put(rng, "Pleural_Thickening", (0.48 * band).astype(np.float32))


def _hernia(rng: np.random.Generator) -> Patch:
    n = 120
    r = 48 * rng.uniform(0.92, 1.08)
    yy, xx = _grid(n, n)
    inner = _disc(n, n, n / 2, n / 2, r - 6, 1.5)
    d = 0.45 * _ring(n, n, n / 2, n / 2, r, 9) - 0.18 * inner
    d += 0.35 * inner * (yy > n / 2 + 6)  # air-fluid level inside the herniated bowel
    return _put(rng, "Hernia", d.astype(np.float32))


# Where each pattern goes: centre (fx, fy) as fractions of the side, uniform jitter (+-jx, +-jy)
# of the side, and whether it falls in either lung (mirrored left/right with probability 1/2).
# The jitter is wide on purpose: a finding's position is then no cue by itself, so a network has
# to recognise the pattern where it is, which is what makes its CAM land on the box.
PLACEMENT: dict[str, tuple[float, float, float, float, bool]] = {
    "Atelectasis": (0.31, 0.60, 0.05, 0.09, True),
    "Cardiomegaly": (0.57, 0.63, 0.04, 0.04, False),
    "Effusion": (0.74, 0.745, 0.03, 0.04, True),
    "Infiltration": (0.27, 0.42, 0.06, 0.15, True),
    "Mass": (0.70, 0.50, 0.08, 0.20, True),
    "Nodule": (0.30, 0.40, 0.07, 0.20, True),
    "Pneumonia": (0.72, 0.52, 0.05, 0.13, True),
    "Pneumothorax": (0.165, 0.30, 0.02, 0.07, True),
    "Consolidation": (0.30, 0.70, 0.06, 0.10, True),
    "Edema": (0.50, 0.45, 0.03, 0.10, False),
    "Emphysema": (0.70, 0.16, 0.06, 0.04, True),
    "Fibrosis": (0.18, 0.50, 0.05, 0.14, True),
    "Pleural_Thickening": (0.865, 0.40, 0.02, 0.09, True),
    "Hernia": (0.50, 0.86, 0.06, 0.03, False),
}


def _put(rng: np.random.Generator, finding: str, delta: np.ndarray) -> Patch:
    """Place a pattern: (delta, top, left) for its centre drawn from ``PLACEMENT[finding]``.

    Each pattern is drawn for the side ``fx`` names; when mirrored to the other lung the patch
    is flipped too, so lateral patterns (effusion, pneumothorax) keep facing the chest wall.
    """
    fx, fy, jx, jy, mirror = PLACEMENT[finding]
    h, w = delta.shape
    cx = (fx + rng.uniform(-jx, jx)) * IMAGE_SIZE
    cy = (fy + rng.uniform(-jy, jy)) * IMAGE_SIZE
    if mirror and rng.random() < 0.5:
        cx, delta = IMAGE_SIZE - cx, delta[:, ::-1]
    return np.ascontiguousarray(delta, dtype=np.float32), int(round(cy - h / 2)), int(round(cx - w / 2))


PATTERNS: dict[str, Callable[[np.random.Generator], Patch]] = {
    "Atelectasis": _atelectasis,
    "Cardiomegaly": _cardiomegaly,
    "Effusion": _effusion,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Emphysema": _emphysema,
    "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}
assert tuple(PATTERNS) == CHESTXRAY14_FINDINGS


# --------------------------------------------------------------------------------------------
# background and one image


def _background(rng: np.random.Generator, size: int, noise: float = 0.005) -> np.ndarray:
    """A chest-like float image in [0, 1]: drawn at 256 px, upsampled, fine noise added."""
    from PIL import Image

    n = 256
    v, u = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1)
    dx, dy = rng.uniform(-0.02, 0.02, size=2)
    sc = rng.uniform(0.96, 1.04)
    u = (u - 0.5 - dx) / sc + 0.5
    v = (v - 0.5 - dy) / sc + 0.5

    def ell(cx: float, cy: float, ax: float, ay: float, edge: float = 0.04) -> np.ndarray:
        return np.clip((1.0 - np.hypot((u - cx) / ax, (v - cy) / ay)) / edge, 0.0, 1.0)

    img = 0.05 + 0.03 * v
    img = img + 0.40 * ell(0.5, 0.60, 0.45, 0.56, 0.08)  # soft tissue of the body
    lungs = np.maximum(ell(0.31, 0.45, 0.15, 0.31), ell(0.69, 0.45, 0.14, 0.31))
    img = img - 0.24 * lungs  # aerated lungs are dark
    ribs = (0.5 + 0.5 * np.sin(2 * np.pi * (v * 10.0 + 1.6 * (u - 0.5) ** 2 + rng.uniform(0, 1)))) ** 4
    img = img + 0.06 * ribs * lungs
    img = img + 0.16 * np.clip((0.065 - np.abs(u - 0.5)) / 0.02, 0, 1) * (v > 0.08) * (v < 0.75)  # mediastinum
    img = img + 0.10 * ell(0.555, 0.63, 0.11, 0.09, 0.2)  # heart
    img = img + 0.07 * np.clip((0.025 - np.abs(u - 0.5)) / 0.01, 0, 1)  # spine
    low = rng.standard_normal((8, 8)).astype(np.float32)  # smooth patient-to-patient variation
    img = img + 0.025 * np.asarray(Image.fromarray(low, mode="F").resize((n, n), Image.BICUBIC))
    img = (img * rng.uniform(0.9, 1.1) + rng.uniform(-0.03, 0.03)).astype(np.float32)
    big = np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float32)
    if noise:
        big = big + np.float32(noise) * rng.standard_normal((size, size), dtype=np.float32)
    return big


def place_pattern(
    finding: str, key: Sequence[int], *, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, int, int, dict[str, Any]] | None:
    """Where ``finding``'s pattern goes in the image of ``key``: (delta clipped to the image, top,
    left, tight box ``{"finding", "x", "y", "w", "h"}``), or None when it falls outside the image.

    Deterministic in (finding, key) alone, so it also gives the box a pattern *would* have in an
    image that does not show it (the blanking test uses this).
    """
    if finding not in PATTERNS:
        raise ConfigError(f"unknown finding {finding!r}")
    key = [int(k) for k in key]
    delta, top, left = PATTERNS[finding](np.random.default_rng([*key, 1, CHESTXRAY14_FINDINGS.index(finding)]))
    scale = size / IMAGE_SIZE
    if scale != 1.0:
        from PIL import Image

        hh, ww = max(1, round(delta.shape[0] * scale)), max(1, round(delta.shape[1] * scale))
        delta = np.asarray(Image.fromarray(delta.astype(np.float32), mode="F").resize((ww, hh), Image.NEAREST))
        top, left = int(round(top * scale)), int(round(left * scale))
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + delta.shape[0], size), min(left + delta.shape[1], size)
    if y1 <= y0 or x1 <= x0:
        return None
    local = delta[y0 - top : y1 - top, x0 - left : x1 - left]
    nz_r = np.flatnonzero(np.any(local != 0, axis=1))
    nz_c = np.flatnonzero(np.any(local != 0, axis=0))
    if len(nz_r) == 0:
        return None
    box = {
        "finding": finding,
        "x": int(x0 + nz_c[0]),
        "y": int(y0 + nz_r[0]),
        "w": int(nz_c[-1] - nz_c[0] + 1),
        "h": int(nz_r[-1] - nz_r[0] + 1),
    }
    return local, y0, x0, box


def render_phantom(
    findings: Sequence[str], key: Sequence[int], *, size: int = IMAGE_SIZE, draw: bool = True
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One phantom image (uint8, size x size) and the box of each finding's pattern.

    ``key`` seeds everything, with independent streams for the background and for each finding.
    The same key with fewer findings therefore gives the same pixels outside the dropped
    patterns' boxes, which is how the tests prove that every box holds its pattern.
    ``draw=False`` returns the background only (and no boxes).
    """
    key = [int(k) for k in key]
    img = _background(np.random.default_rng([*key, 0]), size)
    boxes: list[dict[str, Any]] = []
    if draw:
        for f in findings:
            placed = place_pattern(f, key, size=size)
            if placed is None:
                continue
            local, y0, x0, box = placed
            img[y0 : y0 + local.shape[0], x0 : x0 + local.shape[1]] += local
            boxes.append(box)
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out, boxes


# --------------------------------------------------------------------------------------------
# choosing manifest rows


def _pick_patients(
    avail: np.ndarray,
    pos: np.ndarray,
    n_img: np.ndarray,
    budget: int,
    positive_fraction: float,
    rng: np.random.Generator,
) -> list[int]:
    """Patients (indices into ``n_img``) for one split of ``budget`` images, see :func:`select_rows`.

    ``avail`` (P,) bool: the patients that may be taken (cleared as they are); ``pos`` (P, C):
    positive images per patient and finding; ``n_img`` (P,): images per patient. First the
    finding furthest below ``positive_fraction`` of the budget draws a patient (probability
    ~ density of that finding cubed), until every finding is reached or has no candidate left;
    then patients weighted by 1 / images^2 fill the rest.
    """
    target = np.maximum(1, np.ceil(positive_fraction * budget)) * np.ones(pos.shape[1])
    have = np.zeros(pos.shape[1])
    used, chosen = 0, []
    active = np.ones(pos.shape[1], bool)
    while used < budget and active.any():
        lack = np.where(active, (target - have) / target, -np.inf)
        c = int(np.argmax(lack))
        if lack[c] <= 0:
            break
        cand = np.flatnonzero(avail & (pos[:, c] > 0) & (n_img <= budget - used))
        if len(cand) == 0:
            active[c] = False
            continue
        density = pos[cand, c] / n_img[cand]
        p = density**3
        pick = int(rng.choice(cand, p=p / p.sum()))
        avail[pick] = False
        chosen.append(pick)
        used += int(n_img[pick])
        have += pos[pick]
    while used < budget:
        cand = np.flatnonzero(avail & (n_img <= budget - used))
        if len(cand) == 0:
            break
        w = 1.0 / n_img[cand] ** 2  # favour small patients so the total lands exactly
        pick = int(rng.choice(cand, p=w / w.sum()))
        avail[pick] = False
        chosen.append(pick)
        used += int(n_img[pick])
    return chosen


def select_rows(
    n_images: int,
    seed: int = 0,
    *,
    test_fraction: float = 0.3,
    positive_fraction: float = 0.07,
    max_patient_images: int = 12,
) -> tuple[list[int], list[int]]:
    """Row indices of the shipped label file for a phantom: (train_val rows, test rows).

    Whole patients are taken from each official split until every finding has about
    ``positive_fraction`` of that split's images as positives. Patients dense in the finding
    that lacks most come first, which oversamples rare findings such as Hernia. The rest of the
    budget is filled with random patients, mostly "No Finding". The total is exactly
    ``n_images`` whenever enough small patients remain, which is always the case for real sizes.
    """
    from medxray.data.chestxray14 import read_label_file, resolve_files
    from medxray.data.manifest import read_name_list

    files = resolve_files(None)
    table = read_label_file(files["labels"])
    test_names = set(read_name_list(files["test_list"]))
    tv_names = set(read_name_list(files["train_val_list"]))
    rng = np.random.default_rng([seed, 31337])
    pats, inverse = np.unique(np.asarray(table.patients), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
    n_img = np.array([len(g) for g in groups])
    pos = np.zeros((len(groups), len(CHESTXRAY14_FINDINGS)))
    np.add.at(pos, inverse, table.labels)
    in_test = np.array([table.names[g[0]] in test_names for g in groups])
    in_tv = np.array([table.names[g[0]] in tv_names for g in groups])
    n_test = int(round(n_images * test_fraction))
    result = []
    for split_mask, budget in ((in_tv, n_images - n_test), (in_test, n_test)):
        avail = split_mask & (n_img <= max_patient_images)
        chosen = _pick_patients(avail, pos, n_img, budget, positive_fraction, rng)
        result.append(sorted(int(i) for g in chosen for i in groups[g]))
    return result[0], result[1]


# --------------------------------------------------------------------------------------------
# writing a data root


_render_state: dict[str, Any] = {}


def _render_chunk(chunk: list[tuple[int, str, str, tuple[str, ...]]]) -> list[tuple[str, list[dict[str, Any]]]]:
    from PIL import Image

    seed, size = _render_state["seed"], _render_state["size"]
    results = []
    for idx, folder, name, findings in chunk:
        img, boxes = render_phantom(findings, (seed, idx), size=size)
        with atomic_output(Path(folder) / name, "wb", fsync=False) as fh:
            Image.fromarray(img, mode="L").save(fh, format="PNG", compress_level=1)
        results.append((name, boxes))
    return results


def _init_render(seed: int, size: int) -> None:
    _render_state.update(seed=seed, size=size)


_PHANTOM_README_TEXT = (
    "SYNTHETIC PHANTOM DATA - NOT REAL RADIOGRAPHS\n\n"
    "Written by `medxray data synth` (medxray.data.synthetic). The file names, patients, views and labels are\n"
    "real rows of the NIH ChestX-ray14 manifest (Wang et al., CVPR 2017); the images are drawings: a chest-like\n"
    "background plus one artificial pattern per positive finding, whose box is in BBox_List_2017.csv.\n"
    "Use it for demos and tests only. Nothing measured on it says anything about real radiographs.\n"
)


@dataclass(frozen=True)
class PhantomPlan:
    """Which manifest rows a phantom root holds and where each image goes."""

    table: Any  # medxray.data.chestxray14 label table (the shipped label file)
    tv_rows: list[int]  # train_val rows of ``table``
    test_rows: list[int]  # test rows of ``table``
    rows: list[int]  # all rows, sorted by image name
    tasks: list[tuple[int, str, str, tuple[str, ...]]]  # (index, folder, image name, positive findings)

    def counts(self, n_boxes: int) -> dict[str, Any]:
        """The phantom marker's ``counts``: images, split sizes, patients, boxes, positives per finding."""
        table, rows = self.table, self.rows
        return {
            "images": len(rows),
            "train_val": len(self.tv_rows),
            "test": len(self.test_rows),
            "patients": len({table.patients[i] for i in rows}),
            "boxes": n_boxes,
            "positives": {f: int(table.labels[rows, c].sum()) for c, f in enumerate(CHESTXRAY14_FINDINGS)},
        }


def _check_synth_args(n_images: int, layout: str, image_size: int) -> None:
    """:class:`ConfigError` for fewer than 2 images, an unknown layout or images under 64 pixels."""
    if n_images < 2:
        raise ConfigError(f"--images must be at least 2, got {n_images}")
    if layout not in ("flat", "nested"):
        raise ConfigError(f"layout must be 'flat' or 'nested', got {layout!r}")
    if int(image_size) < 64:
        raise ConfigError(f"image_size must be at least 64, got {image_size}")


def _reuse_or_clear(out: Path, params: dict[str, Any], overwrite: bool) -> bool:
    """True when ``out`` already holds the phantom ``params`` describe (nothing to do). A phantom
    with other parameters is cleared (images and caches) with ``overwrite``, else refused; any
    other non-empty path is refused (:class:`DataError`), so nothing of the user's is touched."""
    marker = out / PHANTOM_MARKER
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except ValueError:
            old = {}
        if all(old.get(k) == v for k, v in params.items()):
            log.warning("phantom data root %s already exists (SYNTHETIC images, not real radiographs); reusing it", out)
            return True
        if not overwrite:
            raise DataError(
                f"{out} already holds a phantom data root with other parameters ({old.get('n_images')} "
                f"images, seed {old.get('seed')}); pass --overwrite to replace it, or choose a new --out"
            )
        # an older phantom with other parameters: clear its images and any cache built from them
        for d in [out / "images", out / "medxray_cache", *out.glob("images_[0-9][0-9][0-9]")]:
            if d.is_dir():
                shutil.rmtree(d)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder or a phantom data root; choose a new --out folder")
    return False


def plan_phantom(out: Path, n_images: int, seed: int, layout: str, test_fraction: float) -> PhantomPlan:
    """Choose the rows (:func:`select_rows`) and give each image its folder: ``images/`` (flat) or
    about 12 ``images_NNN/images/`` folders as NIH/Kaggle split the archive (nested)."""
    from medxray.data.chestxray14 import read_label_file, resolve_files

    tv_rows, test_rows = select_rows(n_images, seed, test_fraction=test_fraction)
    table = read_label_file(resolve_files(None)["labels"])
    rows = sorted(tv_rows + test_rows, key=lambda i: table.names[i])
    if layout == "flat":
        folders = [out / "images"] * len(rows)
    else:  # about 12 archive folders as NIH/Kaggle split them
        per = max(1, math.ceil(len(rows) / 12))
        folders = [out / f"images_{k // per + 1:03d}" / "images" for k in range(len(rows))]
    tasks = []
    for k, (i, folder) in enumerate(zip(rows, folders)):
        findings = tuple(f for f, v in zip(CHESTXRAY14_FINDINGS, table.labels[i]) if v)
        tasks.append((k, str(folder), table.names[i], findings))
    return PhantomPlan(table=table, tv_rows=tv_rows, test_rows=test_rows, rows=rows, tasks=tasks)


def _render_all(
    tasks: list[tuple[int, str, str, tuple[str, ...]]], seed: int, image_size: int, workers: int | None, progress: bool
) -> dict[str, list[dict[str, Any]]]:
    """Draw and write every image (in chunks of 16, in this process or a forked pool); returns
    each image's boxes by name."""
    from tqdm.auto import tqdm

    chunks = [tasks[j : j + 16] for j in range(0, len(tasks), 16)]
    workers = max(1, min(len(chunks), int(workers if workers is not None else min(os.cpu_count() or 1, 8))))
    boxes: dict[str, list[dict[str, Any]]] = {}
    bar = tqdm(total=len(tasks), desc="phantom images (synthetic)", unit="img", disable=not progress)
    try:
        if workers == 1:
            _init_render(int(seed), int(image_size))
            for res in map(_render_chunk, chunks):
                boxes.update(res)
                bar.update(len(res))
            _render_state.clear()
        else:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(workers, initializer=_init_render, initargs=(int(seed), int(image_size))) as pool:
                for res in pool.imap_unordered(_render_chunk, chunks):
                    boxes.update(res)
                    bar.update(len(res))
    finally:
        bar.close()
    return boxes


def _write_lists(out: Path, plan: PhantomPlan, boxes: dict[str, list[dict[str, Any]]]) -> int:
    """Write the root's label file (the chosen rows of the shipped one), the two official split
    lists, ``BBox_List_2017.csv`` in NIH's format and the README; returns the number of boxes."""
    table = plan.table

    def by_name(rows: list[int]) -> list[int]:
        return sorted(rows, key=lambda i: table.names[i])

    label_name = Path(table.path).name.removesuffix(".gz")
    (out / label_name).write_text(table.header + "\n" + "".join(table.lines[i] + "\n" for i in plan.rows))
    (out / "train_val_list.txt").write_text("".join(table.names[i] + "\n" for i in by_name(plan.tv_rows)))
    (out / "test_list.txt").write_text("".join(table.names[i] + "\n" for i in by_name(plan.test_rows)))
    lines = [BOX_HEADER]
    for name in (table.names[i] for i in plan.rows):
        for b in boxes[name]:
            lines.append(
                f"{name},{BOX_NAME.get(b['finding'], b['finding'])},{b['x']:.1f},{b['y']:.1f},{b['w']:.1f},{b['h']:.1f}"
            )
    (out / "BBox_List_2017.csv").write_text("\n".join(lines) + "\n")
    (out / PHANTOM_README).write_text(_PHANTOM_README_TEXT)
    return len(lines) - 1


def synthesize(
    out_dir: str | os.PathLike,
    n_images: int = 1000,
    seed: int = 0,
    *,
    workers: int | None = None,
    image_size: int = IMAGE_SIZE,
    layout: str = "flat",
    test_fraction: float = 0.3,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a phantom ChestX-ray14 data root to ``out_dir`` and return its path.

    ``layout``: "flat" (``images/``) or "nested" (``images_001/images/`` ... as on Kaggle).
    ``image_size`` other than 1024 is for fast tests only (boxes are then in that image's pixels).
    Re-running with the same arguments on a finished root returns at once. A non-empty folder
    that is not a phantom root is refused, so that nothing of the user's is overwritten; a phantom
    root with other parameters is replaced only with ``overwrite`` (else :class:`DataError`).
    """
    n_images = int(n_images)
    _check_synth_args(n_images, layout, image_size)
    out = Path(out_dir).expanduser()
    params = {
        "synthetic": True,
        "generator": "medxray.data.synthetic",
        "version": PHANTOM_VERSION,
        "seed": int(seed),
        "n_images": n_images,
        "image_size": int(image_size),
        "layout": layout,
        "test_fraction": test_fraction,
    }
    if _reuse_or_clear(out, params, overwrite):
        return out
    log.warning(
        "writing %d SYNTHETIC phantom images to %s: real ChestX-ray14 manifest rows drawn as artificial "
        "patterns, NOT real radiographs (for demos and tests only)",
        n_images,
        out,
    )
    t0 = time.perf_counter()
    plan = plan_phantom(out, n_images, seed, layout, test_fraction)
    out.mkdir(parents=True, exist_ok=True)
    (out / PHANTOM_MARKER).unlink(missing_ok=True)
    for f in {Path(t[1]) for t in plan.tasks}:
        f.mkdir(parents=True, exist_ok=True)
    boxes = _render_all(plan.tasks, seed, image_size, workers, progress)
    n_boxes = _write_lists(out, plan, boxes)
    counts = plan.counts(n_boxes)
    (out / PHANTOM_MARKER).write_text(
        json.dumps({**params, "counts": counts, "note": "SYNTHETIC phantom images, not real radiographs"}, indent=1)
    )
    log.warning(
        "phantom data root ready: %s (%d SYNTHETIC images, %d train_val / %d test, %.1f s)",
        out,
        len(plan.rows),
        len(plan.tv_rows),
        len(plan.test_rows),
        time.perf_counter() - t0,
    )
    return out
