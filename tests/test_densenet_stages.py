"""DenseNet stage contract: ``feature_info`` against real forward passes, ``forward_to`` / ``forward_from``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medxray.errors import ConfigError, InputShapeError
from medxray.models import VARIANTS, FeatureInfo, create_model


def _side(name: str) -> int:
    # ImageNet variants at 64 px (a multiple of their total stride 32, 2x2 at norm5, ~12x cheaper
    # than 224 px); CIFAR variants at their own 32 px.
    return 64 if VARIANTS[name].stem == "imagenet" else 32


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    """A random model in eval mode whose BatchNorms have non-trivial running statistics and affine
    parameters, so that a stage run twice or skipped would show in the outputs."""
    torch.manual_seed(seed)
    m = create_model(name, num_classes=5)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.eval()


def _stage_outputs(model, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """model(x) and a copy of every child of ``model.features``'s output, taken by forward hooks
    on the plain forward pass (clones: ``relu0`` runs in place on ``norm0``'s output)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        mod.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.detach().clone()))
        for name, mod in model.features.named_children()
    ]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    return y, seen


@pytest.mark.parametrize("name", list(VARIANTS))
def test_feature_info_matches_a_real_forward_pass(name):
    m = _model(name)
    side = _side(name)
    _, seen = _stage_outputs(m, torch.randn(1, 3, side, side))
    info = m.feature_info
    assert isinstance(info, tuple) and all(isinstance(f, FeatureInfo) for f in info)
    assert [f.module for f in info] == [n for n, _ in m.features.named_children()]
    for f in info:
        assert tuple(seen[f.module].shape) == (1, f.num_chs, side // f.reduction, side // f.reduction), f
    assert info[-1].module == "norm5" and info[-1].num_chs == m.num_features
    n_blocks = len(VARIANTS[name].block_config)
    blocks = [f.module for f in info if f.module.startswith("denseblock")]
    assert blocks == [f"denseblock{i + 1}" for i in range(n_blocks)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        info[0].num_chs = 1  # type: ignore[misc]


def test_feature_info_densenet121_known_numbers():
    # torchvision's densenet121 (Huang et al. 2017, Table 1) at 224 px: 56, 28, 14, 7.
    got = {f.module: (f.num_chs, f.reduction) for f in create_model("densenet121").feature_info}
    assert got == {
        "conv0": (64, 2),
        "norm0": (64, 2),
        "relu0": (64, 2),
        "pool0": (64, 4),
        "denseblock1": (256, 4),
        "transition1": (128, 8),
        "denseblock2": (512, 8),
        "transition2": (256, 16),
        "denseblock3": (1024, 16),
        "transition3": (512, 32),
        "denseblock4": (1024, 32),
        "norm5": (1024, 32),
    }
    # CIFAR DenseNet-BC-100 (k=12, 2k=24 initial maps, theta=0.5): 32, 16, 8 px.
    got = {f.module: (f.num_chs, f.reduction) for f in create_model("densenet_bc_100_k12", 10).feature_info}
    assert got == {
        "conv0": (24, 1),
        "denseblock1": (216, 1),
        "transition1": (108, 2),
        "denseblock2": (300, 2),
        "transition2": (150, 4),
        "denseblock3": (342, 4),
        "norm5": (342, 4),
    }


@pytest.mark.parametrize("frozen_bn", [False, True])
@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet_40_k12", "densenet_bc_100_k12"])
def test_forward_to_then_from_equals_the_model_at_every_stage(name, frozen_bn):
    m = _model(name, seed=1)
    side = _side(name)
    x = torch.randn(2, 3, side, side)
    y, seen = _stage_outputs(m, x)
    stages = [f.module for f in m.feature_info]
    with torch.no_grad():
        feats = m.forward_features(x)
        for k, s in enumerate(stages):
            h = m.forward_to(x, s)
            torch.testing.assert_close(h, seen[s], rtol=1e-5, atol=1e-5)
            later = stages[k:]
            h_before = h.clone()
            final, taps = m.forward_from(h, s, taps=later, frozen_bn=frozen_bn)
            assert torch.equal(h, h_before), f"forward_from({s!r}) changed its input in place"
            torch.testing.assert_close(m.forward_head(final), y, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(final, feats, rtol=1e-5, atol=1e-5)
            assert set(taps) == set(later) and taps[s] is h
            for t in later:
                torch.testing.assert_close(taps[t], seen[t], rtol=1e-5, atol=1e-5)
            assert m.forward_from(h, s)[1] == {}


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_gradients_through_forward_from_equal_the_full_model(frozen_bn):
    """The map code's use: a leaf at one stage, taps after it, gradients of one logit."""
    m = _model("densenet121", seed=2)
    x = torch.randn(2, 3, 64, 64)
    # reference: gradients of logit (0, 3) with respect to denseblock2/3 outputs in the plain forward
    kept: dict[str, torch.Tensor] = {}
    handles = [
        getattr(m.features, s).register_forward_hook(lambda _m, _i, out, s=s: kept.__setitem__(s, out))
        for s in ("denseblock2", "denseblock3")
    ]
    y = m(x)
    for h in handles:
        h.remove()
    ref = torch.autograd.grad(y[0, 3], [kept["denseblock2"], kept["denseblock3"]])
    # norm0 is the stage whose successor (relu0) runs in place in the plain forward pass
    for stage in ("norm0", "denseblock2"):
        with torch.no_grad():
            h = m.forward_to(x, stage)
        h = h.requires_grad_(True)
        final, taps = m.forward_from(h, stage, taps=("denseblock2", "denseblock3"), frozen_bn=frozen_bn)
        logits = m.forward_head(final)
        torch.testing.assert_close(logits, y.detach(), rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad(logits[0, 3], [taps["denseblock2"], taps["denseblock3"]])
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_frozen_bn_runs_no_batch_norm_kernel_and_only_in_eval_mode(monkeypatch):
    """frozen_bn=True: every BatchNorm after the stage is the affine map (no F.batch_norm call, so
    the backward pass has no native_batch_norm_backward), and training mode is refused."""
    m = _model("densenet121", seed=3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        h = m.forward_to(x, "denseblock1")
    calls = []
    real = torch.nn.functional.batch_norm
    monkeypatch.setattr(torch.nn.functional, "batch_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    m.forward_from(h, "denseblock1")
    n_native = len(calls)
    assert n_native == 2 * (12 + 24 + 16) + 3 + 1  # blocks 2-4: two BNs per layer; 3 transitions; norm5
    calls.clear()
    m.forward_from(h, "denseblock1", frozen_bn=True)
    assert calls == []
    with pytest.raises(ConfigError, match="eval"):
        m.train().forward_from(h, "denseblock1", frozen_bn=True)


def test_stage_errors_name_the_valid_stages():
    m = create_model("densenet_bc_100_k12", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"'denseblock4'.*conv0, denseblock1, transition1.*norm5"):
        m.forward_to(x, "denseblock4")
    h = m.forward_to(x, "denseblock2")
    with pytest.raises(ConfigError, match=r"'pool0'.*denseblock3"):
        m.forward_from(h, "pool0")
    with pytest.raises(ConfigError, match=r"'nope'"):
        m.forward_from(h, "denseblock2", taps=("denseblock3", "nope"))
    with pytest.raises(ConfigError, match=r"tap 'denseblock1' comes before stage 'denseblock2'"):
        m.forward_from(h, "denseblock2", taps=("denseblock1",))
    # a single name is one tap, not a sequence of one-letter names
    assert set(m.forward_from(h, "denseblock2", taps="denseblock3")[1]) == {"denseblock3"}
    with pytest.raises(InputShapeError):
        m.forward_to(torch.randn(1, 1, 32, 32), "denseblock1")
