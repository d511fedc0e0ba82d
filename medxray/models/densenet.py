"""DenseNet and DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017).

Written for this project, with torchvision's module names kept exactly (``features.conv0``,
``features.denseblock1.denselayer1.norm1``, ``features.transition1.conv``, ``features.norm5``,
``classifier``) so ImageNet checkpoints load key for key.

Pieces, in the paper's terms:

* composite function H = BN-ReLU-Conv;
* bottleneck (the "B" in BC): BN-ReLU-1x1 conv to ``bn_size * k`` channels before each 3x3 conv;
* transition: BN-ReLU-1x1 conv to ``floor(theta * m)`` channels, then 2x2 average pooling
  (compression theta, the "C" in BC; theta = 1 for plain DenseNet);
* ImageNet stem: 7x7/2 conv to ``num_init_features``, BN, ReLU, 3x3/2 max pool;
  CIFAR stem: one 3x3 conv to 16 channels (2k for BC), three equal dense blocks.

Memory-efficient mode recomputes the concat-BN-ReLU-1x1(-BN-ReLU) part in the backward pass
(``torch.utils.checkpoint``, non-reentrant), so the concatenations are never stored; outputs,
gradients and BatchNorm running statistics equal the plain mode's.

Stage contract (the one timm's models keep: ``feature_info``, forward to / from an intermediate
stage): every child of ``model.features`` is a *stage*, described by :class:`FeatureInfo` (its
output channels and its stride relative to the input); :meth:`DenseNet.forward_to` and
:meth:`DenseNet.forward_from` split the forward pass at any stage, so map code (Grad-CAM,
LayerCAM) runs the network itself instead of replaying it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from medxray.errors import ConfigError, InputShapeError


@dataclass(frozen=True)
class FeatureInfo:
    """One stage of ``model.features``: what it outputs (timm's ``feature_info`` entry).

    ``module``: the child's name in ``model.features`` (``"conv0"``, ``"pool0"``,
    ``"denseblock1"``, ``"transition1"``, ``"norm5"``, ...). ``num_chs``: channels of its output.
    ``reduction``: the total stride from the input to its output (output side = input side /
    ``reduction`` when the input side is a multiple of it; e.g. 32 for ``norm5`` of an ImageNet
    variant, so 7x7 at 224 px).
    """

    module: str
    num_chs: int
    reduction: int


def frozen_batch_norm(norm: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``norm`` in eval mode as the affine map it is: ``x * s + t`` per channel, with
    ``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s`` (Ioffe & Szegedy
    2015, Alg. 2, inference; the arithmetic of torchvision's ``FrozenBatchNorm2d``).

    ``x`` (N, C, H, W) of any float dtype (s and t are cast to it). ``s`` and ``t`` are computed
    without autograd, so gradients flow to ``x`` only: the map path's backward is then one
    multiply per layer instead of ``native_batch_norm_backward`` (measured 0.04 s of a 0.2 s
    single-image map). Equals ``norm(x)`` in eval mode to float rounding (~1e-7 relative in fp32).
    """
    with torch.no_grad():
        var, mean = norm.running_var, norm.running_mean
        assert var is not None and mean is not None  # every BatchNorm here tracks running statistics
        s = torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            s = s * norm.weight
        t = -mean * s if norm.bias is None else norm.bias - mean * s
    shape = (1, -1, 1, 1)
    return torch.addcmul(t.to(x.dtype).view(shape), x, s.to(x.dtype).view(shape))


def _stage_call(mod: nn.Module, h: Tensor, frozen_bn: bool = False) -> Tensor:
    """One stage on ``h``; a ReLU runs out of place, so neither the caller's tensor nor a tapped
    stage output is overwritten (``features.relu0`` is in place in the plain forward pass).
    ``frozen_bn``: every BatchNorm inside runs as :func:`frozen_batch_norm` (eval mode only)."""
    if isinstance(mod, nn.ReLU):
        return F.relu(h)
    if not frozen_bn:
        return mod(h)
    if isinstance(mod, nn.BatchNorm2d):
        return frozen_batch_norm(mod, h)
    if isinstance(mod, DenseBlock):
        return mod.run(h, frozen_bn=True)
    if isinstance(mod, Transition):
        for child in mod.children():
            h = _stage_call(child, h, frozen_bn=True)
        return h
    return mod(h)


class DenseLayer(nn.Module):
    """One layer of a dense block: (bottleneck) + 3x3 conv producing ``growth_rate`` maps."""

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_size: int,
        bottleneck: bool,
        drop_rate: float,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient
        if bottleneck:
            inter = bn_size * growth_rate
            self.norm1 = nn.BatchNorm2d(in_channels)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv1 = nn.Conv2d(in_channels, inter, kernel_size=1, stride=1, bias=False)
            self.norm2 = nn.BatchNorm2d(inter)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(inter, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            # Plain DenseNet layer: H = BN-ReLU-3x3 conv straight from the concatenation.
            self.norm1 = nn.BatchNorm2d(in_channels)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv1 = nn.Conv2d(in_channels, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def _dropout(self, x: Tensor) -> Tensor:
        return F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else x

    def _bn(self, norm: nn.BatchNorm2d, x: Tensor, recompute: bool, frozen: bool = False) -> Tensor:
        """BatchNorm; a checkpoint recomputation normalises alike but must not count the batch twice."""
        if frozen:
            return frozen_batch_norm(norm, x)
        if not recompute:
            return norm(x)
        # Same op as the first pass (so checkpoint sees the same saved tensors), with momentum 0
        # so the running statistics stay as the first pass left them.
        return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, True, 0.0, norm.eps)

    def _bottleneck(self, inputs: Sequence[Tensor], recompute: bool = False, frozen_bn: bool = False) -> Tensor:
        """concat -> BN -> ReLU -> conv1 (-> BN -> ReLU for bottleneck layers).

        This is the part memory-efficient mode recomputes in the backward pass; for bottleneck
        layers it ends at the 3x3 conv's input, so neither the concatenation nor the 4k-channel
        BN input is kept.
        """
        x = inputs[0] if len(inputs) == 1 else torch.cat(list(inputs), 1)
        out = self._dropout(self.conv1(self.relu1(self._bn(self.norm1, x, recompute, frozen_bn))))
        if self.bottleneck:
            out = self.relu2(self._bn(self.norm2, out, recompute, frozen_bn))
        return out

    def forward(self, inputs: Sequence[Tensor], frozen_bn: bool = False) -> Tensor:
        """The layer's ``growth_rate`` new maps from the list of earlier maps. ``frozen_bn``
        (eval mode): BatchNorm as :func:`frozen_batch_norm`, the gradient-map path."""
        if frozen_bn:
            out = self._bottleneck(inputs, frozen_bn=True)
        elif self.memory_efficient and self.training and any(t.requires_grad for t in inputs):
            calls: list[None] = []

            def run(*ins: Tensor) -> Tensor:
                calls.append(None)  # the first call is the forward pass, later ones recompute
                return self._bottleneck(ins, recompute=len(calls) > 1)

            out = checkpoint(run, *inputs, use_reentrant=False)
        else:
            out = self._bottleneck(inputs)
        if self.bottleneck:
            out = self._dropout(self.conv2(out))
        return out


class DenseBlock(nn.Module):
    """``num_layers`` dense layers, each seeing the concatenation of all earlier maps."""

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bn_size: int,
        bottleneck: bool,
        drop_rate: float,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        self.memory_efficient = memory_efficient
        for i in range(num_layers):
            self.add_module(
                f"denselayer{i + 1}",
                DenseLayer(
                    in_channels + i * growth_rate, growth_rate, bn_size, bottleneck, drop_rate, memory_efficient
                ),
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)

    def run(self, x: Tensor, frozen_bn: bool = False) -> Tensor:
        """The block on ``x``; ``frozen_bn`` as in :meth:`DenseLayer.forward`."""
        # Keep the pieces separately; each layer concatenates what it needs. Gradients then
        # accumulate in place per piece, and in memory-efficient mode (where each layer's
        # concatenation sits inside its checkpointed function) no concatenation is kept at all.
        feats = [x]
        for layer in self.children():
            feats.append(layer(feats, frozen_bn=frozen_bn))
        return torch.cat(feats, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compression) then 2x2 average pooling between dense blocks."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=False)
        if drop_rate > 0:
            self.drop = nn.Dropout(drop_rate)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet / DenseNet-BC with an ImageNet or a CIFAR stem.

    Use :func:`medxray.models.create_model` rather than building this directly.
    """

    def __init__(
        self,
        growth_rate: int,
        block_config: Sequence[int],
        num_init_features: int,
        *,
        stem: str = "imagenet",
        bottleneck: bool = True,
        compression: float = 0.5,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        features = nn.Sequential()
        info: list[FeatureInfo] = []

        def add(name: str, module: nn.Module, num_chs: int, reduction: int) -> None:
            features.add_module(name, module)
            info.append(FeatureInfo(name, num_chs, reduction))

        if stem == "imagenet":
            add(
                "conv0",
                nn.Conv2d(in_chans, num_init_features, 7, stride=2, padding=3, bias=False),
                num_init_features,
                2,
            )
            add("norm0", nn.BatchNorm2d(num_init_features), num_init_features, 2)
            add("relu0", nn.ReLU(inplace=True), num_init_features, 2)
            add("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1), num_init_features, 4)
            stride = 4
        elif stem == "cifar":
            # The paper's CIFAR nets go straight into the first block (which starts with BN-ReLU).
            add(
                "conv0",
                nn.Conv2d(in_chans, num_init_features, 3, stride=1, padding=1, bias=False),
                num_init_features,
                1,
            )
            stride = 1
        else:
            raise ValueError(f"unknown stem {stem!r}")

        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bn_size, bottleneck, drop_rate, memory_efficient)
            channels += num_layers * growth_rate
            add(f"denseblock{i + 1}", block, channels, stride)
            if i != len(block_config) - 1:
                out = int(math.floor(compression * channels))
                stride *= 2  # the transition's 2x2 average pooling
                add(f"transition{i + 1}", Transition(channels, out, drop_rate), out, stride)
                channels = out
        add("norm5", nn.BatchNorm2d(channels), channels, stride)
        self.features = features
        self.feature_info: tuple[FeatureInfo, ...] = tuple(info)
        self._stage_index = {f.module: k for k, f in enumerate(info)}
        self.num_features = channels
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He init for convs, identity BN, zero bias: the initialisation torchvision uses.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise InputShapeError(f"model expects input of shape (N, {self.in_chans}, H, W), got {tuple(x.shape)}")

    def forward_features(self, x: Tensor) -> Tensor:
        """Last feature map after norm5 + ReLU, shape (N, num_features, h, w): the CAM input."""
        self._check_input(x)
        return F.relu(self.features(x))

    def stage_index(self, stage: str) -> int:
        """Position of ``stage`` in :attr:`feature_info`; ConfigError naming the valid stages if unknown."""
        try:
            return self._stage_index[stage]
        except (KeyError, TypeError):
            valid = ", ".join(f.module for f in self.feature_info)
            raise ConfigError(f"unknown model stage {stage!r}; this model's stages are: {valid}") from None

    def forward_to(self, x: Tensor, stage: str) -> Tensor:
        """Run ``features`` on the input batch ``x`` (N, in_chans, H, W) up to and including ``stage``.

        Returns that stage's output, (N, num_chs, ~H / reduction, ~W / reduction) as its
        :class:`FeatureInfo` says. Raises ConfigError for an unknown stage (listing the valid
        ones), InputShapeError for an input of the wrong rank or channel count.
        """
        self._check_input(x)
        last = self.stage_index(stage)
        for mod in list(self.features.children())[: last + 1]:
            x = _stage_call(mod, x)
        return x

    def forward_from(
        self, h: Tensor, stage: str, taps: Sequence[str] = (), *, frozen_bn: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Continue the forward pass from ``h``, the output of ``stage`` (see :meth:`forward_to`).

        Returns (the last feature map after norm5 + ReLU, (N, num_features, h, w), exactly what
        :meth:`forward_features` returns and :meth:`forward_head` pools; ``{tap: output}`` for
        each stage named in ``taps``). A tap must be ``stage`` itself (its output is ``h``) or a
        later stage. ``h`` is not modified in place, so it may be a leaf that requires grad
        (gradients with respect to ``h`` and the taps flow through the returned tensors).
        ``frozen_bn=True`` (eval mode only) runs every BatchNorm as :func:`frozen_batch_norm`, the
        same function to float rounding whose backward pass is one multiply: what the gradient
        maps use. Raises ConfigError for an unknown stage or tap, a tap before ``stage``, or
        ``frozen_bn`` in training mode.
        """
        if frozen_bn and self.training:
            raise ConfigError("frozen_bn is eval-mode BatchNorm (running statistics); call model.eval() first")
        first = self.stage_index(stage)
        wanted: dict[int, str] = {}
        for t in (taps,) if isinstance(taps, str) else taps:
            k = self.stage_index(t)
            if k < first:
                raise ConfigError(f"tap {t!r} comes before stage {stage!r}; taps must be {stage!r} or a later stage")
            wanted[k] = t
        out: dict[str, Tensor] = {}
        if first in wanted:
            out[wanted[first]] = h
        for k, mod in enumerate(self.features.children()):
            if k > first:
                h = _stage_call(mod, h, frozen_bn)
                if k in wanted:
                    out[wanted[k]] = h
        return F.relu(h), out

    def forward_head(self, features: Tensor) -> Tensor:
        """Global average pool + linear head on a feature map from :meth:`forward_features`."""
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
