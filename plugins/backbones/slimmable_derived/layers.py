"""The sliced layers a traced network's convolutions, linear and normalisation layers become:
each runs on the first channels of its input and output at the width set by
:func:`~kdreg_plugins.backbones.slimmable.set_width_index` (the last ones at a width slot in its
``tail_slots``: Scala's isolated activation), and ``plain(index)`` is that width as an ordinary
layer holding only its channels."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdreg_plugins.backbones.slimmable import (
    SlimmableConv2d,
    SlimmableLinear,
    SlimmableMixin,
    SwitchableBatchNorm2d,
    check_in_features,
    chunk_corner,
    corner,
    narrowed_batch_norm,
)


class DerivedConv2d(SlimmableConv2d):
    """A slimmable copy of any ``nn.Conv2d``: its kernel, stride, padding, dilation and groups.
    A grouped conv (depthwise included) keeps its group width: at width ``i`` it runs
    ``in_list[i] / group width`` groups."""

    def __init__(self, conv: nn.Conv2d, in_list: Sequence[int], out_list: Sequence[int]):
        nn.Conv2d.__init__(self, conv.in_channels, conv.out_channels, conv.kernel_size,  # type: ignore[arg-type]
                           conv.stride, conv.padding, conv.dilation, conv.groups,  # type: ignore[arg-type]
                           bias=conv.bias is not None, device=conv.weight.device,
                           dtype=conv.weight.dtype)
        self.in_list = tuple(int(c) for c in in_list)
        self.out_list = tuple(int(c) for c in out_list)
        self.group_width = conv.in_channels // conv.groups
        self.depthwise = conv.groups > 1 and self.group_width == 1
        #: timm's Conv2dSame: TensorFlow's 'same' padding, computed from the input's size
        self.same = is_conv2d_same(conv)
        self._record_rules(in_list=in_list, out_list=out_list)
        self._init_widths(len(self.in_list))
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if self.bias is not None and conv.bias is not None:
                self.bias.copy_(conv.bias)

    def _active(self, i: int) -> tuple[int, int, int]:
        cin, cout = self.in_list[i], self.out_list[i]
        return cin, cout, (cin // self.group_width if self.groups > 1 else 1)

    def _weights(self, i: int) -> tuple[Tensor, Tensor | None]:
        """The weight and bias width ``i`` runs with."""
        cin, cout, _ = self._active(i)
        t = self.from_end(i)
        weight = (corner(self.weight, cout, tail=t) if self.groups > 1
                  else corner(self.weight, cout, cin, tail=t))
        return weight, corner(self.bias, cout, tail=t) if self.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        i = self.width_index
        cin, _, groups = self._active(i)
        if x.shape[1] != cin:
            raise ValueError(f"{type(self).__name__} at width index {i} expects {cin} input "
                             f"channels, got {x.shape[1]}")
        weight, bias = self._weights(i)
        if self.same:
            from timm.layers.padding import pad_same

            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return _conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def params_at(self, index: int) -> int:
        cin, cout, groups = self._active(self.check_width(index))
        k = self.weight.shape[2] * self.weight.shape[3]
        return cout * (cin // groups) * k + (cout if self.bias is not None else 0)

    def plain(self, index: int) -> nn.Conv2d:
        from timm.layers import Conv2dSame

        cin, cout, groups = self._active(self.check_width(index))
        kind = Conv2dSame if self.same else nn.Conv2d
        conv = kind(cin, cout, self.kernel_size, self.stride, self.padding, self.dilation, groups,
                    bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            weight, bias = self._weights(index)
            conv.weight.copy_(weight)
            if bias is not None and conv.bias is not None:
                conv.bias.copy_(bias)
        return conv


def is_conv2d_same(conv: nn.Module) -> bool:
    from timm.layers import Conv2dSame

    return type(conv) is Conv2dSame


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any,
          dilation: Any, groups: int) -> Tensor:
    from kdreg.pointwise import pointwise_conv2d

    # a strided 1x1 conv of few channels avoids oneDNN's broken AVX2 weight-gradient kernel
    return pointwise_conv2d(x, weight, bias, stride, padding, dilation, groups)


class DerivedLinear(SlimmableLinear):
    """A slimmable copy of an ``nn.Linear`` (over the last dimension), holding all of its weight
    whatever the widest width. ``chunks = n``: its output is ``n`` equal chunks (a gated MLP's
    value and gate, chunked after it) and width ``i`` writes the first ``out_list[i]`` channels of
    each."""

    def __init__(self, linear: nn.Linear, in_list: Sequence[int], out_list: Sequence[int],
                 chunks: int = 1):
        nn.Linear.__init__(self, linear.in_features, linear.out_features,
                           bias=linear.bias is not None, device=linear.weight.device,
                           dtype=linear.weight.dtype)
        self.in_list = tuple(int(c) for c in in_list)
        self.out_list = tuple(int(c) for c in out_list)
        self.chunks = chunks
        self._record_rules(in_list=in_list, out_list=out_list)
        self._init_widths(len(self.in_list))
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            if self.bias is not None and linear.bias is not None:
                self.bias.copy_(linear.bias)

    def _rows(self, cout: int, cin: int, tail: bool = False) -> tuple[Tensor, Tensor | None]:
        """The first ``cout`` rows of each chunk of the weight and bias, their first ``cin``
        columns (``tail``: the last ones)."""
        n, w, b = self.chunks, self.weight, self.bias
        return (chunk_corner(w, n, cout, cin, tail=tail),
                None if b is None else chunk_corner(b, n, cout, tail=tail))

    def forward(self, x: Tensor) -> Tensor:
        i = self.width_index
        cin, cout = self.in_list[i], self.out_list[i]
        check_in_features(self, x, i, cin)
        return F.linear(x, *self._rows(cout, cin, self.from_end(i)))

    def params_at(self, index: int) -> int:
        i = self.check_width(index)
        cout = self.chunks * self.out_list[i]
        return cout * self.in_list[i] + (cout if self.bias is not None else 0)

    def plain(self, index: int) -> nn.Linear:
        i = self.check_width(index)
        cin, cout = self.in_list[i], self.out_list[i]
        out = nn.Linear(cin, self.chunks * cout, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            weight, bias = self._rows(cout, cin, self.from_end(i))
            out.weight.copy_(weight)
            if bias is not None and out.bias is not None:
                out.bias.copy_(bias)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", chunks={self.chunks}" if self.chunks > 1 else "")


class SwitchableNorm(SwitchableBatchNorm2d):
    """One private copy of a BatchNorm layer per width (:func:`narrowed_batch_norm`), each
    starting from the first channels of the original."""

    def __init__(self, norm: _BatchNorm, sizes: Sequence[int]):
        nn.Module.__init__(self)
        self.num_features_list = tuple(int(c) for c in sizes)
        self.bn = nn.ModuleList(narrowed_batch_norm(norm, c) for c in self.num_features_list)
        self._record_rules(num_features_list=sizes)
        self._init_widths(len(self.num_features_list))

    def load_plain(self, state: dict[str, Tensor], prefix: str) -> None:
        with torch.no_grad():
            for bn, c in zip(self.bn, self.num_features_list):
                for name, t in bn.state_dict(keep_vars=True).items():
                    src = state[prefix + name]
                    t.copy_(src[:c] if src.dim() == 1 and t.dim() == 1 else src)

    def plain(self, index: int) -> nn.Module:
        return copy.deepcopy(self.bn[self.check_width(index)])


class SlicedLayerNorm(nn.LayerNorm, SlimmableMixin):
    """A LayerNorm over the channels, sliced: width ``i`` normalises the first ``sizes[i]``
    channels with the first entries of the shared vectors. ``channels_first``: over dim 1 of an
    NCHW map (timm's ``LayerNorm2d``), else over the last dimension."""

    sizes: tuple[int, ...]

    def __init__(self, norm: nn.LayerNorm, sizes: Sequence[int], *, channels_first: bool):
        super().__init__(norm.normalized_shape, eps=norm.eps,
                         elementwise_affine=norm.elementwise_affine,
                         bias=norm.bias is not None)
        self.to(device=device_of(norm))
        if norm.weight is not None:
            self.load_state_dict(norm.state_dict())
        self.sizes = tuple(int(c) for c in sizes)
        self.channels_first = channels_first
        self._record_rules(sizes=sizes)
        self._init_widths(len(self.sizes))

    def forward(self, x: Tensor) -> Tensor:
        k, t = self.sizes[self.width_index], self.from_end(self.width_index)
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)
        w = corner(self.weight, k, tail=t) if self.weight is not None else None
        b = corner(self.bias, k, tail=t) if self.bias is not None else None
        x = F.layer_norm(x, (k,), w, b, self.eps)
        return x.permute(0, 3, 1, 2) if self.channels_first else x

    def params_at(self, index: int) -> int:
        k = self.sizes[self.check_width(index)]
        return k * ((self.weight is not None) + (self.bias is not None))

    def plain(self, index: int) -> nn.LayerNorm:
        k = self.sizes[self.check_width(index)]
        kind = ChannelsFirstLayerNorm if self.channels_first else nn.LayerNorm
        out = kind(k, eps=self.eps, elementwise_affine=self.elementwise_affine,
                   bias=self.bias is not None, device=device_of(self))
        t = self.from_end(index)
        with torch.no_grad():
            if out.weight is not None and self.weight is not None:
                out.weight.copy_(corner(self.weight, k, tail=t))
            if out.bias is not None and self.bias is not None:
                out.bias.copy_(corner(self.bias, k, tail=t))
        return out


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """A LayerNorm over dim 1 of an NCHW map (timm's ``LayerNorm2d``), for exported widths."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SlicedGroupNorm(nn.GroupNorm, SlimmableMixin):
    """A GroupNorm sliced to whole groups: width ``i`` runs ``sizes[i] / group size`` groups of
    the original size (one group stays one group) on the first entries of the shared vectors."""

    sizes: tuple[int, ...]

    def __init__(self, norm: nn.GroupNorm, sizes: Sequence[int]):
        super().__init__(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine,
                         device=device_of(norm))
        self.load_state_dict(norm.state_dict())
        self.sizes = tuple(int(c) for c in sizes)
        self._record_rules(sizes=sizes)
        self._init_widths(len(self.sizes))

    def _groups(self, k: int) -> int:
        return 1 if self.num_groups == 1 else k // (self.num_channels // self.num_groups)

    def forward(self, x: Tensor) -> Tensor:
        k, t = self.sizes[self.width_index], self.from_end(self.width_index)
        w = corner(self.weight, k, tail=t) if self.weight is not None else None
        b = corner(self.bias, k, tail=t) if self.bias is not None else None
        return F.group_norm(x, self._groups(k), w, b, self.eps)

    def params_at(self, index: int) -> int:
        return 2 * self.sizes[self.check_width(index)] if self.affine else 0

    def plain(self, index: int) -> nn.GroupNorm:
        k = self.sizes[self.check_width(index)]
        out = nn.GroupNorm(self._groups(k), k, eps=self.eps, affine=self.affine,
                           device=device_of(self))
        if self.affine:
            t = self.from_end(index)
            with torch.no_grad():
                out.weight.copy_(corner(self.weight, k, tail=t))
                out.bias.copy_(corner(self.bias, k, tail=t))
        return out


class SlicedTensor(nn.Module, SlimmableMixin):
    """A parameter (or buffer) the traced graph reads directly, sliced along ``dim`` to
    ``sizes[i]`` at width ``i``: the graph reads this module's output instead."""

    sizes: tuple[int, ...]
    dim: int
    weight: Tensor

    def __init__(self, value: Tensor, dim: int, sizes: Sequence[int]):
        super().__init__()
        if isinstance(value, nn.Parameter):
            self.weight = nn.Parameter(value.detach().clone(), value.requires_grad)
        else:
            self.register_buffer("weight", value.detach().clone())
        self.dim = dim
        self.sizes = tuple(int(c) for c in sizes)
        self._record_rules(sizes=sizes)
        self._init_widths(len(self.sizes))

    def _start(self, index: int) -> int:
        return self.weight.shape[self.dim] - self.sizes[index] if self.from_end(index) else 0

    def forward(self) -> Tensor:
        i = self.width_index
        out = self.weight.narrow(self.dim, self._start(i), self.sizes[i])
        # a view taken without grad mode of a parameter claims requires_grad but has no grad_fn,
        # which hooks on a module's output (the MAC counter's module tracker) cannot take
        return out if torch.is_grad_enabled() else out.detach()

    def params_at(self, index: int) -> int:
        if not isinstance(self.weight, nn.Parameter):
            return 0
        full = self.weight.shape[self.dim]
        return self.weight.numel() // full * self.sizes[self.check_width(index)]

    def load_plain(self, state: dict[str, Tensor], prefix: str) -> None:
        with torch.no_grad():
            self.weight.copy_(state[prefix.rstrip(".")])

    def plain(self, index: int) -> nn.Module:
        k = self.sizes[self.check_width(index)]
        return TensorHolder(self.weight.detach().narrow(self.dim, self._start(index), k).clone(),
                            isinstance(self.weight, nn.Parameter))


class TensorHolder(nn.Module):
    """A parameter (or buffer) as a module whose forward returns it (exported widths)."""

    def __init__(self, value: Tensor, parameter: bool):
        super().__init__()
        if parameter:
            self.weight = nn.Parameter(value)
        else:
            self.register_buffer("weight", value)

    def forward(self) -> Tensor:
        return self.weight


def device_of(module: nn.Module) -> torch.device:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")
