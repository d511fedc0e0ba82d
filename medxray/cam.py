"""Class-activation maps: ONE map definition (:func:`compute_maps`), its methods, and overlays.

Every map a user or a metric sees comes from :func:`compute_maps` (or, for the CAM method on a
precomputed feature map, :func:`maps_from_features`, the same arithmetic): evaluation's
localisation scores it, the Predictor returns it to the app and the batch scorer, and the SR
references the overlays drawn from it. The definition, for class c and one image:

1. a raw map at the method's stage (below);
2. bilinear upsampling to the network input (H, W) (``align_corners=False``);
3. ReLU, then division by the map's maximum: float32 in [0, 1], 1 at the peak. A map with no
   positive value anywhere is all 0 and is flagged ``evidence=False``; callers say "no positive
   evidence for <finding>" in words instead of drawing a flat colour.

Methods (:data:`MAP_METHODS`; all run on the shared model with no hooks and no stored state, so
one model can serve many threads, as in the Streamlit app):

* ``cam``: CAM (Zhou et al., CVPR 2016), ``relu_features . W[c]`` on the last feature map
  (7x7 at 224 px), from ``model.forward_features`` and ``model.classifier``.
* ``gradcam-denseblock4``: Grad-CAM (Selvaraju et al., ICCV 2017) at the last dense block's
  output (before norm5): channel weights = spatial mean of d logit_c / d A.
* ``gradcam-denseblock3``: Grad-CAM at the third dense block's output, 14x14 at 224 px.
* ``gradcam-denseblock2``: Grad-CAM at the second dense block's output, 28x28 at 224 px.
* ``layercam-denseblock3``: LayerCAM (Jiang et al., IEEE TIP 2021) at denseblock3: every position
  weighted by its own positive gradient, ``relu(sum_k relu(dY_c/dA_k(i,j)) A_k(i,j))``.
* ``layercam-denseblock2`` / ``layercam-denseblock1``: LayerCAM at denseblock2 (28x28 at 224 px)
  and denseblock1 (56x56), the shallow layers the paper finds localise finest. ``layercam-denseblock1``
  is the default: best pointing game and IoBB on the phantom (README, bench/localisation.py).
* ``layercam``: LayerCAM fused over denseblock2 (28x28 at 224 px), denseblock3 and denseblock4:
  shallow maps scaled by ``tanh(2 M / max M)`` as in the paper, fused by element-wise maximum.

Gradient methods run ``model.features`` stage by stage, detach the earliest wanted stage's
output with ``requires_grad``, continue the forward pass from it, and take
``torch.autograd.grad`` with respect to those activations only (nothing is written into
parameters' ``.grad``). Which method is the default was measured (``bench/localisation.py``);
checkpoints record the method their localisation figures were measured with.

This module imports only torch, numpy, matplotlib/PIL (display), medxray.errors and medxray.fileio.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medxray.errors import ConfigError
from medxray.fileio import atomic_write_bytes

# ---------------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapMethod:
    """One row of the method table: ``kind`` is cam / gradcam / layercam; ``stages`` are
    ``model.features`` children whose outputs the map is computed on."""

    kind: str
    stages: tuple[str, ...] = ()
    description: str = ""


MAP_METHODS: dict[str, MapMethod] = {
    "cam": MapMethod("cam", (), "CAM on the last feature map (Zhou et al. 2016)"),
    "gradcam-denseblock4": MapMethod("gradcam", ("denseblock4",), "Grad-CAM at denseblock4 (Selvaraju et al. 2017)"),
    "gradcam-denseblock3": MapMethod("gradcam", ("denseblock3",), "Grad-CAM at denseblock3, 2x finer"),
    "gradcam-denseblock2": MapMethod("gradcam", ("denseblock2",), "Grad-CAM at denseblock2, 4x finer"),
    "layercam-denseblock2": MapMethod("layercam", ("denseblock2",), "LayerCAM at denseblock2, 4x finer"),
    "layercam-denseblock1": MapMethod("layercam", ("denseblock1",), "LayerCAM at denseblock1, 8x finer"),
    "layercam-denseblock3": MapMethod("layercam", ("denseblock3",), "LayerCAM at denseblock3 (Jiang et al. 2021)"),
    "layercam": MapMethod("layercam", ("denseblock2", "denseblock3", "denseblock4"),
                          "LayerCAM fused over denseblock2-4 (Jiang et al. 2021)"),
}
DEFAULT_MAP_METHOD = "layercam-denseblock1"  # measured best on the phantom: see bench/localisation.py, README
LAYERCAM_GAMMA = 2.0  # tanh scaling of shallow-layer maps before fusion (Jiang et al. 2021, Sec. III-C)
EVIDENCE_EPS = 1e-6   # a map whose maximum (in raw units) is below this has no positive evidence


@dataclass
class MapResult:
    """What :func:`compute_maps` returns.

    ``logits`` (N, num_classes) float32 tensor; ``maps`` (N, K, H, W) float32 numpy in [0, 1];
    ``evidence`` (N, K) bool: False where the map had no positive value (then it is all 0);
    ``classes`` the K class indices; ``method`` the method name.
    """

    logits: torch.Tensor
    maps: np.ndarray
    evidence: np.ndarray
    classes: list[int]
    method: str


def check_method(method: str | None) -> str:
    """The method name, or :data:`DEFAULT_MAP_METHOD` for None; ConfigError (a ValueError) for an
    unknown one."""
    name = DEFAULT_MAP_METHOD if method in (None, "", "default") else str(method)
    if name not in MAP_METHODS:
        raise ConfigError(f"unknown CAM method {name!r}; choose one of {', '.join(MAP_METHODS)}")
    return name


def class_activation_maps(features: torch.Tensor, weight: torch.Tensor,
                          classes: Sequence[int] | None = None) -> torch.Tensor:
    """Raw CAMs (N, K, h, w) from features (N, C, h, w) and head weights (num_classes, C)."""
    w = weight if classes is None else weight[list(classes)]
    return torch.einsum("nchw,kc->nkhw", features.float(), w.float().to(features.device))


def normalize_cams(cams: torch.Tensor | np.ndarray) -> np.ndarray:
    """ReLU then divide by each map's maximum: float32 in [0, 1]; an all-negative map is all 0."""
    return _normalise(torch.as_tensor(cams).float())[0].cpu().numpy().astype(np.float32, copy=False)


def _normalise(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = raw.float().clamp(min=0)
    peak = c.amax(dim=(-2, -1), keepdim=True)
    ok = peak > EVIDENCE_EPS
    out = torch.where(ok, c / peak.clamp(min=EVIDENCE_EPS), torch.zeros_like(c))
    return out, ok[..., 0, 0]


def _finish(raw: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2-3 of the definition: upsample (N, K, h, w) to ``size``, ReLU, divide by the max."""
    if tuple(raw.shape[-2:]) != tuple(size):
        raw = F.interpolate(raw.float(), size=size, mode="bilinear", align_corners=False)
    maps, ok = _normalise(raw)
    return maps.cpu().numpy().astype(np.float32, copy=False), ok.cpu().numpy()


def maps_from_features(features: torch.Tensor | np.ndarray, weight: torch.Tensor, classes: Sequence[int],
                       size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``cam`` method from a precomputed last feature map (N, C, h, w) (e.g. from OpenVINO).

    Returns (maps (N, K, H, W) in [0, 1], evidence (N, K) bool), exactly as :func:`compute_maps`
    with ``method="cam"`` would for the same features.
    """
    feats = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    with torch.no_grad():
        return _finish(class_activation_maps(feats, weight.detach(), classes), size)


def feature_stages(model: torch.nn.Module) -> list[str]:
    """Names of the stages of ``model.features`` (possible map stages)."""
    return [name for name, _ in model.features.named_children()]


def compute_maps(model: torch.nn.Module, x: torch.Tensor, classes: Sequence[int] | None = None,
                 method: str | None = None) -> MapResult:
    """THE class-activation maps of this project (see the module docstring for the definition).

    ``model``: a medxray DenseNet (``features`` stages, ``forward_head``, ``classifier``), in
    eval mode; it is only read. ``x``: a preprocessed batch (N, 3, H, W) on the model's device.
    ``classes``: class indices (default all). ``method``: a key of :data:`MAP_METHODS` (None =
    :data:`DEFAULT_MAP_METHOD`). Computed in float32. Returns a :class:`MapResult` with maps at
    the input resolution (N, K, H, W). Raises ValueError for an unknown method or stage.
    """
    name = check_method(method)
    spec = MAP_METHODS[name]
    n_classes = int(model.classifier.out_features)
    cls = list(range(n_classes)) if classes is None else [int(c) for c in classes]
    size = (int(x.shape[-2]), int(x.shape[-1]))
    x = x.float().contiguous()  # one layout: the same image gives the same map whatever the caller's layout
    if spec.kind == "cam":
        with torch.inference_mode():
            feats = model.forward_features(x)
            logits = model.forward_head(feats).float()
            raw = class_activation_maps(feats, model.classifier.weight, cls)
        maps, ok = _finish(raw, size)
        return MapResult(logits.detach(), maps, ok, cls, name)
    logits, per_stage = _gradient_maps(model, x, cls, spec)
    if len(per_stage) == 1:
        maps, ok = _finish(per_stage[0], size)
        return MapResult(logits, maps, ok, cls, name)
    # LayerCAM fusion: each stage normalised at the input size; shallow stages scaled by tanh(gamma * M)
    fused = None
    for k, raw in enumerate(per_stage):
        up = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
        m, _ = _normalise(up)
        if k < len(per_stage) - 1:
            m = torch.tanh(LAYERCAM_GAMMA * m) / math.tanh(LAYERCAM_GAMMA)
        fused = m if fused is None else torch.maximum(fused, m)
    maps, ok = _finish(fused, size)
    return MapResult(logits, maps, ok, cls, name)


def _gradient_maps(model: torch.nn.Module, x: torch.Tensor, cls: list[int],
                   spec: MapMethod) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and one raw map (N, K, h_s, w_s) per stage of ``spec`` (gradcam / layercam)."""
    names = feature_stages(model)
    for s in spec.stages:
        if s not in names:
            raise ConfigError(f"unknown map stage {s!r}; this model's stages are {names}")
    children = list(model.features.named_children())
    first = min(names.index(s) for s in spec.stages)
    with torch.enable_grad(), torch.inference_mode(False):
        h = x.detach().float().clone()
        with torch.no_grad():
            for _, mod in children[: first + 1]:
                h = mod(h)
        h = h.detach().requires_grad_(True)
        acts = {children[first][0]: h}
        for nm, mod in children[first + 1:]:
            h = mod(h)
            if nm in spec.stages:
                acts[nm] = h
        logits = model.forward_head(F.relu(h))
        taps = [acts[s] for s in spec.stages]
        maps: list[list[torch.Tensor]] = [[] for _ in taps]
        for j, c in enumerate(cls):
            grads = torch.autograd.grad(logits[:, c].sum(), taps, retain_graph=j < len(cls) - 1)
            for k, (a, g) in enumerate(zip(taps, grads)):
                if spec.kind == "gradcam":
                    m = (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)
                else:  # layercam: per-position positive gradients
                    m = (g.clamp(min=0) * a).sum(dim=1)
                maps[k].append(m.detach())
    return logits.detach().float(), [torch.stack(m, dim=1) for m in maps]


def grad_cam(model: torch.nn.Module, x: torch.Tensor, classes: Sequence[int] | None = None,
             layer: str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Logits and Grad-CAMs (N, K, H, W) in [0, 1] at stage ``layer`` (None = denseblock4).

    The same definition as :func:`compute_maps` (whose ``gradcam-*`` methods are this at a fixed
    stage), for callers that name an arbitrary stage.
    """
    stage = layer or "denseblock4"
    cls = list(range(int(model.classifier.out_features))) if classes is None else [int(c) for c in classes]
    logits, per_stage = _gradient_maps(model, x, cls, MapMethod("gradcam", (stage,)))
    maps, _ = _finish(per_stage[0], (int(x.shape[-2]), int(x.shape[-1])))
    return logits, maps


def no_evidence_text(finding: str) -> str:
    """The words shown instead of a map that has no positive evidence."""
    return f"no positive evidence for {finding}"


# ---------------------------------------------------------------------------------------------
# display
# ---------------------------------------------------------------------------------------------


def upsample_cam(cam_hw: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of one (h, w) map to (H, W), clipped to [0, 1], float32."""
    t = torch.as_tensor(np.asarray(cam_hw, dtype=np.float32))
    if t.dim() != 2:
        raise ValueError(f"upsample_cam takes one 2-D map, got shape {tuple(t.shape)}")
    out = F.interpolate(t[None, None], size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)
    return out[0, 0].clamp_(0.0, 1.0).numpy()


@lru_cache(maxsize=8)
def _colormap_lut(cmap: str) -> np.ndarray:
    from matplotlib import colormaps

    return np.rint(colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint8)


def _to_gray_u8(image01: np.ndarray) -> np.ndarray:
    img = np.asarray(image01)
    if img.dtype == np.uint8:
        return img
    return np.rint(np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


DISPLAY_FLOOR = 0.2  # map values below this leave the radiograph untinted
CONTOUR_LEVELS = (0.2, 0.5, 0.8)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its edge (4-neighbour erosion)."""
    inner = mask.copy()
    for _ in range(max(1, width)):
        nxt = inner.copy()
        nxt[1:, :] &= inner[:-1, :]
        nxt[:-1, :] &= inner[1:, :]
        nxt[:, 1:] &= inner[:, :-1]
        nxt[:, :-1] &= inner[:, 1:]
        inner = nxt
    return mask & ~inner


def overlay(image01: np.ndarray, cam01: np.ndarray, alpha: float = 0.4, cmap: str = "jet", *,
            floor: float = DISPLAY_FLOOR, style: str = "fill") -> np.ndarray:
    """Draw a map over a grayscale image: uint8 RGB (H, W, 3), same shape and orientation as the image.

    ``image01`` is float in [0, 1] (or uint8), (H, W); ``cam01`` in [0, 1] at any resolution
    (upsampled bilinearly when it differs). ``style="fill"`` blends the colour map with opacity
    ``alpha`` where the map is at or above ``floor`` and leaves the image untinted below it (no
    wash of colour where there is no evidence); ``style="contour"`` draws the iso-lines
    :data:`CONTOUR_LEVELS` (those >= ``floor``) in their colour-map colours instead. An all-zero
    map (no positive evidence) returns the plain image. Raises ValueError for a non-2-D image or
    an unknown style.
    """
    gray = _to_gray_u8(image01)
    if gray.ndim != 2:
        raise ValueError(f"overlay takes a 2-D grayscale image, got shape {gray.shape}")
    if style not in ("fill", "contour"):
        raise ValueError(f"overlay style must be 'fill' or 'contour', got {style!r}")
    cam = np.asarray(cam01, dtype=np.float32)
    if cam.shape != gray.shape:
        cam = upsample_cam(cam, gray.shape)
    cam = np.clip(cam, 0.0, 1.0)
    lut = _colormap_lut(cmap)
    out = np.repeat(gray[..., None], 3, axis=2)
    if style == "fill":
        a = float(np.clip(alpha, 0.0, 1.0))
        tint = cam >= max(float(floor), 1e-6)
        heat = lut[np.rint(cam[tint] * 255.0).astype(np.uint8)].astype(np.float32)
        out[tint] = np.rint(out[tint].astype(np.float32) * (1.0 - a) + heat * a).astype(np.uint8)
        return out
    width = max(1, round(max(gray.shape) / 256))
    for level in CONTOUR_LEVELS:
        if level < floor:
            continue
        edge = _outline(cam >= level, width)
        out[edge] = lut[int(round(level * 255))]
    return out


def overlay_with_legend(image01: np.ndarray, cam01: np.ndarray, title: str = "", *, alpha: float = 0.4,
                        cmap: str = "jet", footer: str = "not for clinical use", floor: float = DISPLAY_FLOOR,
                        style: str = "fill", finding: str | None = None, mark_peak: bool = False) -> np.ndarray:
    """:func:`overlay` plus a colour bar (untinted below ``floor``), a title and a footer line.

    When the map is all zero the image is left untinted and the words "no positive evidence for
    <finding>" (:func:`no_evidence_text`) are written on it. ``mark_peak`` draws a white cross
    at the map's maximum. Returns uint8 RGB (H, W + legend width, 3).
    """
    from PIL import Image, ImageDraw, ImageFont

    body = overlay(image01, cam01, alpha=alpha, cmap=cmap, floor=floor, style=style)
    h, w = body.shape[:2]
    cam = np.asarray(cam01, dtype=np.float32)
    empty = not np.any(cam > 0)
    font_px = max(10, min(48, h // 40))
    bar_w = max(8, font_px)
    pad = max(4, font_px // 2)
    legend_w = bar_w + 3 * pad + int(font_px * 2.6)
    canvas = Image.new("RGB", (w + legend_w, h), (0, 0, 0))
    canvas.paste(Image.fromarray(body), (0, 0))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=font_px)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        font = ImageFont.load_default()
    stroke = {"stroke_width": max(1, font_px // 8), "stroke_fill": (0, 0, 0)}
    top, bottom = pad + font_px + pad, h - (pad + font_px + pad)
    if bottom - top >= 8:
        ramp = np.linspace(1.0, 0.0, bottom - top)
        colours = _colormap_lut(cmap)[np.rint(ramp * 255).astype(np.uint8)]
        colours[ramp < floor] = (96, 96, 96)  # below the floor: shown untinted
        bar = np.repeat(colours[:, None, :], bar_w, axis=1)
        canvas.paste(Image.fromarray(bar), (w + pad, top))
        x_txt = w + 2 * pad + bar_w
        draw.text((x_txt, top), "high", fill=(255, 255, 255), font=font)
        y_floor = top + int(round((1.0 - floor) * (bottom - top - 1)))
        draw.text((x_txt, max(top + font_px, y_floor - font_px // 2)), f"{floor:g}", fill=(255, 255, 255), font=font)
        draw.text((x_txt, bottom - font_px), "none", fill=(255, 255, 255), font=font)
    if title:
        draw.text((pad, pad), title, fill=(255, 255, 255), font=font, **stroke)
    if empty:
        words = no_evidence_text(finding or "this finding")
        draw.text((pad, h // 2 - font_px // 2), words, fill=(255, 255, 255), font=font, **stroke)
    elif mark_peak:
        full = cam if cam.shape == (h, w) else upsample_cam(cam, (h, w))
        py, px = np.unravel_index(int(np.argmax(full)), full.shape)
        r = max(4, h // 40)
        for dx, dy in ((r, 0), (0, r)):
            draw.line([(px - dx, py - dy), (px + dx, py + dy)], fill=(0, 0, 0), width=max(3, r // 2))
            draw.line([(px - dx, py - dy), (px + dx, py + dy)], fill=(255, 255, 255), width=max(1, r // 4))
    if footer:
        draw.text((pad, h - pad - font_px), footer, fill=(255, 255, 0), font=font, **stroke)
    return np.asarray(canvas)


def save_png(path: str | os.PathLike, rgb: np.ndarray, *, compress_level: int = 3) -> Path:
    """Write an RGB array as PNG through a temp file + rename (a kill never leaves half a PNG)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="PNG", compress_level=compress_level)
    return atomic_write_bytes(path, buf.getbuffer(), fsync=False)
