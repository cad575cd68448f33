"""Slimmable MobileNet-V1 for CIFAR (weiaicunzai/pytorch-cifar100 layout, slimmable as in Yu et al.).

A stride-1 3x3 stem conv (32 channels, no bias) and 13 depthwise-separable blocks (depthwise 3x3
conv without bias - BN - ReLU, pointwise 1x1 conv with bias - BN - ReLU), global average pooling
and a linear classifier. Width ``w`` scales every channel count to ``int(c * w)``, which reproduces
the reference parameter counts on CIFAR-100 exactly (x1.0 3,315,428; x0.75 1,897,924;
x0.5 872,868; x0.25 240,260). Every BN is private to its width; all other weights are shared.

Split points (stage outputs, for STC), named after the reference's modules:

========  ==================================================  ======  ==========
name      content                                             output  resolution
========  ==================================================  ======  ==========
stem      stem conv + first block                             64      32x32
layer1    2 blocks, the first with stride 2                   128     16x16
layer2    2 blocks, the first with stride 2                   256     8x8
layer3    6 blocks, the first with stride 2                   512     4x4
layer4    2 blocks, the first with stride 2                   1024    2x2
========  ==================================================  ======  ==========

(channels at full width, resolutions for a 32x32 input).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdreg.errors import OptionError
from kdreg_plugins.backbones.cifar_resnet import init_weights
from kdreg_plugins.backbones.slimmable import (
    DEFAULT_WIDTHS,
    SlimmableBackbone,
    SlimmableConv2d,
    SlimmableLinear,
    SwitchableBatchNorm2d,
)

STEM_CHANNELS = 32
#: (stage name, ((output channels, stride) per depthwise-separable block)).
STAGES: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = (
    ("stem", ((64, 1),)),
    ("layer1", ((128, 2), (128, 1))),
    ("layer2", ((256, 2), (256, 1))),
    ("layer3", ((512, 2),) + ((512, 1),) * 5),
    ("layer4", ((1024, 2), (1024, 1))),
)


class ConvBNReLU(nn.Sequential):
    """Slimmable conv (no bias) - switchable BN - ReLU."""

    def __init__(self, in_list: Sequence[int], out_list: Sequence[int], kernel_size: int,
                 stride: int = 1, *, depthwise: bool = False):
        super().__init__(
            SlimmableConv2d(in_list, out_list, kernel_size, stride, kernel_size // 2,
                            depthwise=depthwise, bias=False),
            SwitchableBatchNorm2d(out_list),
            nn.ReLU(inplace=True),
        )


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv (no bias) - BN - ReLU, then pointwise 1x1 conv (with bias) - BN - ReLU."""

    def __init__(self, in_list: Sequence[int], out_list: Sequence[int], stride: int):
        super().__init__()
        self.depthwise = ConvBNReLU(in_list, in_list, 3, stride, depthwise=True)
        self.pointwise = nn.Sequential(
            SlimmableConv2d(in_list, out_list, 1, bias=True),
            SwitchableBatchNorm2d(out_list),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class SlimmableMobileNetV1(SlimmableBackbone):
    """Slimmable MobileNet-V1 for 32x32 inputs; sub-models are the widths, smallest first."""

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[float] | Mapping[str, Any] = DEFAULT_WIDTHS,
        *,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
    ):
        super().__init__(widths, in_chans=in_chans, input_size=input_size)
        n = len(self.slot_widths)
        channels = self.channels(STEM_CHANNELS)
        stem: list[nn.Module] = [ConvBNReLU([in_chans] * n, channels, 3)]
        self.stage_names = tuple(name for name, _ in STAGES)
        for name, blocks in STAGES:
            layers = stem if name == "stem" else []
            for out, stride in blocks:
                layers.append(DepthwiseSeparable(channels, self.channels(out), stride))
                channels = self.channels(out)
            self.add_module(name, nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = SlimmableLinear(channels, [num_classes] * n)
        self.reset_parameters()
        self.finish_widths()

    def reset_parameters(self) -> None:
        """He (fan-out) init for convs, N(0, 0.01) for the classifier, zero biases, unit BN."""
        init_weights(self, linear_std=0.01)

    def forward_width(self, x: Tensor) -> Tensor:
        """Logits at the current width; on the CPU the activations are channels-last (oneDNN's
        depthwise convolution and batch norm run several times faster on it than on NCHW)."""
        if x.device.type == "cpu" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward_width(x)

    def classify(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(x).flatten(1))



def build_slimmable_mobilenet_v1(
    *,
    num_classes: int,
    in_chans: int = 3,
    input_size: tuple[int, int] = (32, 32),
    widths: Sequence[float] | Mapping[str, Any] = DEFAULT_WIDTHS,
) -> SlimmableMobileNetV1:
    """Slimmable MobileNet-V1 for CIFAR (private BN per width); ``widths`` in (0, 1], increasing."""
    if num_classes < 1:
        raise OptionError(f"num_classes must be positive, got {num_classes}", key="num_classes")
    return SlimmableMobileNetV1(num_classes, widths, in_chans=in_chans, input_size=input_size)


def register(register: Callable[..., None]) -> None:
    register(
        "slimmable_mobilenet_v1",
        build_slimmable_mobilenet_v1,
        "Slimmable MobileNet-V1 for CIFAR (widths x0.25..x1.0, switchable BN); 3.3 M params, "
        "46.5 M MACs at x1.0 on CIFAR-100",
    )
