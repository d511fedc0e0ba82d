"""Issue 21 items 1, 2 and 4: every gradient map of a batch from one forward pass and batched
vector-Jacobian products, each image only for the classes it needs; bf16 maps where the
Predictor runs bf16; the Predictor's probabilities and maps from one pass.

The reference is a direct per-class autograd (one backward pass per class over the batch, as
medxray computed maps before), written out here so the test does not rely on the code it checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medxray import cam as cam_mod
from medxray.cam import MAP_METHODS, compute_maps
from medxray.errors import ConfigError
from medxray.models import create_model

SIZE = 64


@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng():
        torch.manual_seed(5)
        m = create_model("densenet121", num_classes=6).eval()
        with torch.no_grad():
            m.classifier.weight.mul_(8.0)
    return m


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(9)
    return torch.randn(4, 3, SIZE, SIZE, generator=g)


def _per_class_reference(model, x, classes, method):
    """Raw maps (N, K, h, w) with one ordinary backward pass per class, then the definition."""
    spec = MAP_METHODS[method]
    (stage,) = spec.stages
    children = list(model.features.named_children())
    names = [n for n, _ in children]
    k = names.index(stage)
    out = []
    for c in classes:
        with torch.enable_grad():
            h = x.clone()
            with torch.no_grad():
                for _, mod in children[: k + 1]:
                    h = mod(h)
            a = h.detach().requires_grad_(True)
            h = a
            for _, mod in children[k + 1 :]:
                h = mod(h)
            logits = model.forward_head(F.relu(h))
            (g,) = torch.autograd.grad(logits[:, c].sum(), a)
        if spec.kind == "gradcam":
            raw = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1)
        else:
            raw = (g.clamp(min=0) * a).sum(1)
        out.append(raw.detach())
    raw = torch.stack(out, 1)
    up = F.interpolate(raw, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(min=0)
    peak = up.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 1e-6, up / peak.clamp(min=1e-6), torch.zeros_like(up)).numpy()


@pytest.mark.parametrize("method", ["layercam-denseblock1", "gradcam-denseblock3", "layercam-denseblock2"])
def test_batched_maps_equal_per_class_backward_passes(model, batch, method, capsys):
    classes = [0, 2, 3, 5]
    res = compute_maps(model, batch, classes, method=method)
    ref = _per_class_reference(model, batch, classes, method)
    diff = float(np.abs(res.maps - ref).max())
    with capsys.disabled():
        print(f"\n{method}: batched vs per-class backward, max abs difference {diff:.2e}")
    assert res.maps.shape == ref.shape == (4, 4, SIZE, SIZE)
    assert diff < 1e-5
    assert ref.max() == 1.0, "reference maps must not be trivially empty"
    assert all(p.grad is None for p in model.parameters())


def test_each_image_only_for_its_own_classes(model, batch, monkeypatch):
    classes = [0, 1, 4, 5]
    wanted = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0]], dtype=bool)
    full = compute_maps(model, batch, classes, method="layercam-denseblock1")
    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(outputs, inputs, grad_outputs=None, **kw):
        calls.append(tuple(grad_outputs.shape))
        return real_grad(outputs, inputs, grad_outputs=grad_outputs, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    part = compute_maps(model, batch, classes, method="layercam-denseblock1", wanted=wanted)
    # one batched backward call; slots = the most classes any one image needs (3), not K (4)
    assert calls == [(3, 4, 6)]
    np.testing.assert_allclose(part.maps[wanted], full.maps[wanted], atol=1e-6)
    assert not part.maps[~wanted].any() and not part.evidence[~wanted].any()
    assert part.evidence[wanted].all()
    with pytest.raises(ConfigError, match="wanted must be"):
        compute_maps(model, batch, classes, method="layercam-denseblock1", wanted=wanted[:2])


def test_gradient_rows_are_bounded_without_changing_maps(model, batch, monkeypatch):
    classes = [0, 1, 2, 3, 4, 5]
    full = compute_maps(model, batch, classes, method="gradcam-denseblock2")
    monkeypatch.setattr(cam_mod, "MAX_GRAD_ROWS", 8)  # 2 slots x 4 images per backward call
    chunked = compute_maps(model, batch, classes, method="gradcam-denseblock2")
    np.testing.assert_allclose(chunked.maps, full.maps, atol=1e-6)
    fused = compute_maps(model, batch, classes, method="layercam")  # three taps, chunked too
    monkeypatch.setattr(cam_mod, "MAX_GRAD_ROWS", 64)
    np.testing.assert_allclose(fused.maps, compute_maps(model, batch, classes, method="layercam").maps, atol=1e-6)


def test_bf16_maps_are_close_to_fp32_and_fp32_is_the_default(model, batch, capsys):
    fp32 = compute_maps(model, batch, [1, 3], method="layercam-denseblock1")
    bf16 = compute_maps(model, batch, [1, 3], method="layercam-denseblock1", precision="bf16")
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    assert bf16.maps.dtype == np.float32 and bf16.maps.shape == fp32.maps.shape
    flat, ref = bf16.maps.reshape(8, -1), fp32.maps.reshape(8, -1)
    corr = min(np.corrcoef(a, b)[0, 1] for a, b in zip(flat, ref))
    mean = float(np.abs(flat - ref).mean())
    with capsys.disabled():
        print(f"\nbf16 vs fp32 layercam-denseblock1 maps: mean abs diff {mean:.4f}, min correlation {corr:.4f}")
    assert mean < 0.03 and corr > 0.95
    np.testing.assert_allclose(bf16.logits.numpy(), fp32.logits.numpy(), atol=0.5)
    with pytest.raises(ConfigError, match="unknown map precision"):
        compute_maps(model, batch, [1], precision="fp16")


@pytest.mark.slow
def test_predictor_probabilities_and_maps_come_from_one_forward_pass(scoring_checkpoint):
    from medxray.inference import Predictor

    g = np.random.default_rng(3)
    images = [g.random((80, 72), dtype=np.float32) for _ in range(3)]
    p = Predictor.from_checkpoint(scoring_checkpoint, device="cpu", backend="torch", precision="fp32", batch_size=2)
    stem_calls = []
    # a private predictor's model: counting stem calls with a hook is safe here
    handle = p.model.features.conv0.register_forward_hook(lambda *a: stem_calls.append(1))
    try:
        probs, maps, ood = p.predict_with_cams(images, classes=["Effusion", "Mass"], with_ood=True)
    finally:
        handle.remove()
    assert len(stem_calls) == 2, "one forward pass per chunk of batch_size images, maps included"
    np.testing.assert_allclose(probs, p.predict(images), atol=1e-5)
    assert maps.shape == (3, 2, p.image_size, p.image_size)
    np.testing.assert_array_equal(maps, p.maps_tensor(p.preprocess(images), ["Effusion", "Mass"]))
    assert ood is None or ood.shape == (3,)
    ov = Predictor.from_checkpoint(scoring_checkpoint, device="cpu", backend="openvino", batch_size=2)
    if ov.backend == "openvino":  # CAM on OpenVINO: its own feature map, no torch pass at all
        torch_calls = []
        handle = ov.model.features.conv0.register_forward_hook(lambda *a: torch_calls.append(1))
        try:
            probs_cam, maps_cam = ov.predict_with_cams(images, classes=[0, 3], method="cam")
        finally:
            handle.remove()
        assert not torch_calls
        np.testing.assert_allclose(probs_cam, ov.predict(images), atol=1e-6)
        assert maps_cam.shape == (3, 2, ov.image_size, ov.image_size) and maps_cam.max() == 1.0


def test_overlays_are_drawn_at_display_size_in_the_worker(tmp_path):
    """Item 3: the decode worker shrinks the display image of a real 1955x1841 CR to the display
    long side (1024 px), so only that crosses processes; post_job draws the overlay at that size."""
    from PIL import Image
    from pydicom.data import get_testdata_file

    from medxray.display import DISPLAY_LONG_SIDE
    from medxray.scoring.config import ScoreConfig
    from medxray.scoring.messages import DecodedImage, PostTask
    from medxray.scoring.workers import decode_job, post_job

    assert ScoreConfig(input_dir=tmp_path, checkpoint=tmp_path, out=tmp_path).overlay_max_side == DISPLAY_LONG_SIDE
    path = get_testdata_file("RG1_UNCR.dcm")
    full = decode_job(path, SIZE, None, None, True)
    small = decode_job(path, SIZE, None, None, DISPLAY_LONG_SIDE)
    assert isinstance(full, DecodedImage) and isinstance(small, DecodedImage)
    assert full.display is not None and small.display is not None
    (h, w), (hs, ws) = full.display.shape, small.display.shape
    assert max(h, w) > 1800 and max(hs, ws) == DISPLAY_LONG_SIDE
    assert abs(hs / ws - h / w) < 0.01, "aspect ratio kept"
    assert small.display.dtype == np.uint8
    np.testing.assert_array_equal(small.x, full.x)  # the network input does not depend on it
    cam = np.zeros((SIZE, SIZE), np.float32)
    cam[10:30, 20:40] = 1.0
    res = post_job(
        PostTask(
            out=str(tmp_path),
            stem="rg1",
            classes=("Effusion",),
            class_probs=(0.9,),
            cams=cam[None],
            display=small.display,
            cam_method="layercam-denseblock1",
            overlay_max_side=DISPLAY_LONG_SIDE,
        )
    )
    assert not res.failed
    with Image.open(tmp_path / res.cam_dir / "Effusion.png") as im:
        assert im.size[1] == hs and im.size[0] > ws  # the image plus its colour bar
