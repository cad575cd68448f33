"""Reusable slimmable layers (Yu et al., Slimmable Neural Networks) and a slimmable backbone base.

A slimmable layer allocates its largest shape; at width index ``i`` it uses the first
``out_list[i]`` output and ``in_list[i]`` input channels (a depthwise conv uses ``groups`` = the
active channels). :class:`SwitchableBatchNorm2d` keeps one private ``BatchNorm2d`` per width; every
other weight is shared. :func:`set_width_index` switches every slimmable layer of a model at once.

:func:`no_decay_kinds` lists, for any model, why each parameter takes no weight decay (the engine's
:func:`kdreg.weight_decay.no_decay_kind`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdreg.backbone import FlexibleBackbone, segment_range, walk_segments
from kdreg.errors import OptionError
from kdreg.pointwise import pointwise_conv2d
from kdreg.weight_decay import NoDecayKind, no_decay_kind  # one rule, the optimizer's

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


@dataclass(frozen=True)
class WidthRange:
    """Widths trained by the sandwich rule: each training step trains ``min``, ``sampled`` widths
    drawn by the step's seed and ``max``; ``eval`` are the widths evaluated, counted and exported.

    A continuous range (universally slimmable, US-Nets; ``members`` empty) draws the ``sampled``
    widths uniformly from (min, max). A discrete set (``members``, strictly increasing, ``min``
    and ``max`` its ends; Scala's X widths) cuts its interior into ``sampled`` consecutive strata
    of equal size (the first ones a member shorter when it does not divide) and draws one member
    uniformly from each, so that the step's widths are distinct and sorted."""

    min: float
    max: float
    sampled: int
    eval: tuple[float, ...]
    members: tuple[float, ...] = ()

    @property
    def train_labels(self) -> tuple[str, ...]:
        return ("min", *(f"sampled{k + 1}" for k in range(self.sampled)), "max")

    def _strata(self) -> list[tuple[float, ...]]:
        inner, s = self.members[1:-1], self.sampled
        return [inner[k * len(inner) // s:(k + 1) * len(inner) // s] for k in range(s)]

    def initial_widths(self) -> tuple[float, ...]:
        """The step's widths before any draw: the sampled ones evenly spaced inside the range
        (a set: the middle member of each stratum)."""
        if self.members:
            inner = tuple(stratum[(len(stratum) - 1) // 2] for stratum in self._strata())
        else:
            inner = tuple(self.min + (self.max - self.min) * (k + 1) / (self.sampled + 1)
                          for k in range(self.sampled))
        return (self.min, *inner, self.max)

    def draw(self, seed: int) -> tuple[float, ...]:
        """The step's widths ``[min, sampled..., max]`` (sorted), drawn with a CPU generator seeded
        with ``seed``."""
        g = torch.Generator().manual_seed(int(seed))
        if self.members:
            picks = [stratum[int(torch.randint(len(stratum), (1,), generator=g))]
                     for stratum in self._strata()]
            return (self.min, *picks, self.max)
        u = torch.rand(self.sampled, generator=g, dtype=torch.float64).tolist()
        return (self.min, *sorted(self.min + (self.max - self.min) * x for x in u), self.max)

    def trained(self, width: float) -> bool:
        """Whether training steps run ``width``: a member of the set, or within [min, max]."""
        if self.members:
            return any(abs(width - m) <= 1e-12 for m in self.members)
        return self.min - 1e-12 <= width <= self.max + 1e-12


RANGE_KEYS = ("min", "max", "set", "sampled", "eval")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(f"{what} must be a number, got {value!r}", key="widths")
    if not 0.0 < value <= 1.0:
        raise OptionError(f"{what} must lie in (0, 1], got {value!r}", key="widths")
    return float(value)


def _sampled(spec: Mapping[str, Any]) -> int:
    sampled = spec.get("sampled", 2)
    if isinstance(sampled, bool) or not isinstance(sampled, int) or sampled < 0:
        raise OptionError(f"widths.sampled must be an integer >= 0, got {sampled!r}",
                          key="widths")
    return sampled


def check_width_range(spec: Mapping[str, Any]) -> WidthRange:
    """``widths = { min, max, sampled, eval }`` or ``{ set, sampled, eval }`` checked, or
    :class:`OptionError` (key ``widths``). A range: ``min <= max`` in (0, 1], ``sampled >= 0``,
    ``eval`` (default: 4 widths evenly spaced from ``min`` to ``max`` inclusive) strictly
    increasing within [min, max]. A set (:func:`check_width_set`): its members instead of
    ``min`` and ``max``."""
    unknown = sorted(set(spec) - set(RANGE_KEYS))
    if unknown:
        raise OptionError(f"unknown key(s) {', '.join(map(repr, unknown))} in the width range; "
                          f"accepted: {', '.join(RANGE_KEYS)}", key="widths")
    if "set" in spec:
        return check_width_set(spec)
    missing = [k for k in ("min", "max") if k not in spec]
    if missing:
        raise OptionError(f"a width range needs {' and '.join(missing)}, e.g. widths = "
                          "{ min = 0.25, max = 1.0, sampled = 2 }", key="widths")
    low, high = _number(spec["min"], "widths.min"), _number(spec["max"], "widths.max")
    if low > high:
        raise OptionError(f"widths.min ({low:g}) must not exceed widths.max ({high:g})",
                          key="widths")
    sampled = _sampled(spec)
    if "eval" in spec:
        evaluated = check_eval_widths(spec["eval"], low, high)
    else:
        evaluated = tuple(dict.fromkeys(round(low + (high - low) * k / 3, 12) for k in range(4)))
    return WidthRange(low, high, sampled, evaluated)


def check_width_set(spec: Mapping[str, Any]) -> WidthRange:
    """``widths = { set = [...], sampled = 2, eval = [...] }``: a discrete set of at least two
    widths (:func:`check_widths`) trained by the sandwich rule, ``sampled`` (default 2) at most
    the number of its interior members, ``eval`` members of the set (default: the 4 members at
    evenly spaced positions, smallest and largest included)."""
    both = [k for k in ("min", "max") if k in spec]
    if both:
        raise OptionError(f"a width set gives its own smallest and largest width; drop "
                          f"{' and '.join(both)} (or the set)", key="widths")
    members = check_widths(spec["set"])
    if len(members) < 2:
        raise OptionError(f"a width set needs at least two widths, got {list(members)}",
                          key="widths")
    sampled = _sampled(spec)
    if sampled > len(members) - 2:
        raise OptionError(f"widths.sampled ({sampled}) exceeds the {len(members) - 2} widths "
                          f"inside the set {list(members)}", key="widths")
    if "eval" in spec:
        evaluated = check_eval_widths(spec["eval"], members[0], members[-1])
        outside = [w for w in evaluated if not any(abs(w - m) <= 1e-12 for m in members)]
        if outside:
            raise OptionError(f"evaluated widths {', '.join(f'{w:g}' for w in outside)} are not in "
                              f"the trained set {', '.join(f'{m:g}' for m in members)}",
                              key="widths")
    else:
        n = len(members)
        evaluated = tuple(dict.fromkeys(members[round(k * (n - 1) / 3)] for k in range(4)))
    return WidthRange(members[0], members[-1], sampled, evaluated, members)


def check_eval_widths(widths: Any, low: float, high: float) -> tuple[float, ...]:
    """Evaluated widths of a range: :func:`check_widths`, each within [low, high], labels distinct."""
    out = check_widths(widths)
    outside = [w for w in out if not low - 1e-12 <= w <= high + 1e-12]
    if outside:
        raise OptionError(f"evaluated widths {', '.join(f'{w:g}' for w in outside)} lie outside "
                          f"the trained range [{low:g}, {high:g}]", key="widths")
    labels = [width_label(w) for w in out]
    if len(set(labels)) != len(labels):
        raise OptionError(f"evaluated widths {list(out)} are too close to tell apart in their "
                          f"labels {labels}", key="widths")
    return out


def parse_widths(widths: Any) -> tuple[float, ...] | WidthRange:
    """A list of widths (:func:`check_widths`) or a range table (:func:`check_width_range`)."""
    if isinstance(widths, WidthRange):
        return widths
    if isinstance(widths, Mapping):
        return check_width_range(widths)
    return check_widths(widths)


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


@dataclass(frozen=True)
class ChannelRule:
    """How many of a layer's ``base`` channels (at width 1.0) run at any width: ``int(base * w)``
    (:func:`scale_channels`), rounded down to whole groups of ``multiple`` (at least one);
    ``fixed``: always all of them (the image's channels, the logits)."""

    base: int
    multiple: int = 1
    fixed: bool = False

    def at(self, width: float) -> int:
        if self.fixed:
            return self.base
        k = int(self.base * width + 1e-9)
        return max(self.multiple, k // self.multiple * self.multiple)

    def empty_at(self, width: float) -> bool:
        """Whether ``width`` leaves this layer no channel (``int(base * w)`` below a group)."""
        return not self.fixed and int(self.base * width + 1e-9) < self.multiple


class Channels(tuple):
    """Channel counts, one per width slot, that remember the :class:`ChannelRule` they follow
    (what a range-mode backbone's :meth:`SlimmableBackbone.channels` returns)."""

    rule: ChannelRule

    def __new__(cls, counts: Sequence[int], rule: ChannelRule) -> Channels:
        out = super().__new__(cls, (int(c) for c in counts))
        out.rule = rule
        return out

    def __getnewargs__(self) -> tuple[Any, ...]:
        return (tuple(self), self.rule)  # copies and pickles keep the rule


def rule_of(counts: Sequence[int]) -> ChannelRule:
    """The rule of ``counts``: its own for :class:`Channels`, else all of them at every width."""
    rule = getattr(counts, "rule", None)
    return rule if isinstance(rule, ChannelRule) else ChannelRule(max(int(c) for c in counts),
                                                                  fixed=True)


# ------------------------------------------------------------------------------------ layers
class SlimmableMixin(ABC):
    """A layer whose active width is chosen by :attr:`width_index` (set by :func:`set_width_index`)."""

    num_widths: int
    width_index: int
    #: width slots that take the LAST channels of every sliced dimension instead of the first
    #: (Scala's isolated activation of the smallest width; set by the model)
    tail_slots: frozenset[int] = frozenset()
    #: attribute holding channel counts per width slot -> the rule that computes them (range mode)
    channel_rules: dict[str, ChannelRule]

    def _init_widths(self, num_widths: int) -> None:
        self.num_widths = num_widths
        self.width_index = num_widths - 1

    def _record_rules(self, **lists: Sequence[int]) -> None:
        self.channel_rules = {name: rule_of(counts) for name, counts in lists.items()}

    def set_slot_widths(self, widths: Sequence[float]) -> None:
        """Recompute every channel list for the width slots ``widths`` (range mode)."""
        for name, rule in getattr(self, "channel_rules", {}).items():
            setattr(self, name, tuple(rule.at(w) for w in widths))
        self.num_widths = len(widths)
        self.width_index = min(self.width_index, self.num_widths - 1)

    def from_end(self, index: int) -> bool:
        """Whether width slot ``index`` takes the last channels (:attr:`tail_slots`)."""
        return index in self.tail_slots

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


def _corner_index(rows: int, cols: int | None, shape: Sequence[int] = (),
                  tail: bool = False) -> tuple[slice, ...]:
    """The first ``rows`` (and ``cols``) of a tensor, or with ``tail`` the last of ``shape``'s."""
    if tail:
        return tuple(slice(shape[d] - k, None) for d, k in enumerate((rows, cols)) if k is not None)
    return (slice(rows),) if cols is None else (slice(rows), slice(cols))


class _Corner(torch.autograd.Function):
    """``weight[index]`` (with ``view``: ``weight.view(view)[index]``, its first two dimensions
    then merged) as a dense tensor in the weight's memory format (channels-last stays
    channels-last).

    Its backward adds the gradient into the corner of ``weight.grad`` in place when that exists
    already (the wider widths of the step ran their backward first) and nothing else observes the
    weight's gradient (no hooks, no DistributedDataParallel reducer, not compiling); otherwise it
    writes it into one zero tensor of the full shape for autograd to accumulate (slicing two
    dimensions would allocate two, one per dimension)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, index: tuple[slice, ...],
                view: tuple[int, ...] | None = None) -> Tensor:
        ctx.shape, ctx.index, ctx.view = weight.shape, index, view
        ctx.weight = weight if _may_add_in_place(weight) else None
        ctx.format = _memory_format(weight)
        if view is None:
            return weight[index].clone(memory_format=torch.preserve_format)
        part = weight.view(view)[index]
        ctx.part = part.shape
        return part.reshape(part.shape[0] * part.shape[1], *part.shape[2:])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        weight, view = ctx.weight, ctx.view
        if view is not None:
            grad = grad.view(ctx.part)
        if weight is not None and weight.grad is not None and weight.grad.dtype == grad.dtype:
            into = weight.grad if view is None else weight.grad.view(view)
            into[ctx.index].add_(grad)
            return None, None, None
        full = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.format).zero_()
        (full if view is None else full.view(view))[ctx.index] = grad
        return full, None, None


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _may_add_in_place(weight: Tensor) -> bool:
    """Whether :class:`_Corner`'s backward may add into ``weight.grad`` itself: no gradient hook,
    no process group (DistributedDataParallel's reducer hooks the accumulation), not compiling."""
    dist = torch.distributed
    return (not weight._backward_hooks and getattr(weight, "_post_accumulate_grad_hooks", None) is None
            and not (dist.is_available() and dist.is_initialized())
            and not torch.compiler.is_compiling())


def check_in_features(layer: nn.Module, x: Tensor, index: int, features: int) -> None:
    """A sliced linear layer at width ``index`` takes ``features`` input features: a ValueError
    naming the layer's class otherwise."""
    if x.shape[-1] != features:
        raise ValueError(f"{type(layer).__name__} at width index {index} expects {features} input "
                         f"features, got {x.shape[-1]}")


def corner(weight: Tensor, rows: int, cols: int | None = None, *, tail: bool = False) -> Tensor:
    """``weight[:rows, :cols]`` (``cols=None``: ``weight[:rows]``; ``tail``: the last rows and
    columns, ``weight[-rows:, -cols:]``): ``weight`` itself when that is all of it; the first rows alone as a view (dense already: a bias, a depthwise kernel, whose
    gradient autograd's own slice puts into the full shape); a corner of two dimensions, when
    training, as a dense copy whose gradient goes into the corner of ``weight``'s
    (:class:`_Corner`)."""
    if rows == weight.shape[0] and (cols is None or cols == weight.shape[1]):
        return weight
    if cols is not None and torch.is_grad_enabled() and weight.requires_grad:
        return _Corner.apply(weight, _corner_index(rows, cols, weight.shape, tail))
    return weight[_corner_index(rows, cols, weight.shape, tail)]


def chunk_corner(weight: Tensor, chunks: int, rows: int, cols: int | None = None, *,
                 tail: bool = False) -> Tensor:
    """The first ``rows`` rows (``tail``: the last) of each of ``chunks`` equal blocks of
    ``weight``'s rows (a fused q, k and v projection's three), stacked, and their first ``cols``
    columns: ``weight`` itself when that is all of it; when training, a dense copy whose
    gradient goes into ``weight``'s as :func:`corner`'s does (indexing a view would allocate a
    zero gradient of the full shape per slice)."""
    full = weight.shape[0] // chunks
    if rows == full and (cols is None or cols == weight.shape[1]):
        return weight
    view = (chunks, full, *weight.shape[1:])
    index = (slice(None), *_corner_index(rows, cols, view[1:], tail))
    if torch.is_grad_enabled() and weight.requires_grad:
        return _Corner.apply(weight, index, view)
    return weight.view(view)[index].reshape(chunks * rows, *([] if cols is None else [cols]))


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
        self._record_rules(in_list=in_list, out_list=out_list)
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
        self._record_rules(in_list=in_list, out_list=out_list)
        self._init_widths(n)

    def forward(self, x: Tensor) -> Tensor:
        i = self.width_index
        cin, cout = self.in_list[i], self.out_list[i]
        check_in_features(self, x, i, cin)
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
        self._record_rules(num_features_list=num_features_list)
        self._init_widths(n)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn[self.width_index](x)

    def params_at(self, index: int) -> int:
        return sum(p.numel() for p in self.bn[self.check_width(index)].parameters())


class RangeBatchNorm2d(nn.Module, SlimmableMixin):
    """The BatchNorm of a universally slimmable layer (US-Nets, Yu & Huang ICCV 2019): ONE set of
    affine parameters shared by every width (its first ``k`` channels at a width of ``k``), batch
    statistics in training, and running statistics private to each *evaluated* width, filled only
    by calibration (:func:`kdreg.calibrate.calibrate`).

    Width slots ``0 .. num_train - 1`` are the training step's widths: they always normalise with
    the batch's statistics and keep none. Slot ``num_train + j`` is evaluated width ``j``: in eval
    mode it normalises with its own running statistics (row ``j`` of ``running_mean`` /
    ``running_var``); in training mode (calibration) it normalises with the batch's and updates
    row ``j`` (``momentum = None``: the plain average of the batches' statistics).

    ``post`` (timm's ``BatchNormAct2d``: its dropout and activation) runs after the
    normalisation; ``template`` (unregistered) is a one-channel copy of the original layer that
    :meth:`plain` fills with a width's slices (the exported width's own layer class).
    """

    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(self, norm: _BatchNorm, sizes: Sequence[int], num_train: int):
        super().__init__()
        channels = int(norm.num_features)
        self.num_features_list = tuple(int(c) for c in sizes)
        self.num_features = channels
        self.eps, self.momentum = norm.eps, norm.momentum
        self.num_train = num_train
        if norm.weight is not None:
            self.weight = nn.Parameter(norm.weight.detach().clone(), norm.weight.requires_grad)
        else:
            self.register_parameter("weight", None)
        if norm.bias is not None:
            self.bias = nn.Parameter(norm.bias.detach().clone(), norm.bias.requires_grad)
        else:
            self.register_parameter("bias", None)
        self._stats_from = norm.running_mean is not None
        n_eval = len(self.num_features_list) - num_train
        self._allocate(n_eval, device=_first_tensor(norm).device)
        if norm.running_mean is not None and norm.running_var is not None:
            with torch.no_grad():
                assert self.running_mean is not None and self.running_var is not None
                self.running_mean.copy_(norm.running_mean.expand_as(self.running_mean))
                self.running_var.copy_(norm.running_var.expand_as(self.running_var))
        tail = [getattr(norm, n) for n in ("drop", "act") if isinstance(getattr(norm, n, None),
                                                                        nn.Module)]
        self.post = nn.Sequential(*tail) if tail else None
        self._record_rules(num_features_list=sizes)
        self.template = [narrowed_batch_norm(norm, 1)]  # a list: not a submodule of this one
        self._init_widths(len(self.num_features_list))

    def _allocate(self, n_eval: int, device: torch.device) -> None:
        """Uncalibrated statistics (mean 0, variance 1) for ``n_eval`` evaluated widths."""
        if not self._stats_from:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
            return
        c = self.num_features
        self.register_buffer("running_mean", torch.zeros(n_eval, c, device=device))
        self.register_buffer("running_var", torch.ones(n_eval, c, device=device))
        self.register_buffer("num_batches_tracked",
                             torch.zeros(n_eval, dtype=torch.long, device=device))

    def set_eval_slots(self, num_eval: int) -> None:
        """Evaluated widths replaced: ``num_eval`` rows of uncalibrated statistics."""
        self._allocate(num_eval, device=_first_tensor(self).device)

    def reset_running_stats(self) -> None:
        """Uncalibrated statistics for the width now active (an evaluated one), or every one."""
        if self.running_mean is None or self.running_var is None:
            return
        assert self.num_batches_tracked is not None
        j = self.width_index - self.num_train
        rows = slice(None) if j < 0 else slice(j, j + 1)
        self.running_mean[rows] = 0.0
        self.running_var[rows] = 1.0
        self.num_batches_tracked[rows] = 0

    def load_plain(self, state: Mapping[str, Tensor], prefix: str) -> None:
        """Take a plain BatchNorm's state (keys ``prefix + weight`` ...): the affine parameters,
        and its statistics' first channels for every evaluated width."""
        c = self.num_features
        with torch.no_grad():
            for name in ("weight", "bias"):
                own = getattr(self, name)
                if own is not None:
                    own.copy_(state[prefix + name][:c])
            for name in ("running_mean", "running_var"):
                own = getattr(self, name)
                if own is not None and prefix + name in state:
                    own.copy_(state[prefix + name][:c].expand_as(own))

    def forward(self, x: Tensor) -> Tensor:
        k = self.num_features_list[self.width_index]
        j = self.width_index - self.num_train
        w = corner(self.weight, k) if self.weight is not None else None
        b = corner(self.bias, k) if self.bias is not None else None
        if j < 0 or self.running_mean is None or self.running_var is None:
            out = F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        elif self.training:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked[j] += 1
            factor = (1.0 / float(self.num_batches_tracked[j]) if self.momentum is None
                      else self.momentum)
            out = F.batch_norm(x, self.running_mean[j, :k], self.running_var[j, :k], w, b, True,
                               factor, self.eps)
        else:
            out = F.batch_norm(x, self.running_mean[j, :k], self.running_var[j, :k], w, b, False,
                               0.0, self.eps)
        return out if self.post is None else self.post(out)

    def params_at(self, index: int) -> int:
        k = self.num_features_list[self.check_width(index)]
        return k * ((self.weight is not None) + (self.bias is not None))

    def plain(self, index: int) -> nn.Module:
        """Evaluated width slot ``index`` as the original layer class holding its first ``k``
        affine entries and its own running statistics (eval mode)."""
        j = self.check_width(index) - self.num_train
        if j < 0:
            raise IndexError(f"width slot {index} is a training step's width: it has no running "
                             "statistics to export")
        k = self.num_features_list[index]
        out = copy.deepcopy(self.template[0])
        values: dict[str, Tensor | None] = {
            "weight": self.weight, "bias": self.bias,
            "running_mean": None if self.running_mean is None else self.running_mean[j],
            "running_var": None if self.running_var is None else self.running_var[j]}
        for name, value in values.items():
            current = getattr(out, name, None)
            if value is None or current is None:
                continue
            t = value.detach()[:k].clone()
            if isinstance(current, nn.Parameter):
                setattr(out, name, nn.Parameter(t, current.requires_grad))
            else:
                setattr(out, name, t)
        if self.num_batches_tracked is not None and getattr(out, "num_batches_tracked",
                                                            None) is not None:
            out.num_batches_tracked = self.num_batches_tracked[j].detach().clone()
        out.num_features = k
        return out.to(_first_tensor(self).device).eval()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"num_train={self.num_train}, sizes={self.num_features_list}")


def _first_tensor(module: nn.Module) -> Tensor:
    for p in module.parameters():
        return p
    for b in module.buffers():
        return b
    return torch.zeros(())


def narrowed_batch_norm(norm: _BatchNorm, channels: int) -> _BatchNorm:
    """A copy of ``norm`` (any BatchNorm class, timm's ``BatchNormAct2d`` with its activation)
    holding its first ``channels`` channels' affine parameters and running statistics."""
    out = copy.deepcopy(norm)
    full = norm.num_features
    for name, p in list(out.named_parameters(recurse=False)):
        if p.dim() == 1 and p.shape[0] == full:
            setattr(out, name, nn.Parameter(p.detach()[:channels].clone(), p.requires_grad))
    for name, b in list(out.named_buffers(recurse=False)):
        if b is not None and b.dim() == 1 and b.shape[0] == full:
            setattr(out, name, b[:channels].clone())
    out.num_features = channels
    return out


def slimmable_layers(module: nn.Module) -> Iterator[SlimmableMixin]:
    """Every slimmable layer inside ``module`` (itself included)."""
    for m in module.modules():
        if isinstance(m, SlimmableMixin):
            yield m


def set_width_index(module: nn.Module, index: int) -> None:
    """Make every slimmable layer of ``module`` run at width ``index``.

    The layers are found once, at the first switch, and kept on ``module`` (a step switches
    every width; walking the module tree each time cost about 2 ms a width): a model whose
    slimmable layers are replaced after its first switch calls :func:`forget_layers`."""
    layers = module.__dict__.get("_slimmable_layers")
    if layers is None:
        layers = module.__dict__["_slimmable_layers"] = tuple(slimmable_layers(module))
    for layer in layers:
        if not 0 <= index < layer.num_widths:
            layer.check_width(index)        # raises, naming the range
        layer.width_index = index


def forget_layers(module: nn.Module) -> None:
    """Let :func:`set_width_index` find ``module``'s slimmable layers again (after they were
    replaced)."""
    module.__dict__.pop("_slimmable_layers", None)


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
    forward pass at the width set by :meth:`set_width`, and call :meth:`finish_widths` at the end
    of their ``__init__``.

    **Fixed widths** (``widths = [0.25, 0.5, 0.75, 1.0]``): every slimmable layer has one channel
    count per width and each width its private BatchNorm (:class:`SwitchableBatchNorm2d`).

    **A range** (``widths = { min = 0.25, max = 1.0, sampled = 2, eval = [...] }``: universally
    slimmable, US-Nets): the layers' channel lists are over *width slots*, the training step's
    widths ``[min, sampled..., max]`` (:attr:`train_labels`, drawn by :meth:`begin_step`) then the
    evaluated widths (:attr:`submodel_labels`); channel counts follow :class:`ChannelRule` for
    whatever width a slot holds. :meth:`finish_widths` turns every switchable BN into one
    :class:`RangeBatchNorm2d`, whose evaluated widths' statistics only calibration fills
    (:meth:`needs_calibration`).
    """

    single_pass = False
    #: attributes holding the stages, input side first; also the split points
    stage_names: tuple[str, ...] = ()

    def __init__(
        self,
        widths: Sequence[float] | Mapping[str, Any] | WidthRange = DEFAULT_WIDTHS,
        *,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
    ):
        super().__init__()
        parsed = parse_widths(widths)
        self.width_range: WidthRange | None = parsed if isinstance(parsed, WidthRange) else None
        if self.width_range is None:
            assert isinstance(parsed, tuple)
            self.widths = parsed
            self.train_widths: tuple[float, ...] = ()
        else:
            r = self.width_range
            self.widths = r.eval
            self.train_labels = r.train_labels
            self.train_widths = r.initial_widths()   # before any begin_step
        self.submodel_labels = tuple(width_label(w) for w in self.widths)
        self.in_chans = in_chans
        self.input_size = (int(input_size[0]), int(input_size[1]))

    # ------------------------------------------------------------------ width slots
    @property
    def slot_widths(self) -> tuple[float, ...]:
        """The width each slot of the layers' channel lists holds: the widths (fixed mode); the
        step's widths then the evaluated ones (range mode)."""
        return self.train_widths + self.widths

    def channels(self, base: int) -> list[int]:
        """Channel counts of a layer with ``base`` channels at full width, one per width slot
        (range mode: :class:`Channels`, which remember their rule)."""
        counts = [scale_channels(base, w) for w in self.slot_widths]
        if self.width_range is None:
            return counts
        return Channels(counts, ChannelRule(int(base)))  # type: ignore[return-value]

    def finish_widths(self) -> None:
        """Called by subclasses once their layers exist. Range mode: refuse a ``min`` that leaves
        a layer no channel (naming it), and make every switchable BN one :class:`RangeBatchNorm2d`.
        Fixed widths: nothing. Either way the layers a switch sets are found anew."""
        forget_layers(self)     # a constructor may have switched widths before it was done
        r = self.width_range
        if r is None:
            return
        for name, m in self.named_modules():
            if not isinstance(m, SlimmableMixin):
                continue
            for rule in getattr(m, "channel_rules", {}).values():
                if rule.empty_at(r.min):
                    narrowest = math.ceil(1e6 * rule.multiple / rule.base) / 1e6
                    raise OptionError(
                        f"widths.min {r.min:g} leaves layer {name} no channel (int({rule.base} x "
                        f"{r.min:g}) = {int(rule.base * r.min + 1e-9)}); the narrowest width this "
                        f"model allows is {narrowest:g}", key="widths")
        for name, m in list(self.named_modules()):
            if isinstance(m, SwitchableBatchNorm2d):
                largest = m.bn[m.num_features_list.index(max(m.num_features_list))]
                assert isinstance(largest, _BatchNorm)
                sizes = Channels(m.num_features_list, m.channel_rules["num_features_list"])
                _replace(self, name, RangeBatchNorm2d(largest, sizes, len(self.train_widths)))
        forget_layers(self)
        self._apply_slots()

    def _apply_slots(self) -> None:
        widths = self.slot_widths
        for layer in slimmable_layers(self):
            layer.set_slot_widths(widths)

    def begin_step(self, seed: int) -> None:
        """Range mode: draw the step's ``sampled`` widths (:meth:`WidthRange.draw`: uniformly from
        (min, max), or one member of each stratum of a set) with a CPU generator seeded with
        ``seed``, sorted; the step trains ``[min, sampled..., max]``."""
        r = self.width_range
        if r is None:
            return
        self.train_widths = r.draw(seed)
        self._apply_slots()

    def needs_calibration(self) -> bool:
        """Range mode with BatchNorm: its evaluated widths' statistics come from calibration (a
        network normalised by LayerNorm or GroupNorm alone keeps none)."""
        return self.width_range is not None and any(isinstance(m, RangeBatchNorm2d)
                                                    for m in self.modules())

    def untrained_width_refusal(self) -> str | None:
        """Why this model cannot be evaluated at a width its training did not run, or None when
        it can (BatchNorm recalibrated, US-Nets). The default: None."""
        return None

    def set_eval_widths(self, widths: Sequence[float]) -> None:
        """Range mode: evaluate ``widths`` (within [min, max], strictly increasing) from now on;
        their statistics are uncalibrated until :func:`kdreg.calibrate.calibrate` runs."""
        r = self.width_range
        if r is None:
            raise OptionError(f"{type(self).__name__} trains the fixed widths "
                              f"{', '.join(self.submodel_labels)}; only a width range (widths = "
                              "{ min, max, ... }) evaluates other widths", key="widths")
        evaluated = check_eval_widths(widths, r.min, r.max)
        why = self.untrained_width_refusal()
        untrained = [w for w in evaluated if not r.trained(w)]
        if why is not None and untrained:
            trained = (", ".join(f"{m:g}" for m in r.members) if r.members
                       else f"{r.min:g} to {r.max:g}")
            raise OptionError(f"width(s) {', '.join(f'{w:g}' for w in untrained)} were not "
                              f"trained (trained: {trained}): {why}", key="widths")
        self.width_range = dataclasses.replace(r, eval=evaluated)
        self.widths = evaluated
        self.submodel_labels = tuple(width_label(w) for w in evaluated)
        for m in self.modules():
            if isinstance(m, RangeBatchNorm2d):
                m.set_eval_slots(len(evaluated))
        self._apply_slots()

    def eval_slot(self, index: int) -> int:
        """The width slot of evaluated width ``index``, whatever the mode."""
        n = len(self.widths)
        if not -n <= index < n:
            raise IndexError(f"sub-model index {index} out of range: {type(self).__name__} has "
                             f"{n} sub-models (0..{n - 1})")
        return len(self.train_widths) + index % n

    def check_index(self, index: int) -> int:
        """Range mode in training: an index into the step's widths; otherwise the evaluated."""
        if self.width_range is None or not self.training:
            return super().check_index(index)
        n = len(self.train_widths)
        if not -n <= index < n:
            raise IndexError(f"training sub-model index {index} out of range: "
                             f"{type(self).__name__} trains {n} widths per step (0..{n - 1})")
        return index % n

    def _slot(self, index: int) -> int:
        i = self.check_index(index)
        if self.width_range is None or self.training:
            return i
        return self.eval_slot(i)

    def set_width(self, index: int) -> None:
        """Run every slimmable layer at width ``index`` (negative indices count from the end):
        in range mode the step's ``index``-th width in training, the evaluated one in eval mode."""
        set_width_index(self, self._slot(index))

    def forward(self, x: Tensor) -> list[Tensor]:
        n = (len(self.train_widths) if self.width_range is not None and self.training
             else self.num_submodels)
        return [self.forward_submodel(x, i) for i in range(n)]

    def forward_submodel(self, x: Tensor, index: int) -> Tensor:
        self.set_width(index)
        return self.forward_width(x)

    def forward_evaluated(self, x: Tensor, index: int) -> Tensor:
        """Logits of evaluated width ``index`` whatever the mode (calibration runs it in
        training mode: batch statistics, its own running statistics updated)."""
        set_width_index(self, self.eval_slot(index))
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
        """Every width (range mode in training: every width of the step)."""
        n = (len(self.train_widths) if self.width_range is not None and self.training
             else self.num_submodels)
        return tuple(range(n)) if self.split_points() else ()

    def forward_features(self, x: Tensor, index: int, points: Sequence[str]) -> tuple[list[Tensor], Tensor]:
        """Features of width ``index`` at ``points`` and its logits, from one forward pass."""
        wanted = self.ordered_points(points)
        self.set_width(index)
        return walk_segments(self._run, x, wanted)

    def count_params(self) -> list[int]:
        return [count_params_at(self, self.eval_slot(i)) for i in range(self.num_submodels)]

    def export_submodel(self, index: int) -> nn.Module:
        """Width ``index`` as a plain network of ordinary conv, BN and linear layers holding only
        that width's slices of the weights and its own BN (``kdreg_plugins.backbones.export``)."""
        from kdreg_plugins.backbones.export import plain_width

        return plain_width(self, index)


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    owner._modules[attr] = module
