"""Reusable slimmable layers (Yu et al., Slimmable Neural Networks) and a slimmable backbone base.

A slimmable layer allocates its largest shape; at width index ``i`` it uses the first
``out_list[i]`` output and ``in_list[i]`` input channels (a depthwise conv uses ``groups`` = the
active channels). :class:`SwitchableBatchNorm2d` keeps one private ``BatchNorm2d`` per width; every
other weight is shared. :func:`set_width_index` switches every slimmable layer of a model at once.

:func:`no_decay_kinds` lists, for any model, why each parameter takes no weight decay (the engine's
:func:`kdreg.engine.optim.no_decay_kind`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdreg.backbone import FlexibleBackbone, segment_range
from kdreg.engine.optim import NoDecayKind, no_decay_kind  # one rule, the engine's
from kdreg.engine.pointwise import pointwise_conv2d
from kdreg.errors import OptionError

DEFAULT_WIDTHS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)


# ------------------------------------------------------------------------------------ widths
def check_widths(widths: Sequence[float]) -> tuple[float, ...]:
    """``widths`` as a tuple, or :class:`OptionError` (key ``widths``) unless strictly increasing
    numbers in (0, 1]."""
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise OptionError(f"widths must be a list of numbers, got {widths!r}", key="widths")
    if not widths:
        raise OptionError("widths must name at least one width", key="widths")
    out = []
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise OptionError(f"widths must be numbers, got {w!r}", key="widths")
        if not 0.0 < w <= 1.0:
            raise OptionError(f"every width must lie in (0, 1], got {w!r}", key="widths")
        out.append(float(w))
    if any(b <= a for a, b in zip(out, out[1:])):
        raise OptionError(f"widths must be strictly increasing, got {list(widths)!r}", key="widths")
    return tuple(out)


def width_label(width: float) -> str:
    """The sub-model label of a width: ``x0.25``, ``x0.5``, ``x1.0``."""
    text = f"{width:g}"
    if text.isdigit():
        text += ".0"
    return f"x{text}"


def scale_channels(channels: int, width: float) -> int:
    """``int(channels * width)``, at least 1: the width-multiplier rule of the CIFAR MobileNet.

    A tiny epsilon keeps products that are integers in exact arithmetic (0.29 * 100) from rounding
    down through floating-point error.
    """
    return max(1, int(channels * width + 1e-9))


# ------------------------------------------------------------------------------------ layers
class SlimmableMixin(ABC):
    """A layer whose active width is chosen by :attr:`width_index` (set by :func:`set_width_index`)."""

    num_widths: int
    width_index: int

    def _init_widths(self, num_widths: int) -> None:
        self.num_widths = num_widths
        self.width_index = num_widths - 1

    def check_width(self, index: int) -> int:
        if not 0 <= index < self.num_widths:
            raise IndexError(f"width index {index} out of range 0..{self.num_widths - 1}")
        return index

    @abstractmethod
    def params_at(self, index: int) -> int:
        """Number of parameters this layer uses at width ``index``."""


def _check_lists(*lists: Sequence[int]) -> int:
    n = len(lists[0])
    if n == 0 or any(len(c) != n for c in lists):
        raise ValueError(f"channel lists must be non-empty and of equal length, got {lists}")
    if any(int(c) < 1 for cs in lists for c in cs):
        raise ValueError(f"channel counts must be positive, got {lists}")
    return n


def _corner_index(rows: int, cols: int | None) -> tuple[slice, ...]:
    return (slice(rows),) if cols is None else (slice(rows), slice(cols))


class _Corner(torch.autograd.Function):
    """``weight[:rows, :cols]`` as a contiguous tensor; its backward writes the gradient into one
    zero tensor of the full shape (slicing two dimensions would allocate two, one per dimension,
    and leave the convolution to copy the strided slice in forward and again in backward)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, rows: int, cols: int | None) -> Tensor:
        ctx.shape, ctx.index = weight.shape, _corner_index(rows, cols)
        return weight[ctx.index].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        full = grad.new_zeros(ctx.shape)
        full[ctx.index] = grad
        return full, None, None


def corner(weight: Tensor, rows: int, cols: int | None = None) -> Tensor:
    """``weight[:rows, :cols]`` (``cols=None``: ``weight[:rows]``): ``weight`` itself when that is
    all of it; when training, a contiguous copy whose gradient flows into the corner of
    ``weight``'s through one full-size zero tensor (:class:`_Corner`)."""
    if rows == weight.shape[0] and (cols is None or cols == weight.shape[1]):
        return weight
    if torch.is_grad_enabled() and weight.requires_grad:
        return _Corner.apply(weight, rows, cols)
    return weight[_corner_index(rows, cols)]


class SlimmableConv2d(nn.Conv2d, SlimmableMixin):
    """A conv of the largest shape, run on its first ``in_list[i]`` / ``out_list[i]`` channels.

    ``depthwise=True`` makes a depthwise conv (``in_list`` must equal ``out_list``); at width ``i``
    it runs with ``groups = in_list[i]``.
    """

    def __init__(
        self,
        in_list: Sequence[int],
        out_list: Sequence[int],
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        depthwise: bool = False,
        bias: bool = True,
    ):
        n = _check_lists(in_list, out_list)
        if depthwise and list(in_list) != list(out_list):
            raise ValueError("a depthwise slimmable conv needs in_list == out_list")
        cin, cout = max(in_list), max(out_list)
        super().__init__(cin, cout, kernel_size, stride, padding,
                         groups=cin if depthwise else 1, bias=bias)
        self.in_list = tuple(int(c) for c in in_list)
        self.out_list = tuple(int(c) for c in out_list)
        self.depthwise = depthwise
        self._init_widths(n)

    def forward(self, x: Tensor) -> Tensor:
        i = self.width_index
        cin, cout = self.in_list[i], self.out_list[i]
        if x.shape[1] != cin:
            raise ValueError(f"{type(self).__name__} at width index {i} expects {cin} input "
                             f"channels, got {x.shape[1]}")
        weight = corner(self.weight, cout, None if self.depthwise else cin)
        bias = corner(self.bias, cout) if self.bias is not None else None
        groups = cin if self.depthwise else 1
        # a strided 1x1 conv of few channels avoids oneDNN's broken AVX2 weight-gradient kernel
        return pointwise_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def params_at(self, index: int) -> int:
        i = self.check_width(index)
        cin = 1 if self.depthwise else self.in_list[i]
        cout = self.out_list[i]
        k = self.weight.shape[2] * self.weight.shape[3]
        return cout * cin * k + (cout if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in_list={self.in_list}, out_list={self.out_list}, " + super().extra_repr()


class SlimmableLinear(nn.Linear, SlimmableMixin):
    """A linear layer of the largest shape, run on its first ``in_list[i]`` / ``out_list[i]``
    features (a classifier keeps ``out_list`` = ``[num_classes] * n``)."""

    def __init__(self, in_list: Sequence[int], out_list: Sequence[int], bias: bool = True):
        n = _check_lists(in_list, out_list)
        super().__init__(max(in_list), max(out_list), bias=bias)
        self.in_list = tuple(int(c) for c in in_list)
        self.out_list = tuple(int(c) for c in out_list)
        self._init_widths(n)

    def forward(self, x: Tensor) -> Tensor:
        i = self.width_index
        cin, cout = self.in_list[i], self.out_list[i]
        if x.shape[-1] != cin:
            raise ValueError(f"{type(self).__name__} at width index {i} expects {cin} input "
                             f"features, got {x.shape[-1]}")
        bias = corner(self.bias, cout) if self.bias is not None else None
        return F.linear(x, corner(self.weight, cout, cin), bias)

    def params_at(self, index: int) -> int:
        i = self.check_width(index)
        cout = self.out_list[i]
        return cout * self.in_list[i] + (cout if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in_list={self.in_list}, out_list={self.out_list}, bias={self.bias is not None}"


class SwitchableBatchNorm2d(nn.Module, SlimmableMixin):
    """One private ``BatchNorm2d`` per width (own affine parameters and running statistics)."""

    def __init__(self, num_features_list: Sequence[int], **bn_kwargs: Any):
        super().__init__()
        n = _check_lists(num_features_list)
        self.num_features_list = tuple(int(c) for c in num_features_list)
        self.bn = nn.ModuleList(nn.BatchNorm2d(c, **bn_kwargs) for c in self.num_features_list)
        self._init_widths(n)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn[self.width_index](x)

    def params_at(self, index: int) -> int:
        return sum(p.numel() for p in self.bn[self.check_width(index)].parameters())


def slimmable_layers(module: nn.Module) -> Iterator[SlimmableMixin]:
    """Every slimmable layer inside ``module`` (itself included)."""
    for m in module.modules():
        if isinstance(m, SlimmableMixin):
            yield m


def set_width_index(module: nn.Module, index: int) -> None:
    """Make every slimmable layer of ``module`` run at width ``index``."""
    for layer in slimmable_layers(module):
        layer.width_index = layer.check_width(index)


def count_params_at(module: nn.Module, index: int) -> int:
    """Parameters ``module`` uses at width ``index``: each slimmable layer's :meth:`params_at`
    (only that width's BN counts) plus every ordinary parameter."""
    if isinstance(module, SlimmableMixin):
        return module.params_at(index)
    own = sum(p.numel() for p in module.parameters(recurse=False))
    return own + sum(count_params_at(child, index) for child in module.children())


# ------------------------------------------------------------------------------------ weight decay
def no_decay_kinds(model: nn.Module) -> dict[str, NoDecayKind | None]:
    """``{full parameter name: no_decay_kind}`` for every parameter of ``model`` (shared ones once)."""
    kinds: dict[str, NoDecayKind | None] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            kinds[f"{prefix}.{name}" if prefix else name] = no_decay_kind(module, name)
    return kinds


# ------------------------------------------------------------------------------------ backbone
class SlimmableBackbone(FlexibleBackbone, ABC):
    """A multi-pass flexible backbone whose sub-models are widths (``x0.25`` ... ``x1.0``).

    Subclasses build their layers from :meth:`channels` and implement :meth:`forward_width`, the
    forward pass at the width set by :meth:`set_width`.
    """

    single_pass = False
    #: attributes holding the stages, input side first; also the split points
    stage_names: tuple[str, ...] = ()

    def __init__(
        self,
        widths: Sequence[float] = DEFAULT_WIDTHS,
        *,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
    ):
        super().__init__()
        self.widths = check_widths(widths)
        self.submodel_labels = tuple(width_label(w) for w in self.widths)
        self.in_chans = in_chans
        self.input_size = (int(input_size[0]), int(input_size[1]))

    def channels(self, base: int) -> list[int]:
        """Channel counts of a layer with ``base`` channels at full width, one per width."""
        return [scale_channels(base, w) for w in self.widths]

    def set_width(self, index: int) -> None:
        """Run every slimmable layer at width ``index`` (negative indices count from the end)."""
        set_width_index(self, self.check_index(index))

    def forward_submodel(self, x: Tensor, index: int) -> Tensor:
        self.set_width(index)
        return self.forward_width(x)

    def forward_width(self, x: Tensor) -> Tensor:
        """Logits at the current width."""
        return self._run(x, None, None)

    @abstractmethod
    def classify(self, h: Tensor) -> Tensor:
        """Logits from the last stage's features (pooling and classifier)."""

    def _run(self, h: Tensor, start: str | None, end: str | None) -> Tensor:
        i, j = segment_range(self.stage_names, start, end)
        for name in self.stage_names[i:j]:
            h = getattr(self, name)(h)
        return self.classify(h) if end is None else h

    def split_points(self) -> tuple[str, ...]:
        return self.stage_names

    def forward_segment(self, h: Tensor, start: str | None, end: str | None) -> Tensor:
        """The full-width model from ``start`` to ``end`` (switches to the largest width)."""
        self.set_width(-1)
        return self._run(h, start, end)

    def feature_submodels(self) -> tuple[int, ...]:
        return tuple(range(self.num_submodels)) if self.split_points() else ()

    def forward_features(self, x: Tensor, index: int, points: Sequence[str]) -> tuple[list[Tensor], Tensor]:
        """Features of width ``index`` at ``points`` and its logits, from one forward pass."""
        wanted = self.ordered_points(points)
        self.set_width(index)
        feats, h, start = [], x, None
        for p in wanted:
            h = self._run(h, start, p)
            feats.append(h)
            start = p
        return feats, self._run(h, start, None)

    def count_params(self) -> list[int]:
        return [count_params_at(self, i) for i in range(self.num_submodels)]

    def export_submodel(self, index: int) -> nn.Module:
        """Width ``index`` as a plain network of ordinary conv, BN and linear layers holding only
        that width's slices of the weights and its own BN (``kdreg_plugins.backbones.export``)."""
        from kdreg_plugins.backbones.export import plain_width

        return plain_width(self, index)
