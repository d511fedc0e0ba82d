"""Class-activation maps (CAM, Grad-CAM) and their overlays.

CAM (Zhou et al., CVPR 2016) for class c is ``relu_features . W[c]``: the head's weights
applied at every position of the last feature map, computed from ``model.forward_features``
and ``model.classifier``. Nothing is registered on the model (no hooks, no stored
activations), so one model can serve many threads at once (the Streamlit app shares one).

Grad-CAM (Selvaraju et al., ICCV 2017) weights a feature map by the spatial mean of the
gradient of the class logit. At the last feature map of a global-average-pooled linear head it
equals CAM up to a positive factor; its use is at an earlier stage (``layer="transition3"``),
where maps are finer. It runs the stages of ``model.features`` one by one to get that
intermediate map, again without hooks.

Maps are normalised per image and class to [0, 1] after a ReLU (0 = no positive evidence),
then upsampled to the image size and blended over the radiograph with a colour map and a
legend.
"""

from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medxray.fileio import atomic_write_bytes

# ---------------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------------


def class_activation_maps(features: torch.Tensor, weight: torch.Tensor,
                          classes: Sequence[int] | None = None) -> torch.Tensor:
    """Raw CAMs (N, K, h, w) from features (N, C, h, w) and head weights (num_classes, C)."""
    w = weight if classes is None else weight[list(classes)]
    return torch.einsum("nchw,kc->nkhw", features.float(), w.float())


def normalize_cams(cams: torch.Tensor | np.ndarray) -> np.ndarray:
    """ReLU then divide by each map's maximum: float32 in [0, 1]; an all-negative map is all 0."""
    c = torch.as_tensor(cams).float().clamp(min=0)
    peak = c.amax(dim=(-2, -1), keepdim=True)
    out = torch.where(peak > 0, c / peak.clamp(min=1e-12), torch.zeros_like(c))
    return out.cpu().numpy().astype(np.float32, copy=False)


def compute_cams(model: torch.nn.Module, x: torch.Tensor,
                 classes: Sequence[int] | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Logits (N, num_classes) and normalised CAMs (N, K, h, w) in one forward pass."""
    with torch.inference_mode():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        cams = class_activation_maps(feats, model.classifier.weight, classes)
    return logits.float(), normalize_cams(cams)


def feature_stages(model: torch.nn.Module) -> list[str]:
    """Names of the stages of ``model.features`` usable as Grad-CAM layers."""
    return [name for name, _ in model.features.named_children()]


def grad_cam(model: torch.nn.Module, x: torch.Tensor, classes: Sequence[int] | None = None,
             layer: str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Logits and normalised Grad-CAMs (N, K, h', w') at ``layer`` (None = last feature map).

    Thread-safe on a shared model: gradients are taken with ``torch.autograd.grad`` with
    respect to the activation only, so no ``.grad`` is written into the parameters.
    """
    names = feature_stages(model)
    if layer is not None and layer not in names:
        raise ValueError(f"unknown Grad-CAM layer {layer!r}; choose one of {names}")
    n_classes = model.classifier.out_features
    cls = list(range(n_classes)) if classes is None else list(classes)
    with torch.enable_grad(), torch.inference_mode(False):
        x = x.detach().clone()
        if layer is None:
            act = model.forward_features(x).detach().requires_grad_(True)
            logits = model.forward_head(act)
        else:
            h = x
            children = list(model.features.named_children())
            cut = names.index(layer)
            with torch.no_grad():
                for _, mod in children[: cut + 1]:
                    h = mod(h)
            act = h.detach().requires_grad_(True)
            h = act
            for _, mod in children[cut + 1:]:
                h = mod(h)
            logits = model.forward_head(F.relu(h))
        maps = []
        for c in cls:
            (g,) = torch.autograd.grad(logits[:, c].sum(), act, retain_graph=True)
            weights = g.mean(dim=(2, 3), keepdim=True)
            maps.append((weights * act).sum(dim=1))
        cams = torch.stack(maps, dim=1).detach()
    return logits.detach().float(), normalize_cams(cams)


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


def overlay(image01: np.ndarray, cam01: np.ndarray, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """Blend a CAM over a grayscale image: uint8 RGB (H, W, 3).

    ``image01`` is float in [0, 1] (or uint8); ``cam01`` is in [0, 1] at any resolution and is
    upsampled to the image when smaller.
    """
    gray = _to_gray_u8(image01)
    if gray.ndim != 2:
        raise ValueError(f"overlay takes a 2-D grayscale image, got shape {gray.shape}")
    cam = np.asarray(cam01, dtype=np.float32)
    if cam.shape != gray.shape:
        cam = upsample_cam(cam, gray.shape)
    heat = _colormap_lut(cmap)[np.rint(np.clip(cam, 0.0, 1.0) * 255.0).astype(np.uint8)]
    a = float(np.clip(alpha, 0.0, 1.0))
    out = gray[..., None].astype(np.float32) * (1.0 - a) + heat.astype(np.float32) * a
    return np.rint(out).astype(np.uint8)


def overlay_with_legend(image01: np.ndarray, cam01: np.ndarray, title: str = "", *, alpha: float = 0.4,
                        cmap: str = "jet", footer: str = "not for clinical use") -> np.ndarray:
    """:func:`overlay` plus a colour bar (low..high activation), a title and a footer line."""
    from PIL import Image, ImageDraw, ImageFont

    body = overlay(image01, cam01, alpha=alpha, cmap=cmap)
    h, w = body.shape[:2]
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
    top, bottom = pad + font_px + pad, h - (pad + font_px + pad)
    if bottom - top >= 8:
        ramp = np.linspace(1.0, 0.0, bottom - top)
        colours = _colormap_lut(cmap)[np.rint(ramp * 255).astype(np.uint8)]
        bar = np.repeat(colours[:, None, :], bar_w, axis=1)
        canvas.paste(Image.fromarray(bar), (w + pad, top))
        draw.text((w + 2 * pad + bar_w, top), "high", fill=(255, 255, 255), font=font)
        draw.text((w + 2 * pad + bar_w, bottom - font_px), "low", fill=(255, 255, 255), font=font)
    if title:
        draw.text((pad, pad), title, fill=(255, 255, 255), font=font, stroke_width=max(1, font_px // 8),
                  stroke_fill=(0, 0, 0))
    if footer:
        draw.text((pad, h - pad - font_px), footer, fill=(255, 255, 0), font=font,
                  stroke_width=max(1, font_px // 8), stroke_fill=(0, 0, 0))
    return np.asarray(canvas)


def save_png(path: str | os.PathLike, rgb: np.ndarray, *, compress_level: int = 3) -> Path:
    """Write an RGB array as PNG through a temp file + rename (a kill never leaves half a PNG)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="PNG", compress_level=compress_level)
    return atomic_write_bytes(path, buf.getbuffer(), fsync=False)
