"""medxray.cam: THE map definition (compute_maps) and its methods, no hooks, overlays that do not lie."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medxray.cam import (
    DEFAULT_MAP_METHOD,
    MAP_METHODS,
    class_activation_maps,
    compute_maps,
    maps_from_features,
    overlay,
    overlay_with_legend,
    save_png,
    upsample_cam,
)
from medxray.models import create_model


@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng():
        torch.manual_seed(3)
        m = create_model("densenet121", num_classes=5).eval()
        with torch.no_grad():
            m.classifier.weight.mul_(8.0)
    return m


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(3, 3, 96, 96, generator=g)


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def test_cam_is_features_dot_head_weights(model, batch):
    with torch.no_grad():
        feats = model.forward_features(batch)
        raw = class_activation_maps(feats, model.classifier.weight)
        logits = model(batch)
    assert raw.shape == (3, 5, 3, 3)
    # GAP is linear: the spatial mean of the raw CAM plus the bias is the logit.
    np.testing.assert_allclose(
        (raw.mean(dim=(2, 3)) + model.classifier.bias).detach().numpy(), logits.numpy(), atol=1e-4
    )
    # One position by hand.
    manual = (feats[1, :, 2, 0] * model.classifier.weight[4]).sum()
    assert torch.isclose(raw[1, 4, 2, 0], manual, atol=1e-4)
    assert _no_hooks(model)


def _definition(raw: torch.Tensor, size) -> np.ndarray:
    """The documented definition, written out: bilinear upsampling, ReLU, divide by the maximum."""
    up = F.interpolate(raw.float(), size=size, mode="bilinear", align_corners=False).clamp(min=0)
    peak = up.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 1e-6, up / peak.clamp(min=1e-6), torch.zeros_like(up)).detach().numpy()


def test_compute_maps_cam_is_the_definition_at_input_resolution(model, batch):
    res = compute_maps(model, batch, method="cam")
    assert res.maps.shape == (3, 5, 96, 96) and res.maps.dtype == np.float32 and res.method == "cam"
    assert res.maps.min() >= 0 and res.maps.max() <= 1
    peaks = res.maps.reshape(3, 5, -1).max(-1)
    assert np.all(np.isclose(peaks, 1.0) == res.evidence) and np.all(peaks[~res.evidence] == 0)
    with torch.no_grad():
        feats = model.forward_features(batch)
        np.testing.assert_allclose(res.logits.numpy(), model(batch).numpy(), atol=1e-5)
    raw = class_activation_maps(feats, model.classifier.weight)
    np.testing.assert_allclose(res.maps, _definition(raw, (96, 96)), atol=1e-5)
    sub = compute_maps(model, batch, classes=[4, 1], method="cam")
    np.testing.assert_allclose(sub.maps, res.maps[:, [4, 1]], atol=1e-6)
    # the OpenVINO path's helper is the same arithmetic on given features
    same, ok = maps_from_features(feats.numpy(), model.classifier.weight, [4, 1], (96, 96))
    np.testing.assert_allclose(same, sub.maps, atol=1e-6)
    assert np.array_equal(ok, sub.evidence)


def test_map_is_relu_over_its_peak_and_an_all_negative_map_is_zero(model, batch):
    # step 3 of the definition on known numbers (the cam method's arithmetic on given features)
    feats = torch.tensor([[[[-1.0, 2.0], [4.0, 0.0]]]])
    maps, ok = maps_from_features(feats, torch.tensor([[1.0]]), [0], (2, 2))
    np.testing.assert_allclose(maps[0, 0], [[0.0, 0.5], [1.0, 0.0]])
    assert ok[0, 0]
    maps, ok = maps_from_features(feats.abs() + 0.1, torch.tensor([[-1.0]]), [0], (2, 2))
    assert np.all(maps == 0) and not ok.any()
    # a head whose weights are all negative sees no positive evidence anywhere (features are >= 0)
    neg = create_model("densenet121", num_classes=5).eval()
    neg.load_state_dict(model.state_dict())
    with torch.no_grad():
        neg.classifier.weight.copy_(-neg.classifier.weight.abs() - 1e-3)
    res = compute_maps(neg, batch[:2], classes=[0, 1], method="cam")
    assert res.maps.shape == (2, 2, 96, 96) and np.all(res.maps == 0) and not res.evidence.any()


def _stage_output_with_grad(model, x, stage, c):
    """Reference: run the whole network with a retained intermediate and plain backward()."""
    m = create_model("densenet121", num_classes=5).eval()
    m.load_state_dict(model.state_dict())
    acts = {}
    h = x.clone()
    for name, mod in m.features.named_children():
        h = mod(h)
        if name == stage:
            h.retain_grad()
            acts[name] = h
    m.forward_head(F.relu(h))[:, c].sum().backward()
    return acts[stage].detach(), acts[stage].grad


@pytest.mark.parametrize("method", ["gradcam-denseblock3", "layercam-denseblock3", "gradcam-denseblock4"])
def test_gradient_methods_match_the_papers_formulas(model, batch, method):
    stage = MAP_METHODS[method].stages[0]
    res = compute_maps(model, batch, classes=[2], method=method)
    a, g = _stage_output_with_grad(model, batch, stage, 2)
    if MAP_METHODS[method].kind == "gradcam":  # Selvaraju et al. 2017: weights = spatial mean of the gradient
        raw = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True)
    else:  # LayerCAM (Jiang et al. 2021): each position weighted by its own positive gradient
        raw = (g.clamp(min=0) * a).sum(1, keepdim=True)
    np.testing.assert_allclose(res.maps, _definition(raw, (96, 96)), atol=1e-4)
    assert all(p.grad is None for p in model.parameters()), "maps must not write parameter gradients"
    assert _no_hooks(model)


def test_every_method_runs_and_unknown_names_are_refused(model, batch):
    assert DEFAULT_MAP_METHOD in MAP_METHODS
    x = batch[:1]
    for name in MAP_METHODS:
        res = compute_maps(model, x, classes=[0, 3], method=name)
        assert res.maps.shape == (1, 2, 96, 96) and res.maps.min() >= 0 and res.maps.max() <= 1
        assert res.evidence.shape == (1, 2) and res.method == name
    with pytest.raises(ValueError, match="unknown CAM method"):
        compute_maps(model, x, method="nope")


def test_maps_thread_safe_on_shared_model(model):
    g = torch.Generator().manual_seed(11)
    inputs = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(4)]
    methods = ("cam", "gradcam-denseblock3", "layercam")
    serial = [[compute_maps(model, x, classes=[1], method=m).maps for m in methods] for x in inputs]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(2):
                results[i] = [compute_maps(model, inputs[i], classes=[1], method=m).maps for m in methods]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(len(inputs)):
        for got, want in zip(results[i], serial[i]):
            np.testing.assert_allclose(got, want, atol=1e-4)
    assert _no_hooks(model)


def test_upsample_cam_to_original_size():
    cam = np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32)
    up = upsample_cam(cam, (1955, 1841))
    assert up.shape == (1955, 1841) and up.dtype == np.float32
    assert 0.0 <= up.min() and up.max() <= 1.0
    assert up[0, -1] > 0.9 and up[0, 0] < 0.1  # corners keep their values' order
    with pytest.raises(ValueError):
        upsample_cam(np.zeros((1, 2, 2)), (4, 4))


@pytest.mark.parametrize(
    "src,dst", [((7, 7), (224, 224)), ((56, 56), (1024, 964)), ((13, 5), (20, 3)), ((1, 1), (4, 6))]
)
def test_upsample_cam_is_torchs_half_pixel_bilinear(src, dst):
    """The numpy resampling of the torch-free overlay module equals F.interpolate(bilinear,
    align_corners=False), the resampling of the map definition, to float rounding."""
    cam = np.random.default_rng(3).random(src).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(cam)[None, None], size=dst, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(upsample_cam(cam, dst), ref[0, 0].clamp(0, 1).numpy(), rtol=0, atol=5e-6)


def test_overlay_untinted_below_floor_contour_and_legend(tmp_path):
    img = np.tile(np.linspace(0, 1, 80, dtype=np.float32), (60, 1))
    cam = np.zeros((3, 3), np.float32)
    cam[1, 1] = 1.0
    gray = overlay(img, cam, alpha=0.0)
    assert gray.shape == (60, 80, 3) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[..., 0], np.rint(img * 255).astype(np.uint8))
    hot = overlay(img, cam, alpha=1.0, cmap="jet")
    assert hot[30, 40, 0] > 100 and hot[30, 40, 2] < 100  # jet: red at the peak
    plain = np.repeat(np.rint(img * 255).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(hot[0], plain[0])  # map 0 there: the film is untinted, no blue wash
    up = upsample_cam(cam, (60, 80))
    below = up < 0.2
    np.testing.assert_array_equal(hot[below], plain[below])
    assert (hot[~below] != plain[~below]).any(axis=-1).all()
    lines = overlay(img, cam, style="contour")
    changed = (lines != plain).any(axis=-1)
    assert changed.any() and not changed[30, 40] and changed.sum() < 0.3 * changed.size  # outlines, not a fill
    with pytest.raises(ValueError, match="style"):
        overlay(img, cam, style="blur")
    leg = overlay_with_legend(img, cam, "Effusion p=0.91", mark_peak=True)
    assert leg.shape[0] == 60 and leg.shape[1] > 80 and leg.dtype == np.uint8
    bar = leg[:, 80:]
    assert len({tuple(c) for c in bar.reshape(-1, 3)}) > 20  # a colour bar is drawn
    from PIL import Image

    p = save_png(tmp_path / "sub" / "x.png", leg)
    with Image.open(p) as im:
        assert im.size == (leg.shape[1], leg.shape[0]) and im.mode == "RGB"
    assert not [f for f in (tmp_path / "sub").iterdir() if f.name.endswith(".tmp")]


@pytest.mark.parametrize("alpha,floor,cmap", [(0.4, 0.2, "jet"), (0.73, 0.05, "viridis"), (1.0, 0.5, "jet")])
def test_fill_overlay_is_the_per_pixel_blend(alpha, floor, cmap):
    """The table-gather overlay equals the blend written out pixel by pixel: rint(g (1 - a) + c a)
    in float32 where the map is >= floor, the grey itself below (values at the floor included)."""
    from matplotlib import colormaps

    rng = np.random.default_rng(7)
    img = rng.random((90, 70)).astype(np.float32)
    cam = rng.random((90, 70)).astype(np.float32) ** 2
    cam[:3] = floor
    cam[3:6] = np.nextafter(np.float32(floor), np.float32(0))
    got = overlay(img, cam, alpha=alpha, floor=floor, cmap=cmap)
    lut = np.rint(colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint8)
    grey = np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)
    want = np.repeat(grey[..., None], 3, axis=2)
    for (y, x), c in np.ndenumerate(cam):
        if c >= floor:
            heat = lut[int(np.rint(c * 255.0))].astype(np.float32)
            want[y, x] = np.rint(np.float32(grey[y, x]) * (1.0 - alpha) + heat * alpha).astype(np.uint8)
    np.testing.assert_array_equal(got, want)


def test_no_positive_evidence_is_said_in_words(monkeypatch):
    img = np.full((120, 160), 0.1, np.float32)
    empty = np.zeros((4, 4), np.float32)
    assert np.array_equal(overlay(img, empty, alpha=1.0)[..., 0], np.rint(img * 255).astype(np.uint8))
    said = []
    from PIL import ImageDraw

    real_text = ImageDraw.ImageDraw.text

    def spy(self, xy, text, *a, **k):
        said.append(text)
        return real_text(self, xy, text, *a, **k)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    leg = overlay_with_legend(img, empty, "Effusion p=0.03", finding="Effusion")
    assert "no positive evidence for Effusion" in said
    assert (leg[:120, :160] > 200).any()  # the words are on the image
    said.clear()
    overlay_with_legend(img, np.ones((4, 4), np.float32), "Effusion", finding="Effusion")
    assert not [t for t in said if "no positive evidence" in t]


def test_the_scorers_method_names_are_the_map_table():
    from medxray.scoring import CAM_METHODS

    assert CAM_METHODS[:2] == ("checkpoint", "gradcam") and set(CAM_METHODS[2:]) == set(MAP_METHODS)
