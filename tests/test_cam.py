"""medxray.cam: CAM from features x head weights (no hooks), Grad-CAM, upsampling and overlays."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from medxray.cam import (
    class_activation_maps,
    compute_cams,
    grad_cam,
    normalize_cams,
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
    np.testing.assert_allclose((raw.mean(dim=(2, 3)) + model.classifier.bias).detach().numpy(), logits.numpy(),
                               atol=1e-4)
    # One position by hand.
    manual = (feats[1, :, 2, 0] * model.classifier.weight[4]).sum()
    assert torch.isclose(raw[1, 4, 2, 0], manual, atol=1e-4)
    assert _no_hooks(model)


def test_compute_cams_normalised_and_class_subset(model, batch):
    logits, cams = compute_cams(model, batch)
    assert cams.shape == (3, 5, 3, 3) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1
    peaks = cams.reshape(3, 5, -1).max(-1)
    assert np.all((np.isclose(peaks, 1.0)) | (peaks == 0))
    _, sub = compute_cams(model, batch, classes=[4, 1])
    np.testing.assert_allclose(sub, cams[:, [4, 1]], atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(logits.numpy(), model(batch).numpy(), atol=1e-5)


def test_normalize_all_negative_map_is_zero():
    c = normalize_cams(-torch.rand(1, 1, 4, 4) - 0.1)
    assert np.all(c == 0)
    c = normalize_cams(torch.tensor([[[[-1.0, 2.0], [4.0, 0.0]]]]))
    np.testing.assert_allclose(c[0, 0], [[0.0, 0.5], [1.0, 0.0]])


def test_gradcam_at_last_layer_equals_cam(model, batch):
    # With a GAP + linear head, d logit_c / d A = W[c] / (h w): Grad-CAM == CAM after normalisation.
    _, cam = compute_cams(model, batch)
    logits, gc = grad_cam(model, batch)
    np.testing.assert_allclose(gc, cam, atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(logits.numpy(), model(batch).numpy(), atol=1e-4)
    assert all(p.grad is None for p in model.parameters()), "Grad-CAM must not write parameter gradients"
    assert _no_hooks(model)


def test_gradcam_at_earlier_stage_is_finer(model, batch):
    _, gc = grad_cam(model, batch, classes=[0, 2], layer="transition3")
    assert gc.shape == (3, 2, 3, 3)  # transition3 ends in a 2x2 pool: the final grid
    _, gc2 = grad_cam(model, batch, classes=[0, 2], layer="denseblock3")
    assert gc2.shape == (3, 2, 6, 6)
    assert gc2.min() >= 0 and gc2.max() <= 1
    with pytest.raises(ValueError, match="unknown Grad-CAM layer"):
        grad_cam(model, batch, layer="nope")


def test_cams_thread_safe_on_shared_model(model):
    g = torch.Generator().manual_seed(11)
    inputs = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(6)]
    serial = [compute_cams(model, x)[1] for x in inputs]
    serial_gc = [grad_cam(model, x, classes=[1], layer="denseblock3")[1] for x in inputs]
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = (compute_cams(model, inputs[i])[1],
                              grad_cam(model, inputs[i], classes=[1], layer="denseblock3")[1])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(len(inputs)):
        np.testing.assert_allclose(results[i][0], serial[i], atol=1e-5)
        np.testing.assert_allclose(results[i][1], serial_gc[i], atol=1e-4)
    assert _no_hooks(model)


def test_upsample_cam_to_original_size():
    cam = np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32)
    up = upsample_cam(cam, (1955, 1841))
    assert up.shape == (1955, 1841) and up.dtype == np.float32
    assert 0.0 <= up.min() and up.max() <= 1.0
    assert up[0, -1] > 0.9 and up[0, 0] < 0.1  # corners keep their values' order
    with pytest.raises(ValueError):
        upsample_cam(np.zeros((1, 2, 2)), (4, 4))


def test_overlay_blend_and_legend(tmp_path):
    img = np.tile(np.linspace(0, 1, 80, dtype=np.float32), (60, 1))
    cam = np.zeros((3, 3), np.float32)
    cam[1, 1] = 1.0
    gray = overlay(img, cam, alpha=0.0)
    assert gray.shape == (60, 80, 3) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[..., 0], np.rint(img * 255).astype(np.uint8))
    hot = overlay(img, cam, alpha=1.0, cmap="jet")
    assert tuple(hot[30, 40]) != tuple(hot[0, 0])  # peak vs background colours differ
    assert hot[30, 40, 0] > 100 and hot[0, 0, 2] > 100  # jet: red at the peak, blue where 0
    leg = overlay_with_legend(img, cam, "Effusion p=0.91")
    assert leg.shape[0] == 60 and leg.shape[1] > 80 and leg.dtype == np.uint8
    from PIL import Image

    p = save_png(tmp_path / "sub" / "x.png", leg)
    with Image.open(p) as im:
        assert im.size == (leg.shape[1], leg.shape[0]) and im.mode == "RGB"
    assert not [f for f in (tmp_path / "sub").iterdir() if f.name.endswith(".tmp")]
