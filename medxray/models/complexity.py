"""Parameter and multiply-accumulate counts of a DenseNet variant, computed from its table row.

``medxray models`` lists these for 11 variants; building each network and counting with
``torch.utils.flop_counter`` takes minutes on a CPU, while the numbers follow from the
architecture alone (Huang et al., CVPR 2017, Section 3; the layer shapes of
:mod:`medxray.models.densenet`). MACs count what torch's flop counter counts: convolutions and
the linear head (BatchNorm, ReLU and pooling are not multiply-adds of weights). A slow test checks
both counts against the built network and the flop counter for every variant.

Pure arithmetic on :class:`medxray.models.variants.Variant`: must not import torch, the network
or the builder.
"""

from __future__ import annotations

import math

from medxray.models.variants import Variant

BN_SIZE = 4  # bottleneck width = BN_SIZE * growth rate (the paper's 4k; densenet.DenseNet's default)


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output side of a convolution or pooling window (floor mode, no dilation)."""
    return (size + 2 * padding - kernel) // stride + 1


def variant_counts(
    v: Variant, num_classes: int | None = None, *, in_chans: int = 3, input_size: int | None = None
) -> tuple[int, int]:
    """(parameters, multiply-accumulates of one forward pass) of variant ``v``.

    ``num_classes`` defaults to the paper's (``v.paper_classes``), ``input_size`` to the
    variant's square input side. Parameters include BatchNorm's weight and bias (not its running
    statistics, which are buffers) and the head's bias.
    """
    classes = v.paper_classes if num_classes is None else int(num_classes)
    size = v.input_size if input_size is None else int(input_size)
    k = v.growth_rate
    c = v.num_init_features
    if v.stem == "imagenet":
        size = conv_out(size, 7, 2, 3)
        params = in_chans * c * 49 + 2 * c
        macs = size * size * in_chans * c * 49
        size = conv_out(size, 3, 2, 1)  # max pool
    else:
        params = in_chans * c * 9
        macs = size * size * in_chans * c * 9
    for i, layers in enumerate(v.block_config):
        hw = size * size
        for _ in range(layers):
            if v.bottleneck:
                inter = BN_SIZE * k
                params += 2 * c + c * inter + 2 * inter + inter * k * 9
                macs += hw * (c * inter + inter * k * 9)
            else:
                params += 2 * c + c * k * 9
                macs += hw * c * k * 9
            c += k
        if i != len(v.block_config) - 1:
            out = int(math.floor(v.compression * c))
            params += 2 * c + c * out
            macs += hw * c * out
            c = out
            size = conv_out(size, 2, 2, 0)  # average pool
    params += 2 * c + c * classes + classes  # norm5, classifier
    macs += c * classes
    return params, macs
