"""Strided 1x1 convolutions with few input channels, computed as a subsample then a stride-1 conv.

On CPUs without AVX-512, oneDNN's AVX2 kernel for the weight gradient of a 1x1 convolution with
a stride (``jit_1x1:avx2``, backward_weights) is broken when the input has fewer than 8 channels
per group: it first copies the strided input into a workspace that is too small for it. The
weight gradient then comes out wrong (measured: every element, errors up to 300x), or the
process spins for ever or crashes, depending on the shapes and the thread count. A slimmable
ResNet's narrowest shortcut (4 -> 8 channels, stride 2) is such a conv.

A 1x1 convolution with stride ``s`` and no padding is exactly a 1x1 convolution with stride 1 of
the input's every ``s``-th row and column, which never takes that kernel. :func:`pointwise_conv2d`
computes it that way on the CPU whenever :func:`avoids_strided_kernel` says the broken kernel could
be chosen; :func:`guard_convs` makes a model's plain ``nn.Conv2d`` layers do the same. The results
are those of ``F.conv2d`` up to float rounding; CUDA is left alone.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

#: below this many input channels per group the AVX2 kernel's workspace is too small
MIN_SAFE_IN_CHANNELS = 8


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


def avoids_strided_kernel(in_channels_per_group: int, kernel_size: int | Sequence[int],
                          stride: int | Sequence[int], padding: int | Sequence[int] | str,
                          dilation: int | Sequence[int] = 1) -> bool:
    """Whether a conv of these settings is a strided 1x1 conv, without padding, of fewer than
    :data:`MIN_SAFE_IN_CHANNELS` input channels per group: one that :func:`pointwise_conv2d`
    computes as a subsample then a stride-1 conv."""
    if isinstance(padding, str):
        return False
    return (_pair(kernel_size) == (1, 1) and _pair(stride) != (1, 1) and _pair(padding) == (0, 0)
            and _pair(dilation) == (1, 1) and in_channels_per_group < MIN_SAFE_IN_CHANNELS)


def pointwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int | Sequence[int],
                     padding: int | Sequence[int] | str = 0, dilation: int | Sequence[int] = 1,
                     groups: int = 1) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``; on the CPU a strided 1x1
    conv of few input channels (:func:`avoids_strided_kernel`) runs as ``x[:, :, ::sh, ::sw]``
    through a stride-1 conv."""
    if x.device.type == "cpu" and avoids_strided_kernel(weight.shape[1], weight.shape[2:], stride,
                                                        padding, dilation):
        sh, sw = _pair(stride)
        return F.conv2d(x[:, :, ::sh, ::sw], weight, bias, 1, 0, 1, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _guarded_forward(self: nn.Conv2d, x: Tensor) -> Tensor:
    # no padding (avoids_strided_kernel): the padding mode changes nothing
    return pointwise_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def guard_convs(model: nn.Module) -> list[str]:
    """Make every plain ``nn.Conv2d`` of ``model`` (one whose class keeps ``nn.Conv2d.forward``)
    that :func:`avoids_strided_kernel` names compute through :func:`pointwise_conv2d`; layers with
    a forward of their own decide for themselves. Returns the names of the layers changed."""
    changed = []
    for name, module in model.named_modules():
        if (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward
                and avoids_strided_kernel(module.in_channels // module.groups, module.kernel_size,
                                          module.stride, module.padding, module.dilation)):
            module.forward = types.MethodType(_guarded_forward, module)  # type: ignore[method-assign]
            changed.append(name)
    return changed


def is_guarded(module: Any) -> bool:
    """Whether :func:`guard_convs` changed this layer."""
    forward = getattr(module, "__dict__", {}).get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _guarded_forward
