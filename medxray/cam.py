"""Class-activation maps: ONE map definition (:func:`compute_maps`) and its methods.

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

Gradient methods run the model to the earliest wanted stage (``model.forward_to``), detach
that output with ``requires_grad``, continue from it with ``model.forward_from`` (which hands
back the wanted stages' outputs; stages are validated against ``model.feature_info``; BatchNorm
runs as its eval-mode affine map, ``frozen_bn=True``, whose backward pass is one multiply), and take
``torch.autograd.grad`` with respect to those activations only (nothing is written into
parameters' ``.grad``). One forward pass serves every map of a batch: all the wanted
(image, class) pairs' vector-Jacobian products are taken together as batched gradients
(``is_grads_batched=True``, a ``vmap`` over the backward pass): slot m of image i is image i's
m-th wanted class, so each image is differentiated only for the classes it needs (``wanted``),
and at most :data:`MAX_GRAD_ROWS` (image, class) rows of gradients are held at once.

Precision (``precision=``): ``"fp32"`` (the default, and what evaluation scores) or ``"bf16"``:
bf16 autocast with channels_last activations, for CPUs with native bf16 (AVX512-BF16 / AMX) and
GPUs, about 2x faster; the map is still formed (products, sums, upsampling, normalisation) in
float32. The Predictor uses bf16 maps where it runs its model in bf16; measured difference to
fp32 in tests/test_cam_batched.py and the README. Which method is the default was measured (``bench/localisation.py``);
checkpoints record the method their localisation figures were measured with.

The method table itself (:class:`MapMethod`, :data:`MAP_METHODS`, :data:`DEFAULT_MAP_METHOD`,
:func:`check_method`) lives in the torch-free :mod:`medxray.mapmethods` and is re-exported here.

Drawing maps for people (overlays, legend, PNG) lives in the torch-free :mod:`medxray.overlay`,
re-exported here. This module imports only torch, numpy, medxray.display, medxray.errors,
medxray.mapmethods and medxray.overlay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medxray.display import DISPLAY_LONG_SIDE, fit_display  # noqa: F401  (re-exported: the display size)
from medxray.errors import ConfigError
from medxray.mapmethods import DEFAULT_MAP_METHOD, MAP_METHODS, MapMethod, check_method  # noqa: F401  (re-exported)
from medxray.overlay import (  # noqa: F401  (re-exported: drawing maps lives in the torch-free medxray.overlay)
    CONTOUR_LEVELS,
    DISPLAY_FLOOR,
    no_evidence_text,
    overlay,
    overlay_with_legend,
    save_png,
    upsample_cam,
)

if TYPE_CHECKING:
    from medxray.models.densenet import DenseNet

# ---------------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------------


LAYERCAM_GAMMA = 2.0  # tanh scaling of shallow-layer maps before fusion (Jiang et al. 2021, Sec. III-C)
EVIDENCE_EPS = 1e-6  # a map whose maximum (in raw units) is below this has no positive evidence
MAP_PRECISIONS = ("fp32", "bf16")
# (image, class) rows of batched gradients held at once. Bounds memory: one row of denseblock1
# gradients at 224 px is 256 x 56 x 56 floats (3.2 MB fp32), so 64 rows hold ~0.2 GB per tensor.
MAX_GRAD_ROWS = 64


@dataclass
class MapResult:
    """What :func:`compute_maps` returns.

    ``logits`` (N, num_classes) float32 tensor; ``maps`` (N, K, H, W) float32 numpy in [0, 1];
    ``evidence`` (N, K) bool: False where the map had no positive value (then it is all 0), or
    where the pair was not wanted (not computed: all 0); ``classes`` the K class indices;
    ``method`` the method name; ``features`` the last feature map (N, F, h, w) float32 of the
    same forward pass (after norm5 + ReLU: what OOD statistics pool), ``precision`` fp32 / bf16.
    """

    logits: torch.Tensor
    maps: np.ndarray
    evidence: np.ndarray
    classes: list[int]
    method: str
    features: torch.Tensor | None = None
    precision: str = "fp32"


def class_activation_maps(
    features: torch.Tensor, weight: torch.Tensor, classes: Sequence[int] | None = None
) -> torch.Tensor:
    """Raw CAMs (N, K, h, w) from features (N, C, h, w) and head weights (num_classes, C)."""
    w = weight if classes is None else weight[list(classes)]
    return torch.einsum("nchw,kc->nkhw", features.float(), w.float().to(features.device))


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


def maps_from_features(
    features: torch.Tensor | np.ndarray, weight: torch.Tensor, classes: Sequence[int], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The ``cam`` method from a precomputed last feature map (N, C, h, w) (e.g. from OpenVINO).

    Returns (maps (N, K, H, W) in [0, 1], evidence (N, K) bool), exactly as :func:`compute_maps`
    with ``method="cam"`` would for the same features.
    """
    feats = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    with torch.no_grad():
        return _finish(class_activation_maps(feats, weight.detach(), classes), size)


def feature_stages(model: DenseNet) -> list[str]:
    """Names of the stages of ``model.features`` (possible map stages), from ``model.feature_info``."""
    return [f.module for f in model.feature_info]


def compute_maps(
    model: DenseNet,
    x: torch.Tensor,
    classes: Sequence[int] | None = None,
    method: str | None = None,
    *,
    wanted: np.ndarray | torch.Tensor | None = None,
    precision: str = "fp32",
) -> MapResult:
    """THE class-activation maps of this project (see the module docstring for the definition).

    ``model``: a medxray DenseNet (``features`` stages, ``forward_head``, ``classifier``), in
    eval mode; it is only read. ``x``: a preprocessed batch (N, 3, H, W) on the model's device.
    ``classes``: class indices (default all). ``method``: a key of :data:`MAP_METHODS` (None =
    :data:`DEFAULT_MAP_METHOD`). ``wanted``: optional (N, K) bool, which (image, class) maps to
    compute (default all); the others are returned all 0 with ``evidence=False``. Gradient
    methods take one forward pass and one batched backward pass per :data:`MAX_GRAD_ROWS` rows.
    ``precision``: "fp32" (default; evaluation) or "bf16" (autocast + channels_last; the map
    arithmetic stays float32). Returns a :class:`MapResult` with maps at the input resolution
    (N, K, H, W). Raises ConfigError (a ValueError) for an unknown method, stage, precision or
    a ``wanted`` of the wrong shape.
    """
    name = check_method(method)
    if precision not in MAP_PRECISIONS:
        raise ConfigError(f"unknown map precision {precision!r}; choose one of {', '.join(MAP_PRECISIONS)}")
    spec = MAP_METHODS[name]
    n_classes = int(model.classifier.out_features)
    cls = list(range(n_classes)) if classes is None else [int(c) for c in classes]
    want = _wanted_mask(wanted, int(x.shape[0]), len(cls))
    size = (int(x.shape[-2]), int(x.shape[-1]))
    bf16 = precision == "bf16"
    # one layout per precision: the same image gives the same map whatever the caller's layout
    x = x.float().contiguous(memory_format=torch.channels_last if bf16 else torch.contiguous_format)
    if spec.kind == "cam":
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            feats = model.forward_features(x).float()
        with torch.inference_mode():
            logits = model.forward_head(feats).float()
            raw = class_activation_maps(feats, model.classifier.weight, cls)
        maps, ok = _finish(raw, size)
        return _masked(MapResult(logits.detach(), maps, ok, cls, name, feats.detach(), precision), want)
    logits, feats, per_stage = _gradient_maps(model, x, cls, spec, want, bf16)
    if len(per_stage) == 1:
        maps, ok = _finish(per_stage[0], size)
        return _masked(MapResult(logits, maps, ok, cls, name, feats, precision), want)
    # LayerCAM fusion: each stage normalised at the input size; shallow stages scaled by tanh(gamma * M)
    fused = None
    for k, raw in enumerate(per_stage):
        up = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
        m, _ = _normalise(up)
        if k < len(per_stage) - 1:
            m = torch.tanh(LAYERCAM_GAMMA * m) / math.tanh(LAYERCAM_GAMMA)
        fused = m if fused is None else torch.maximum(fused, m)
    assert fused is not None  # at least one stage (MapMethod has one or more)
    maps, ok = _finish(fused, size)
    return _masked(MapResult(logits, maps, ok, cls, name, feats, precision), want)


def _wanted_mask(wanted: np.ndarray | torch.Tensor | None, n: int, k: int) -> torch.Tensor | None:
    """``wanted`` as an (N, K) bool tensor on the CPU, or None for "every pair"."""
    if wanted is None:
        return None
    w = torch.as_tensor(np.asarray(wanted.cpu() if isinstance(wanted, torch.Tensor) else wanted, dtype=bool))
    if tuple(w.shape) != (n, k):
        raise ConfigError(f"wanted must be (images, classes) = ({n}, {k}), got {tuple(w.shape)}")
    return w


def _masked(res: MapResult, want: torch.Tensor | None) -> MapResult:
    """Unwanted pairs: all 0, no evidence (the CAM method computes every pair at once)."""
    if want is not None and not bool(want.all()):
        keep = want.numpy()
        res.maps[~keep] = 0.0
        res.evidence = res.evidence & keep
    return res


def _gradient_maps(
    model: DenseNet,
    x: torch.Tensor,
    cls: list[int],
    spec: MapMethod,
    want: torch.Tensor | None = None,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Logits (N, C), the last feature map (N, F, h, w) and one raw map (N, K, h_s, w_s) per
    stage of ``spec`` (gradcam / layercam), from one forward pass and batched backward passes.

    Slot m of image i holds image i's m-th wanted class; the gradient outputs of slot m are
    one-hot at (i, that class), so one batched backward row per slot and image gives every
    wanted (image, class) pair (images in eval mode do not interact). Unwanted pairs stay 0.
    """
    names = feature_stages(model)
    for s in spec.stages:
        if s not in names:
            raise ConfigError(f"unknown map stage {s!r}; this model's stages are {names}")
    first = names[min(names.index(s) for s in spec.stages)]
    n, k = int(x.shape[0]), len(cls)
    slots = [list(range(k)) if want is None else torch.nonzero(want[i]).flatten().tolist() for i in range(n)]
    n_slots = max((len(s) for s in slots), default=0)
    dev = x.device
    with torch.enable_grad(), torch.inference_mode(False), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            h = model.forward_to(x.detach().clone(), first)
        h = h.detach().requires_grad_(True)
        # the rest of the network from the earliest wanted stage, with its taps (models.densenet)
        feats, acts = model.forward_from(h, first, taps=spec.stages, frozen_bn=True)
        logits = model.forward_head(feats)
        taps = [acts[s] for s in spec.stages]
        raw = [torch.zeros((n, k, *a.shape[-2:]), dtype=torch.float32, device=dev) for a in taps]
        per_call = max(1, MAX_GRAD_ROWS // max(1, n))  # slots per batched backward call
        for m0 in range(0, n_slots, per_call):
            m1 = min(n_slots, m0 + per_call)
            onehot = torch.zeros((m1 - m0, *logits.shape), dtype=logits.dtype, device=dev)
            pairs = [(m, i, s[m]) for i, s in enumerate(slots) for m in range(m0, min(m1, len(s)))]
            for m, i, j in pairs:
                onehot[m - m0, i, cls[j]] = 1
            grads = torch.autograd.grad(
                logits, taps, grad_outputs=onehot, is_grads_batched=True, retain_graph=m1 < n_slots
            )
            for t, (a, g) in enumerate(zip(taps, grads)):
                a32, g32 = a.detach().float(), g.float()  # (N, C_s, h, w), (slots, N, C_s, h, w)
                if spec.kind == "gradcam":
                    m_all = (g32.mean(dim=(3, 4), keepdim=True) * a32).sum(dim=2)
                else:  # layercam: per-position positive gradients
                    m_all = (g32.clamp(min=0) * a32).sum(dim=2)
                for m, i, j in pairs:
                    raw[t][i, j] = m_all[m - m0, i]
            del grads  # free this call's gradients before the next one
    return logits.detach().float(), feats.detach().float(), raw
