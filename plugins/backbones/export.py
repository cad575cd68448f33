"""Standalone networks of the slimmable backbones' widths (``kdreg export``).

:func:`plain_width` turns width ``i`` of a :class:`~kdreg_plugins.backbones.slimmable.SlimmableBackbone`
into a plain network of ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` layers that hold only
that width's slices of the shared weights and that width's own BN (affine parameters and running
statistics), so its parameter count is the width's ``count_params()[i]``. A universally
slimmable backbone (a width range) exports an evaluated width the same way, its BN holding the
first channels of the shared affine parameters and that width's calibrated statistics. The plain network keeps
the slimmable model's module names (a switchable BN ``x.bn.<i>`` becomes ``x``) and has a forward
of its own: the stages in order, global average pooling, the classifier. It reads only the
slimmable layers' parameters, buffers and channel lists, never their forward code.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdreg.errors import ExportError
from kdreg_plugins.backbones.slimmable import (
    RangeBatchNorm2d,
    SlimmableBackbone,
    SlimmableConv2d,
    SlimmableLinear,
    SwitchableBatchNorm2d,
)

#: Parameterless modules copied as they are.
STATELESS = (nn.ReLU, nn.ReLU6, nn.Identity, nn.Flatten, nn.AdaptiveAvgPool2d, nn.Dropout)


class PlainNetwork(nn.Module):
    """The stages named ``stage_names``, run in order, then global average pooling and the
    linear classifier held under ``head``."""

    def __init__(self, stages: dict[str, nn.Module], head: str, classifier: nn.Linear):
        super().__init__()
        self.stage_names = tuple(stages)
        self.head = head
        for name, stage in stages.items():
            self.add_module(name, stage)
        self.add_module(head, classifier)

    def forward(self, x: Tensor) -> Tensor:
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return getattr(self, self.head)(F.adaptive_avg_pool2d(x, 1).flatten(1))


class PlainDepthwiseSeparable(nn.Module):
    """MobileNet-V1's block: ``pointwise(depthwise(x))``."""

    def __init__(self, depthwise: nn.Module, pointwise: nn.Module):
        super().__init__()
        self.depthwise = depthwise
        self.pointwise = pointwise

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class PlainBasicBlock(nn.Module):
    """The CIFAR ResNet basic block: conv - BN - ReLU - conv - BN, plus the shortcut, then ReLU."""

    def __init__(self, conv1: nn.Module, bn1: nn.Module, conv2: nn.Module, bn2: nn.Module,
                 shortcut: nn.Module | None):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = conv1, bn1, conv2, bn2
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def plain_width(model: SlimmableBackbone, index: int) -> nn.Module:
    """Width ``index`` of ``model`` as a :class:`PlainNetwork` in eval mode.

    The model's top-level modules must be its stages (``stage_names``), parameterless modules
    (pooling) and one :class:`SlimmableLinear`, the classifier; the stages may hold slimmable
    layers, ``nn.Sequential``, stateless modules and the blocks of the built-in families.
    """
    i = model.eval_slot(index)  # the slot of evaluated width ``index`` (fixed widths: itself)
    heads = [name for name, m in model.named_children() if isinstance(m, SlimmableLinear)]
    others = [name for name, m in model.named_children()
              if name not in model.stage_names and name not in heads and not isinstance(m, STATELESS)]
    if len(heads) != 1 or others:
        raise ExportError(
            f"{type(model).__name__} has no plain counterpart: its top-level modules must be its "
            f"stages ({', '.join(model.stage_names)}), pooling and one slimmable linear "
            f"classifier; found classifiers {heads or 'none'} and other modules {others or 'none'}")
    stages = {name: plain_module(getattr(model, name), i, name) for name in model.stage_names}
    classifier = plain_module(getattr(model, heads[0]), i, heads[0])
    assert isinstance(classifier, nn.Linear)
    return PlainNetwork(stages, heads[0], classifier).eval()


def plain_module(module: nn.Module, index: int, path: str = "") -> nn.Module:
    """``module`` at width ``index`` built from plain layers holding that width's weights."""
    for kind, convert in CONVERTERS.items():
        if isinstance(module, kind):
            return convert(module, index, path)
    if isinstance(module, STATELESS):
        return copy.deepcopy(module)
    raise ExportError(f"module {path or type(module).__name__!r} ({type(module).__name__}) has no "
                      "plain counterpart for export")


def _conv(m: SlimmableConv2d, i: int, _path: str) -> nn.Conv2d:
    cin, cout = m.in_list[i], m.out_list[i]
    groups = cin if m.depthwise else 1
    conv = nn.Conv2d(cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, groups,
                     bias=m.bias is not None, padding_mode=m.padding_mode)
    weight = m.weight[:cout] if m.depthwise else m.weight[:cout, :cin]
    with torch.no_grad():
        conv.weight.copy_(weight)
        if m.bias is not None and conv.bias is not None:
            conv.bias.copy_(m.bias[:cout])
    return conv.to(m.weight.device)


def _linear(m: SlimmableLinear, i: int, _path: str) -> nn.Linear:
    cin, cout = m.in_list[i], m.out_list[i]
    linear = nn.Linear(cin, cout, bias=m.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(m.weight[:cout, :cin])
        if m.bias is not None and linear.bias is not None:
            linear.bias.copy_(m.bias[:cout])
    return linear.to(m.weight.device)


def _batch_norm(m: SwitchableBatchNorm2d, i: int, _path: str) -> nn.BatchNorm2d:
    """Width ``i``'s own BN, read from the parameters and buffers named ``bn.<i>.*``."""
    prefix = f"bn.{i}."
    state = {k[len(prefix):]: v for k, v in m.state_dict().items() if k.startswith(prefix)}
    own = m.bn[i]
    bn = nn.BatchNorm2d(m.num_features_list[i], eps=own.eps, momentum=own.momentum,
                        affine="weight" in state, track_running_stats="running_mean" in state)
    bn.load_state_dict(state)
    return bn.to(next(iter(state.values())).device)


def _range_batch_norm(m: RangeBatchNorm2d, i: int, _path: str) -> nn.Module:
    """An evaluated width of a universally slimmable BN: its first channels of the shared affine
    parameters and that width's own (calibrated) running statistics."""
    return m.plain(i)


def _sequential(m: nn.Module, i: int, path: str) -> nn.Sequential:
    return nn.Sequential(*(plain_module(child, i, f"{path}.{name}")
                           for name, child in m.named_children()))


def _depthwise_separable(m: nn.Module, i: int, path: str) -> PlainDepthwiseSeparable:
    return PlainDepthwiseSeparable(*(plain_module(m.get_submodule(n), i, f"{path}.{n}")
                                     for n in ("depthwise", "pointwise")))


def _basic_block(m: nn.Module, i: int, path: str) -> PlainBasicBlock:
    conv1, bn1, conv2, bn2 = (plain_module(m.get_submodule(n), i, f"{path}.{n}")
                              for n in ("conv1", "bn1", "conv2", "bn2"))
    shortcut = None if m.shortcut is None else plain_module(m.get_submodule("shortcut"), i,
                                                            f"{path}.shortcut")
    return PlainBasicBlock(conv1, bn1, conv2, bn2, shortcut)


def _converters() -> dict[type, Callable[[Any, int, str], nn.Module]]:
    from kdreg_plugins.backbones.mobilenet_v1 import DepthwiseSeparable
    from kdreg_plugins.backbones.slimmable_resnet import SlimmableBasicBlock

    return {
        SlimmableConv2d: _conv,
        SlimmableLinear: _linear,
        SwitchableBatchNorm2d: _batch_norm,
        RangeBatchNorm2d: _range_batch_norm,
        nn.Sequential: _sequential,
        DepthwiseSeparable: _depthwise_separable,
        SlimmableBasicBlock: _basic_block,
    }


CONVERTERS = _converters()
