"""DenseNet-BC: architecture, parameter counts, ImageNet initialisation parity, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import zlib

import pytest
import torch
import torchvision

from medxray.cli import main
from medxray.errors import ConfigError, InputShapeError, MedxrayError, WeightsError
from medxray.models import VARIANTS, count_parameters, create_model
from medxray.models import weights as weights_mod

PAPER_PARAMS = {
    "densenet121": 7_978_856,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet161": 28_681_000,
    "densenet264": 33_337_704,
    "densenet_40_k12": 1_019_722,
    "densenet_100_k12": 6_979_642,
    "densenet_100_k24": 27_249_082,
    "densenet_bc_100_k12": 769_162,
    "densenet_bc_250_k24": 15_324_406,
    "densenet_bc_190_k40": 25_624_430,
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_paper(name):
    classes = 1000 if VARIANTS[name].stem == "imagenet" else 10
    assert count_parameters(create_model(name, num_classes=classes)) == PAPER_PARAMS[name]


def test_variant_rows_are_keyword_only():
    # a positional row could silently swap two int fields (growth_rate / num_init_features)
    from medxray.models import Variant

    with pytest.raises(TypeError):
        Variant(32, (6, 12, 24, 16), 64, "imagenet", True, 0.5, 224, 1000)  # type: ignore[misc]
    v = Variant(**dataclasses.asdict(VARIANTS["densenet121"]))
    assert v == VARIANTS["densenet121"]


def test_table_covers_contract_names():
    assert set(VARIANTS) == set(PAPER_PARAMS)


def _torchvision_with_stats(name: str, seed: int) -> torch.nn.Module:
    """Random torchvision DenseNet with non-trivial BN statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    tv = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return tv.eval()


def _legacy(state):
    """Rename current keys to the legacy spelling torchvision's released files use."""
    out = {}
    for k, v in state.items():
        for part in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"):
            if f".{part}." in k and "denselayer" in k:
                k = k.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        out[k] = v
    return out


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
@pytest.mark.parametrize("style", ["current", "legacy"])
def test_imagenet_parity_with_torchvision(name, style, tmp_path):
    tv = _torchvision_with_stats(
        name, seed=zlib.crc32(name.encode()) % 1000
    )  # stable across processes (hash() is salted)
    state = tv.state_dict()
    if style == "legacy":
        state = _legacy(state)
        assert any(".norm.1." in k for k in state)
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)

    ours = create_model(name, pretrained=path).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logits = tv(x)
        ref_feats = torch.relu(tv.features(x))
        assert (ours(x) - ref_logits).abs().max().item() <= 1e-5
        assert (ours.forward_features(x) - ref_feats).abs().max().item() <= 1e-5
    assert ours.classifier.out_features == 1000


def test_module_names_match_torchvision_exactly():
    ours = set(create_model("densenet121").state_dict())
    theirs = set(torchvision.models.densenet121(weights=None).state_dict())
    assert ours == theirs


def test_new_head_is_reinitialised_and_body_loaded(tmp_path):
    tv = _torchvision_with_stats("densenet121", 1)
    torch.save(tv.state_dict(), tmp_path / "w.pth")
    m = create_model("densenet121", num_classes=14, pretrained=tmp_path / "w.pth")
    assert m.classifier.weight.shape == (14, 1024)
    assert torch.equal(m.features.conv0.weight, tv.features.conv0.weight)
    assert torch.equal(m.features.norm5.running_var, tv.features.norm5.running_var)
    assert torch.count_nonzero(m.classifier.bias) == 0  # fresh head, not a slice of the old one


def test_in_chans_1_sums_rgb_filters(tmp_path):
    tv = _torchvision_with_stats("densenet121", 2)
    torch.save(tv.state_dict(), tmp_path / "w.pth")
    gray = create_model("densenet121", in_chans=1, pretrained=tmp_path / "w.pth").eval()
    assert gray.features.conv0.weight.shape == (64, 1, 7, 7)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        diff = (gray(x) - tv(x.repeat(1, 3, 1, 1))).abs().max().item()
    assert diff <= 1e-4


def test_imagenet_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights_mod, "WEIGHTS_BASE_URL", (tmp_path / "nowhere").as_uri() + "/")
    with pytest.raises(WeightsError) as info:
        create_model("densenet121", pretrained="imagenet")
    msg = str(info.value)
    assert "densenet121-a639ec97.pth" in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg


def test_imagenet_download_is_hash_checked_and_cached(tmp_path, monkeypatch):
    tv = _torchvision_with_stats("densenet121", 3)
    src = tmp_path / "server"
    src.mkdir()
    blob = src / "payload.pth"
    torch.save(_legacy(tv.state_dict()), blob)
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    good = f"densenet121-{sha[:8]}.pth"
    (src / good).write_bytes(blob.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights_mod, "WEIGHTS_BASE_URL", src.as_uri() + "/")
    monkeypatch.setitem(VARIANTS, "densenet121", dataclasses.replace(VARIANTS["densenet121"], imagenet_file=good))

    m = create_model("densenet121", pretrained="imagenet").eval()
    cached = tmp_path / "torch" / "hub" / "checkpoints" / good
    assert cached.is_file()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert (m(x) - tv(x)).abs().max().item() <= 1e-5

    bad = "densenet121-00000000.pth"
    (src / bad).write_bytes(blob.read_bytes())
    monkeypatch.setitem(VARIANTS, "densenet121", dataclasses.replace(VARIANTS["densenet121"], imagenet_file=bad))
    with pytest.raises(WeightsError, match="integrity"):
        create_model("densenet121", pretrained="imagenet")
    assert not (tmp_path / "torch" / "hub" / "checkpoints" / bad).exists()


def test_no_imagenet_weights_for_densenet264():
    with pytest.raises(WeightsError, match="densenet121"):
        create_model("densenet264", pretrained="imagenet")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("payload", ["list", "tensor", "pickled_object", "garbage", "nested_non_tensor"])
def test_non_state_dict_files_are_refused(payload, tmp_path):
    path = tmp_path / "bad.pth"
    if payload == "list":
        torch.save([torch.zeros(1)], path)
    elif payload == "tensor":
        torch.save(torch.zeros(3), path)
    elif payload == "pickled_object":
        torch.save({"x": _Evil()}, path)
    elif payload == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    else:
        torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(MedxrayError) as info:
        create_model("densenet121", pretrained=path)
    assert str(path) in str(info.value) or "state dict" in str(info.value)
    if payload == "pickled_object":
        assert "holds code or Python objects" in str(info.value) and "False" not in str(info.value)


def test_wrapped_and_ddp_state_dicts_are_accepted(tmp_path):
    tv = _torchvision_with_stats("densenet121", 4)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, tmp_path / "w.pth")
    m = create_model("densenet121", pretrained=tmp_path / "w.pth")
    assert torch.equal(m.features.conv0.weight, tv.features.conv0.weight)


def test_wrong_architecture_is_refused_naming_keys(tmp_path):
    torch.save(torchvision.models.densenet169(weights=None).state_dict(), tmp_path / "w169.pth")
    with pytest.raises(WeightsError, match="another architecture") as info:
        create_model("densenet121", pretrained=tmp_path / "w169.pth")
    assert "features." in str(info.value)
    torch.save(torchvision.models.densenet121(weights=None).state_dict(), tmp_path / "w121.pth")
    with pytest.raises(WeightsError, match="other shapes.*another architecture"):
        create_model("densenet_bc_100_k12", pretrained=tmp_path / "w121.pth")
    extra = dict(torchvision.models.densenet121(weights=None).state_dict(), **{"features.extra.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys \['features.extra.weight'\]"):
        create_model("densenet121", pretrained=tmp_path / "extra.pth")


def test_unknown_names_and_sources():
    with pytest.raises(ConfigError, match="densenet121.*densenet_bc_190_k40"):
        create_model("resnet50")
    with pytest.raises(WeightsError, match="imagenet"):
        create_model("densenet121", pretrained="imagenet21k")


def test_no_pretrained_sentinel(tmp_path, monkeypatch):
    from pathlib import Path

    from medxray.models import NO_PRETRAINED, wants_pretrained

    assert NO_PRETRAINED == "none"  # the documented CLI / config spelling
    for value in (None, "", "none", "None", "NONE"):
        assert not wants_pretrained(value), value
    for value in ("imagenet", "weights.pth", Path("none.pth"), "nonexistent"):
        assert wants_pretrained(value), value
    # create_model really skips loading for the sentinel: a loader that fails proves it is not called
    monkeypatch.setattr("medxray.models.registry.load_pretrained", lambda *a: pytest.fail(f"loaded {a[2]!r}"))
    for value in (None, "", "None"):
        create_model("densenet_40_k12", num_classes=10, pretrained=value)


def test_wrong_channel_count_input():
    m = create_model("densenet_bc_100_k12", num_classes=10).eval()
    with pytest.raises(InputShapeError, match=r"\(N, 3, H, W\)"):
        m(torch.zeros(1, 1, 32, 32))
    with pytest.raises(InputShapeError):
        m(torch.zeros(3, 32, 32))


@pytest.mark.parametrize("name", ["densenet121", "densenet_40_k12"])
def test_memory_efficient_same_outputs_and_gradients(name):
    torch.manual_seed(0)
    plain = create_model(name, num_classes=5)
    eff = create_model(name, num_classes=5, memory_efficient=True)
    eff.load_state_dict(plain.state_dict())
    size = 64 if VARIANTS[name].stem == "imagenet" else 16
    x = torch.randn(2, 3, size, size)
    outs, grads = [], []
    for m in (plain, eff):
        m.train()
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # the backward recomputation must not update BatchNorm running statistics a second time
    for (ka, a), (kb, b) in zip(plain.state_dict().items(), eff.state_dict().items()):
        assert ka == kb and torch.allclose(a.float(), b.float(), atol=1e-6), ka


def test_memory_efficient_saves_less_for_backward():
    """Checkpointing must really drop the stored concatenations, not only match numerically."""

    def saved_bytes(m):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(torch.randn(2, 3, 64, 64)).sum()
        return total

    torch.manual_seed(0)
    plain = create_model("densenet121").train()
    eff = create_model("densenet121", memory_efficient=True).train()
    assert saved_bytes(eff) < 0.6 * saved_bytes(plain)


def test_dropout_only_in_training():
    m = create_model("densenet_bc_100_k12", num_classes=10, drop_rate=0.2)
    x = torch.randn(2, 3, 32, 32)
    m.train()
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


def test_forward_features_and_head_contract():
    m = create_model("densenet121", num_classes=14).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        f = m.forward_features(x)
        assert f.shape == (1, 1024, 7, 7) and f.min() >= 0
        cam_mean = torch.einsum("nchw,kc->nkhw", f, m.classifier.weight).mean((2, 3)) + m.classifier.bias
        assert torch.allclose(cam_mean, m(x), atol=1e-4)


def test_cli_models_lists_counts_and_flops(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "7,978,856" in out and "25,624,430" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("densenet121 "))
    gmacs = float(line.split()[5])
    assert 2.8 < gmacs < 2.95  # torchvision lists 2.83 GMACs ("GFLOPS") for densenet121


def test_cli_models_builds_no_network(capsys, monkeypatch):
    """The counts are static: no network is built, so the listing is instant on any machine."""
    import medxray.models as models_pkg

    def no_build(*a, **k):
        raise AssertionError("`medxray models` built a network")

    monkeypatch.setattr(models_pkg, "create_model", no_build)
    monkeypatch.setattr(torch.nn.Module, "__init__", no_build)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for paper in ("7,978,856", "14,149,480", "20,013,928", "28,681,000"):  # DenseNet paper / torchvision counts
        assert paper in out


@pytest.mark.slow
def test_analytic_counts_equal_the_built_networks_and_torch_flop_counter():
    from medxray.models.registry import describe_variants

    fast = describe_variants()
    measured = describe_variants(measure=True)
    for f, m in zip(fast, measured):
        assert f["params"] == m["params"], f["name"]
        assert f["gmacs"] == pytest.approx(m["gmacs"], rel=1e-12), f["name"]
