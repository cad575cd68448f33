"""``slimmable``: any traceable convolutional network made slimmable for inplace distillation.

``backbone = { name = "slimmable", trunk = { name = "timm", model = "resnet50" }, widths = [0.25,
0.5, 0.75, 1.0] }`` (any built-in plain backbone as ``trunk`` too, or ``trunk = "teacher"``, an
earlier stage of the recipe). The trunk's network is traced with ``torch.fx`` (timm's untraceable
modules and functions kept whole, as timm's own feature extraction does; convolutions,
normalisation and linear layers, ``DropPath`` kept as modules) and its layers are replaced, in the
traced ``GraphModule``, by width-aware ones: the forward of every width is the traced graph's own
generated code calling them.

**What is sliced.** Width ``i`` runs every layer on the first ``k`` channels of its input and
output. Convolutions and linear layers share one weight across widths (the corner of the full one;
a depthwise or grouped convolution keeps its group width, ``groups = active channels / group
width``; timm's ``Conv2dSame`` keeps its padding computed from the input); every BatchNorm is private to its width (own affine parameters and running statistics,
timm's ``BatchNormAct2d`` with its activation); LayerNorm (channels last, or timm's
``LayerNorm2d``) and GroupNorm share their vectors, sliced (a GroupNorm keeps its group size, or its
single group); parameters used directly by the graph with a channel dimension (ConvNeXt's layer
scale) are sliced with the tensor they meet. The stem's input and the classifier's output are never
sliced; the classifier's input is.

**Channel constraints.** Every tensor's channel dimension belongs to a *channel group*, the
channels that must be sliced together, found by propagating through the graph: a convolution or
linear layer starts a new group at its output; normalisation, activations, pooling, depthwise and
grouped convolutions keep their input's; tensors combined elementwise (a residual addition, a
squeeze-excitation gate multiplying its input) share one group; permutes and reshapes that keep
the channel dimension whole carry it along (a fixed channel count in a reshape becomes ``-1``).
Groups joined to the image or to the logits stay whole; so do a group of one channel (a spatial
gate broadcast over the channels) and tensors computed from no sliced channels (the image, a
reduction over the channels). A group of ``C`` channels runs ``int(C * w)`` of them at width
``w``, the rule of the hand-written slimmable backbones
(:func:`kdreg_plugins.backbones.slimmable.scale_channels`), rounded down to whole groups of a
grouped convolution or GroupNorm (at least one group); a width that leaves the smallest group no
channel is an error naming its layer and the narrowest width the trunk allows.

**Refused.** A network whose channels cannot be sliced consistently is refused when built, with
the layer and the reason: concatenation or splitting along channels (DenseNet, GhostNet),
slicing or indexing channels, reshapes that mix channels with other dimensions (channel shuffle),
matrix products of activations (attention heads), functional convolutions or linear maps with
their own weights, layers with weights of a kind it does not know, and padding of channels.

**Counts, split points, export.** Parameters per width are the slimmable layers' own counts
(:func:`~kdreg_plugins.backbones.slimmable.count_params_at`), MACs the engine's counter on each
width's forward; at width 1.0 both equal the trunk's. The split points are the trunk's (timm's
``feature_info`` stages, a built-in backbone's stages) where the traced graph can be cut (nothing
later reads an earlier activation), the others listed in ``rejected_points``; :meth:`DerivedSlimmable.forward_segment` runs the
full width, or width ``index``. :meth:`DerivedSlimmable.export_submodel` is one width as the traced
graph calling plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` (that width's own) / ``nn.Linear`` layers
that hold only its channels.

**Weights.** The slimmable model starts from the trunk's weights: width 1.0 computes what the
trunk computes, a narrow width uses their first channels (and the slice of each BatchNorm).
:meth:`DerivedSlimmable.load_plain_state_dict` takes the weights of a plain network of the trunk's
architecture again; a trunk's own later ``load_state_dict`` (the engine loading an earlier stage's
trained weights into ``trunk = "teacher"``) reaches the slimmable model the same way.

**Training mode.** Functions the network calls with ``training=self.training`` (timm's dropout
before the classifier) read the model's mode when they run; any other Python-level decision a
network takes on ``self.training`` outside the modules kept whole is taken once, in eval mode, when
it is traced.
"""

from __future__ import annotations

import copy
import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdreg.backbone import FlexibleBackbone, segment_range, walk_segments
from kdreg.errors import ExportError, OptionError
from kdreg.options import StageRef
from kdreg_plugins.backbones.slimmable import (
    DEFAULT_WIDTHS,
    ChannelRule,
    Channels,
    SlimmableBackbone,
    SlimmableConv2d,
    SlimmableLinear,
    SlimmableMixin,
    SwitchableBatchNorm2d,
    corner,
    narrowed_batch_norm,
    set_width_index,
)

_PROBE_BATCH = 2


def register(register: Any) -> None:
    register(
        "slimmable",
        build_slimmable,
        description="any traceable CNN (timm or built-in) made slimmable: widths, a BN per width",
    )


def build_slimmable(
    *,
    num_classes: int,
    in_chans: int,
    input_size: tuple[int, int],
    trunk: StageRef | dict | FlexibleBackbone,
    widths: Sequence[float] | Mapping[str, Any] = DEFAULT_WIDTHS,
) -> DerivedSlimmable:
    """Make ``trunk`` (a backbone table, an earlier stage's name or a backbone) slimmable at
    ``widths`` (in (0, 1], increasing): its convolutions, normalisation and linear layers sliced
    to the first channels, a private BatchNorm per width. ``widths = { min, max, sampled, eval }``
    makes it universally slimmable (US-Nets): any width in the range, one BatchNorm per layer
    with calibrated statistics per evaluated width."""
    from kdreg_plugins.backbones.exits import _trunk

    net, name = _trunk(trunk, num_classes=num_classes, in_chans=in_chans, input_size=input_size)
    return DerivedSlimmable(net, widths, name=name, in_chans=in_chans, input_size=input_size)


# ===================================================================================== layers
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
        self.same = _is_conv2d_same(conv)
        self._record_rules(in_list=in_list, out_list=out_list)
        self._init_widths(len(self.in_list))
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if self.bias is not None and conv.bias is not None:
                self.bias.copy_(conv.bias)

    def _active(self, i: int) -> tuple[int, int, int]:
        cin, cout = self.in_list[i], self.out_list[i]
        return cin, cout, (cin // self.group_width if self.groups > 1 else 1)

    def forward(self, x: Tensor) -> Tensor:
        i = self.width_index
        cin, cout, groups = self._active(i)
        if x.shape[1] != cin:
            raise ValueError(f"{type(self).__name__} at width index {i} expects {cin} input "
                             f"channels, got {x.shape[1]}")
        weight = corner(self.weight, cout) if self.groups > 1 else corner(self.weight, cout, cin)
        bias = corner(self.bias, cout) if self.bias is not None else None
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
            conv.weight.copy_(self.weight[:cout] if self.groups > 1 else self.weight[:cout, :cin])
            if self.bias is not None and conv.bias is not None:
                conv.bias.copy_(self.bias[:cout])
        return conv


def _is_conv2d_same(conv: nn.Module) -> bool:
    from timm.layers import Conv2dSame

    return type(conv) is Conv2dSame


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any,
          dilation: Any, groups: int) -> Tensor:
    from kdreg.engine.pointwise import pointwise_conv2d

    # a strided 1x1 conv of few channels avoids oneDNN's broken AVX2 weight-gradient kernel
    return pointwise_conv2d(x, weight, bias, stride, padding, dilation, groups)


class DerivedLinear(SlimmableLinear):
    """A slimmable copy of an ``nn.Linear`` (over the last dimension)."""

    def __init__(self, linear: nn.Linear, in_list: Sequence[int], out_list: Sequence[int]):
        super().__init__(in_list, out_list, bias=linear.bias is not None)
        self.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            if self.bias is not None and linear.bias is not None:
                self.bias.copy_(linear.bias)

    def plain(self, index: int) -> nn.Linear:
        i = self.check_width(index)
        cin, cout = self.in_list[i], self.out_list[i]
        out = nn.Linear(cin, cout, bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight[:cout, :cin])
            if self.bias is not None and out.bias is not None:
                out.bias.copy_(self.bias[:cout])
        return out


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
        self.to(device=_device_of(norm))
        if norm.weight is not None:
            self.load_state_dict(norm.state_dict())
        self.sizes = tuple(int(c) for c in sizes)
        self.channels_first = channels_first
        self._record_rules(sizes=sizes)
        self._init_widths(len(self.sizes))

    def forward(self, x: Tensor) -> Tensor:
        k = self.sizes[self.width_index]
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)
        w = corner(self.weight, k) if self.weight is not None else None
        b = corner(self.bias, k) if self.bias is not None else None
        x = F.layer_norm(x, (k,), w, b, self.eps)
        return x.permute(0, 3, 1, 2) if self.channels_first else x

    def params_at(self, index: int) -> int:
        k = self.sizes[self.check_width(index)]
        return k * ((self.weight is not None) + (self.bias is not None))

    def plain(self, index: int) -> nn.LayerNorm:
        k = self.sizes[self.check_width(index)]
        kind = ChannelsFirstLayerNorm if self.channels_first else nn.LayerNorm
        out = kind(k, eps=self.eps, elementwise_affine=self.elementwise_affine,
                   bias=self.bias is not None, device=_device_of(self))
        with torch.no_grad():
            if out.weight is not None and self.weight is not None:
                out.weight.copy_(self.weight[:k])
            if out.bias is not None and self.bias is not None:
                out.bias.copy_(self.bias[:k])
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
                         device=_device_of(norm))
        self.load_state_dict(norm.state_dict())
        self.sizes = tuple(int(c) for c in sizes)
        self._record_rules(sizes=sizes)
        self._init_widths(len(self.sizes))

    def _groups(self, k: int) -> int:
        return 1 if self.num_groups == 1 else k // (self.num_channels // self.num_groups)

    def forward(self, x: Tensor) -> Tensor:
        k = self.sizes[self.width_index]
        w = corner(self.weight, k) if self.weight is not None else None
        b = corner(self.bias, k) if self.bias is not None else None
        return F.group_norm(x, self._groups(k), w, b, self.eps)

    def params_at(self, index: int) -> int:
        return 2 * self.sizes[self.check_width(index)] if self.affine else 0

    def plain(self, index: int) -> nn.GroupNorm:
        k = self.sizes[self.check_width(index)]
        out = nn.GroupNorm(self._groups(k), k, eps=self.eps, affine=self.affine,
                           device=_device_of(self))
        if self.affine:
            with torch.no_grad():
                out.weight.copy_(self.weight[:k])
                out.bias.copy_(self.bias[:k])
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

    def forward(self) -> Tensor:
        out = self.weight.narrow(self.dim, 0, self.sizes[self.width_index])
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
        return TensorHolder(self.weight.detach().narrow(self.dim, 0, k).clone(),
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


def _device_of(module: nn.Module) -> torch.device:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


# ===================================================================================== tracing
def _leaf_types() -> tuple[tuple[type, ...], Callable[[type], bool]]:
    from timm.layers import DropPath
    from timm.layers._fx import is_notrace_module

    kept = (nn.Conv2d, nn.Linear, _BatchNorm, nn.LayerNorm, nn.GroupNorm, DropPath)
    return kept, is_notrace_module


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer with timm's untraceable modules and functions kept whole, and
    every convolution, linear and normalisation layer kept as a module."""

    def __init__(self) -> None:
        from timm.layers._fx import get_notrace_functions

        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.kept, self.notrace = _leaf_types()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.kept) or self.notrace(type(m)):
            return True
        return super().is_leaf_module(m, qualname)


def trace(root: nn.Module, name: str) -> fx.GraphModule:
    """``root`` traced into a GraphModule whose output is the logits tensor (a backbone's
    ``[logits]`` list is unwrapped); :class:`OptionError` (key ``trunk``) when it cannot be."""
    try:
        graph = _Tracer().trace(root)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the trunk's; reported
        raise OptionError(f"trunk {name} cannot be made slimmable: torch.fx cannot trace it "
                          f"({type(exc).__name__}: {_first_line(exc)})", key="trunk") from None
    out = next(n for n in graph.nodes if n.op == "output")
    value = out.args[0]
    if isinstance(value, (list, tuple)):
        if len(value) != 1 or not isinstance(value[0], fx.Node):
            raise OptionError(f"trunk {name} cannot be made slimmable: its traced forward "
                              "returns several outputs, not one tensor of logits", key="trunk")
        out.args = (value[0],)
    _follow_training(root, graph)
    gm = fx.GraphModule(root, graph, class_name="SlimmableGraph")
    return gm


class TrainingFlag(nn.Module):
    """The traced graph's own ``training`` flag, read when the graph runs."""

    def forward(self) -> bool:
        return self.training


def _follow_training(root: nn.Module, graph: fx.Graph) -> None:
    """Functions the network calls with ``training=self.training`` (timm's dropout before the
    classifier) get the flag when the graph runs, not the one it had when it was traced."""
    calls = [n for n in graph.nodes if n.op == "call_function"
             and isinstance(n.kwargs.get("training"), bool)]
    if not calls:
        return
    root.add_module("kdreg_training", TrainingFlag())
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        flag = graph.call_module("kdreg_training")
    for node in calls:
        node.kwargs = {**node.kwargs, "training": flag}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


# ===================================================================================== channels
@dataclass
class ChannelGroup:
    """Channels that are sliced together: a layer's output and every tensor tied to it."""

    size: int
    owner: str  # the layer that creates it (for messages)
    fixed: str | None = None  # why it is never sliced
    multiple: int = 1  # sliced to whole groups of this many channels
    members: list[str] = field(default_factory=list)
    sizes: tuple[int, ...] = ()


class Refused(Exception):
    """A layer whose channels cannot be sliced consistently."""

    def __init__(self, layer: str, reason: str):
        super().__init__(f"{layer}: {reason}")
        self.layer, self.reason = layer, reason


class _Groups:
    """Union-find over channel groups."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.info: list[ChannelGroup] = []

    def new(self, size: int, owner: str, fixed: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.info.append(ChannelGroup(size, owner, fixed if size > 1 else (fixed or "one channel")))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, layer: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        ia, ib = self.info[a], self.info[b]
        if ia.size != ib.size:
            raise Refused(layer, f"joins tensors of {ia.size} and {ib.size} channels")
        if b < a:
            a, b, ia, ib = b, a, ib, ia
        self.parent[b] = a
        ia.fixed = ia.fixed or ib.fixed
        ia.multiple = math.lcm(ia.multiple, ib.multiple)
        ia.members += ib.members
        return a

    def get(self, g: int) -> ChannelGroup:
        return self.info[self.find(g)]


def _layer_of(node: fx.Node) -> str:
    """The innermost module a node ran in (its own for a module call), else the node's name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0])
    return node.name


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    return getattr(t, "__name__", str(t))


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


_CONCAT = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack,
           "cat", "concat"}
_SPLIT = {torch.split, torch.chunk, torch.tensor_split, torch.unbind, "split", "chunk",
          "tensor_split", "unbind", "split_with_sizes"}
_MATMUL = {torch.matmul, torch.bmm, torch.mm, torch.einsum, torch.baddbmm, torch.addmm,
           operator.matmul, F.scaled_dot_product_attention, "matmul", "bmm", "mm", "baddbmm"}
_WEIGHTED = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.linear, F.batch_norm,
             F.layer_norm, F.group_norm, F.instance_norm, torch.conv2d, torch.batch_norm}
_RESHAPE = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, "reshape", "view",
            "flatten", "squeeze", "unsqueeze", "unflatten", torch.unflatten}
_PERMUTE = {torch.permute, torch.transpose, torch.movedim, torch.swapaxes, "permute",
            "transpose", "movedim", "swapaxes"}
_REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.prod,
           torch.logsumexp, "mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp",
           "max", "min", "norm", torch.max, torch.min, torch.norm}


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            if _shape(a) is not None and a not in found:
                found.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(node.args)
    visit(node.kwargs)
    return found


class ChannelAnalysis:
    """The channel groups of a traced network: each tensor node's channel dimension and group."""

    def __init__(self, gm: fx.GraphModule, name: str):
        self.gm, self.name = gm, name
        self.groups = _Groups()
        #: node -> (channel dim, group), for tensors (and tuples of tensors) that have one
        self.chan: dict[fx.Node, tuple[int, int]] = {}
        #: module target -> (input group, output group); None where it has no channels
        self.layers: dict[str, tuple[int | None, int | None]] = {}
        #: get_attr nodes to slice: node -> (dim, group)
        self.sliced: dict[fx.Node, tuple[int, int]] = {}
        #: reshape nodes whose fixed channel count becomes -1: node -> argument position
        self.reshapes: dict[fx.Node, int] = {}
        #: (refusal, the groups it touches, whether it stands whatever they are)
        self.refusals: list[tuple[Refused, list[int], bool]] = []
        self.modules = dict(gm.named_modules())
        self.output_group: int | None = None

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                self._visit(node)
            except Refused as exc:
                groups = self._groups_of(node)
                if (node.op != "call_module" and groups
                        and all(self.groups.get(g).fixed is not None for g in groups)):
                    self._unsliced(node)  # only channels that are never sliced: harmless
                else:
                    self.refusals.append((exc, groups, node.op == "call_module"))
            except Exception as exc:  # noqa: BLE001 - an operation this analysis misreads
                reason = (f"is an operation ({_op_name(node)}) whose channels kdreg cannot "
                          f"follow ({type(exc).__name__}: {_first_line(exc)})")
                self.refusals.append((Refused(_layer_of(node), reason), [], True))

    def _unsliced(self, node: fx.Node) -> None:
        """An operation on channels that are never sliced: its output's are not either."""
        self.chan.pop(node, None)
        shape = _shape(node)
        first = next(a for a in _tensor_args(node) if a in self.chan)
        d = self.chan[first][0]
        if shape is not None and len(shape) == len(_shape(first) or ()) and d < len(shape):
            self.chan[node] = (d, self._new(shape[d], _layer_of(node),
                                            "computed from no sliced channels"))

    def _groups_of(self, node: fx.Node) -> list[int]:
        return [self.chan[a][1] for a in _tensor_args(node) if a in self.chan]

    def check(self) -> None:
        """Raise the first refusal that touches a group to be sliced."""
        for exc, groups, always in self.refusals:
            if always or not groups or any(self.groups.get(g).fixed is None for g in groups):
                raise OptionError(f"trunk {self.name} cannot be made slimmable: layer {exc.layer} "
                                  f"{exc.reason}", key="trunk")

    def _refuse(self, node: fx.Node, reason: str) -> None:
        raise Refused(_layer_of(node), reason)

    def _new(self, size: int, owner: str, fixed: str | None = None) -> int:
        g = self.groups.new(size, owner, fixed)
        self.groups.info[g].members.append(owner)
        return g

    def _union(self, a: int, b: int, node: fx.Node) -> int:
        return self.groups.union(a, b, _layer_of(node))

    # ------------------------------------------------------------------ one node
    def _visit(self, node: fx.Node) -> None:
        shape = _shape(node)
        if node.op == "placeholder":
            if shape is not None and len(shape) >= 2:
                self.chan[node] = (1, self._new(shape[1], "the input", "the network's input"))
            return
        if node.op == "output":
            value = node.args[0]
            if isinstance(value, fx.Node) and value in self.chan:
                d, g = self.chan[value]
                out = self._new(self.groups.get(g).size, "the logits", "the classifier's output")
                self.output_group = self._union(g, out, node)
            return
        if node.op == "get_attr":
            return
        if node.op == "call_module":
            self._module(node, self.modules[str(node.target)])
            return
        self._function(node)

    # ------------------------------------------------------------------ modules
    def _input(self, node: fx.Node) -> tuple[fx.Node, tuple[int, int] | None]:
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node):
            self._refuse(node, "is called without a tensor input")
        assert isinstance(x, fx.Node)
        return x, self.chan.get(x)

    def _module(self, node: fx.Node, m: nn.Module) -> None:
        target = str(node.target)
        if isinstance(m, nn.Conv2d):
            self._conv(node, m, target)
        elif isinstance(m, nn.Linear):
            self._linear(node, m, target)
        elif isinstance(m, (_BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            self._norm(node, m, target)
        elif any(True for _ in itertools.chain(m.parameters(), m.buffers())):
            x, c = self._input(node)
            self.chan_like(node, c)
            self._refuse(node, f"({type(m).__name__}) has weights of a kind that cannot be "
                               "sliced")
        elif isinstance(m, (nn.Flatten, nn.Unflatten)) and node.args and node.args[0] in self.chan:
            self._reshape(node)
        else:
            self._generic(node)

    def chan_like(self, node: fx.Node, c: tuple[int, int] | None) -> None:
        if c is not None:
            self.chan[node] = c

    def _layer(self, target: str, gin: int | None, gout: int | None, node: fx.Node) -> None:
        if target in self.layers:  # a module called twice: both calls share its groups
            pin, pout = self.layers[target]
            if pin is not None and gin is not None:
                gin = self._union(pin, gin, node)
            if pout is not None and gout is not None:
                gout = self._union(pout, gout, node)
        self.layers[target] = (gin, gout)

    def _conv(self, node: fx.Node, m: nn.Conv2d, target: str) -> None:
        x, c = self._input(node)
        if type(m).forward is not nn.Conv2d.forward and not _is_conv2d_same(m):
            self._refuse(node, f"({type(m).__name__}) is a convolution with a forward of its own")
        if m.padding_mode != "zeros":
            self._refuse(node, f"pads with mode {m.padding_mode!r}; only zero padding is sliced")
        if c is None:  # computed from no sliced channels (the image, a reduction over channels)
            c = (1, self._new(m.in_channels, target, "computed from no sliced channels"))
        if c[0] != 1:
            self._refuse(node, "convolves a dimension other than the channels")
        gin = c[1]
        if self.groups.get(gin).size != m.in_channels:
            self._refuse(node, f"expects {m.in_channels} channels, its input has "
                               f"{self.groups.get(gin).size}")
        if m.groups == 1:
            gout = self._new(m.out_channels, target)
        elif m.in_channels == m.out_channels:
            gout = gin
            self.groups.get(gin).multiple = math.lcm(self.groups.get(gin).multiple,
                                                     m.in_channels // m.groups)
            self.groups.get(gin).members.append(target)
        else:
            self._refuse(node, f"is a grouped convolution ({m.groups} groups) whose groups "
                               f"have {m.in_channels // m.groups} inputs and "
                               f"{m.out_channels // m.groups} outputs; only groups of equal "
                               "widths are sliced")
        self._layer(target, gin, gout, node)
        self.chan[node] = (1, gout)

    def _linear(self, node: fx.Node, m: nn.Linear, target: str) -> None:
        from timm.layers import Linear as TimmLinear

        x, c = self._input(node)
        if type(m).forward not in (nn.Linear.forward, TimmLinear.forward):
            self._refuse(node, f"({type(m).__name__}) is a linear layer with a forward of its own")
        shape = _shape(x)
        assert shape is not None
        gin: int | None = None
        if c is not None:
            if c[0] != len(shape) - 1:
                if self.groups.get(c[1]).fixed is None:
                    self._refuse(node, "applies a linear layer across a dimension other than "
                                       "the channels")
            else:
                gin = c[1]
        if gin is None:
            gin = self._new(m.in_features, target, "a linear layer's input of fixed features")
        gout = self._new(m.out_features, target)
        self._layer(target, gin, gout, node)
        self.chan[node] = (len(shape) - 1, gout)

    def _norm(self, node: fx.Node, m: nn.Module, target: str) -> None:
        from timm.layers import GroupNorm as TimmGroupNorm
        from timm.layers import GroupNorm1, LayerNorm2d
        from timm.layers import LayerNorm as TimmLayerNorm

        x, c = self._input(node)
        shape = _shape(x)
        assert shape is not None
        if c is None:  # computed from no sliced channels: kept whole
            self.chan[node] = (1, self._new(_shape(node)[1], target,  # type: ignore[index]
                                            "computed from no sliced channels"))
            return
        d, g = c
        if isinstance(m, _BatchNorm):
            if d != 1:
                self._refuse(node, "normalises a dimension other than the channels")
        elif isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                self._refuse(node, f"is a LayerNorm over {len(m.normalized_shape)} dimensions")
            if type(m) in (nn.LayerNorm, TimmLayerNorm):
                if d != len(shape) - 1:
                    self._refuse(node, "is a LayerNorm over a dimension other than the channels")
            elif isinstance(m, LayerNorm2d) and type(m).forward is LayerNorm2d.forward:
                if d != 1 or len(shape) != 4:
                    self._refuse(node, "is a LayerNorm2d over a dimension other than the channels")
            else:
                self._refuse(node, f"({type(m).__name__}) is a LayerNorm with a forward of its own")
        elif isinstance(m, nn.GroupNorm):
            if type(m).forward not in (nn.GroupNorm.forward, TimmGroupNorm.forward,
                                       GroupNorm1.forward):
                self._refuse(node, f"({type(m).__name__}) is a GroupNorm with a forward of its own")
            if d != 1:
                self._refuse(node, "normalises a dimension other than the channels")
            if m.num_groups > 1:
                info = self.groups.get(g)
                info.multiple = math.lcm(info.multiple, m.num_channels // m.num_groups)
        self.groups.get(g).members.append(target)
        self._layer(target, g, g, node)
        self.chan[node] = c

    # ------------------------------------------------------------------ functions
    def _function(self, node: fx.Node) -> None:
        t = node.target
        tracked = [a for a in _tensor_args(node) if a in self.chan]
        if node.op == "call_method" and t in ("size", "dim", "numel"):
            return
        if t is getattr or (node.op == "call_function" and t is operator.getitem
                            and _shape(node.args[0]) is None):
            if t is operator.getitem and isinstance(node.args[0], fx.Node):
                self.chan_like(node, self.chan.get(node.args[0]))
            return
        if not tracked:
            return
        if t in _WEIGHTED:
            self._refuse(node, f"calls {_op_name(node)} with weights of its own that cannot "
                               "be sliced")
        if t in _MATMUL:
            self._refuse(node, f"multiplies activations as matrices ({_op_name(node)}, as "
                               "attention heads do)")
        if t in _CONCAT:
            self._concat(node, tracked)
        elif t in _SPLIT:
            self._split(node)
        elif t is operator.getitem:
            self._getitem(node)
        elif t in _RESHAPE:
            self._reshape(node)
        elif t in _PERMUTE:
            self._permute(node)
        elif t in _REDUCE:
            self._reduce(node)
        elif t is F.pad or t is torch.constant_pad_nd:
            self._pad(node)
        else:
            self._generic(node)

    def _dim(self, node: fx.Node, default: int = 0, pos: int = 1) -> int | None:
        d = node.kwargs.get("dim", node.args[pos] if len(node.args) > pos else default)
        return d if isinstance(d, int) else None

    def _concat(self, node: fx.Node, tracked: list[fx.Node]) -> None:
        first = tracked[0]
        rank = len(_shape(first) or ())
        d = self._dim(node)
        if d is None:
            self._refuse(node, f"{_op_name(node)} along a dimension only known at run time")
        assert d is not None
        d %= rank + (1 if node.target is torch.stack else 0)
        cd, g = self.chan[first]
        if node.target is torch.stack:
            self._refuse(node, "stacks tensors with channels into a new dimension")
        if d == cd:
            self._refuse(node, f"concatenates channels ({_op_name(node)} along dim {d}, as "
                               "DenseNet and GhostNet do): their slices cannot stay consistent")
        for a in tracked[1:]:
            if self.chan[a][0] != cd:
                self._refuse(node, "concatenates tensors whose channels lie in different "
                                   "dimensions")
            g = self._union(g, self.chan[a][1], node)
        size = (_shape(first) or ())[cd]
        for a in _tensor_args(node):
            if a not in self.chan and len(_shape(a) or ()) == rank and size > 1:
                self._refuse(node, f"concatenates the channels' tensors with a tensor of {size} "
                                   "fixed channels (a learned token, as vision transformers "
                                   "prepend)")
        self.chan[node] = (cd, g)

    def _split(self, node: fx.Node) -> None:
        x = node.args[0]
        assert isinstance(x, fx.Node)
        cd, g = self.chan[x]
        rank = len(_shape(x) or ())
        default = 0
        pos = 1 if node.target in (torch.unbind, "unbind") else 2
        d = self._dim(node, default, pos)
        if d is None or d % rank == cd:
            self._refuse(node, f"splits channels ({_op_name(node)}): their slices cannot stay "
                               "consistent")
        self.chan[node] = (cd, g)

    def _getitem(self, node: fx.Node) -> None:
        x, index = node.args[0], node.args[1]
        assert isinstance(x, fx.Node)
        cd, g = self.chan[x]
        rank = len(_shape(x) or ())
        items = index if isinstance(index, tuple) else (index,)
        real = sum(1 for it in items if it is not None and it is not Ellipsis)
        in_d = out_d = 0
        mapped: int | None = None
        for it in items:
            if it is Ellipsis:
                skip = rank - real
                if in_d <= cd < in_d + skip:
                    mapped = out_d + (cd - in_d)
                in_d += skip
                out_d += skip
            elif it is None:
                out_d += 1
            elif isinstance(it, slice):
                if in_d == cd:
                    full = (it.start in (None, 0) and it.stop is None and it.step in (None, 1))
                    if not full:
                        self._refuse(node, "slices channels (indexing along the channel "
                                           "dimension)")
                    mapped = out_d
                in_d += 1
                out_d += 1
            elif isinstance(it, int):
                if in_d == cd:
                    self._refuse(node, "selects a channel by its index")
                in_d += 1
            else:
                self._refuse(node, "indexes a tensor with channels by a tensor")
        if in_d <= cd:
            mapped = out_d + (cd - in_d)
        if mapped is not None:
            self.chan[node] = (mapped, g)

    def _reshape(self, node: fx.Node) -> None:
        x = node.args[0]
        assert isinstance(x, fx.Node)
        cd, g = self.chan[x]
        ins, outs = _shape(x), _shape(node)
        assert ins is not None and outs is not None
        mapped = _reshaped_dim(ins, outs, cd)
        if mapped is None:
            self._refuse(node, f"reshapes channels together with other dimensions "
                               f"({_op_name(node)} {list(ins)} -> {list(outs)}, as a channel "
                               "shuffle does)")
        assert mapped is not None
        self.chan[node] = (mapped, g)
        if node.target in ("reshape", "view", torch.reshape):
            args: Any = node.args
            sizes = args[1:] if node.target != torch.reshape else args[1]
            if node.target != torch.reshape and len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            sizes = list(sizes) if isinstance(sizes, (tuple, list)) else []
            if (len(sizes) == len(outs) and isinstance(sizes[mapped], int)
                    and sizes[mapped] != -1 and outs[mapped] > 1):
                if any(s == -1 for i, s in enumerate(sizes) if i != mapped):
                    self._refuse(node, f"reshapes to a fixed channel count ({outs[mapped]}) "
                                       "besides a -1")
                self.reshapes[node] = mapped

    def _permute(self, node: fx.Node) -> None:
        x = node.args[0]
        assert isinstance(x, fx.Node)
        cd, g = self.chan[x]
        rank = len(_shape(x) or ())
        t = node.target
        args: list[Any] = list(node.args[1:])
        kwargs: Any = node.kwargs
        if t in (torch.permute, "permute"):
            dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            dims = kwargs.get("dims", dims)
            order = [int(d) % rank for d in dims]
            self.chan[node] = (order.index(cd), g)
            return
        a = args[0] if args else kwargs.get("dim0", kwargs.get("source"))
        b = args[1] if len(args) > 1 else kwargs.get("dim1", kwargs.get("destination"))
        if not isinstance(a, int) or not isinstance(b, int):
            self._refuse(node, f"{_op_name(node)} of dimensions only known at run time")
        a, b = a % rank, b % rank
        if t in (torch.movedim, "movedim"):
            order = [d for d in range(rank) if d != a]
            order.insert(b, a)
            self.chan[node] = (order.index(cd), g)
        else:
            self.chan[node] = (b if cd == a else a if cd == b else cd, g)

    def _reduce(self, node: fx.Node) -> None:
        x = node.args[0]
        assert isinstance(x, fx.Node)
        cd, g = self.chan[x]
        ins = _shape(x)
        rank = len(ins or ())
        args: Any = node.args
        kwargs: Any = node.kwargs
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if node.target in ("norm", torch.norm):
            dims = kwargs.get("dim", args[2] if len(args) > 2 else None)
        if dims is None:
            return  # over everything: a number, no channels
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            self._refuse(node, f"{_op_name(node)} over dimensions only known at run time")
        dims = [d % rank for d in dims]
        if cd in dims:
            return  # reduced over the channels: the active ones, as a plain network would
        keep = kwargs.get("keepdim", args[2] if len(args) > 2
                          and node.target not in ("norm", torch.norm) else False)
        out = cd if keep else cd - sum(1 for d in dims if d < cd)
        self.chan[node] = (out, g)

    def _pad(self, node: fx.Node) -> None:
        x = node.args[0]
        assert isinstance(x, fx.Node)
        cd, g = self.chan[x]
        rank = len(_shape(x) or ())
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
        pad = list(pad) if isinstance(pad, (tuple, list)) else []
        k = rank - 1 - cd  # pairs from the last dimension
        if len(pad) > 2 * k + 1 and any(p != 0 for p in pad[2 * k:2 * k + 2]):
            self._refuse(node, "pads channels")
        self.chan[node] = (cd, g)

    def _generic(self, node: fx.Node) -> None:
        """Elementwise and shape-keeping operations: every operand's channel dimension lands on
        one output dimension, and operands share their group."""
        out = _shape(node)
        tracked = [a for a in _tensor_args(node) if a in self.chan]
        if not tracked:
            return
        if out is None:
            if any(self.groups.get(self.chan[a][1]).fixed is None for a in tracked):
                self._refuse(node, f"{_op_name(node)} returns something other than one tensor")
            return
        rank = len(out)
        od: int | None = None
        group: int | None = None
        for a in tracked:
            d, g = self.chan[a]
            ins = _shape(a)
            assert ins is not None
            here = d + rank - len(ins)
            size = ins[d]
            if size == 1 and here >= 0 and out[here] > 1:
                continue  # one channel, broadcast over the other operand's (a spatial gate)
            if here < 0 or out[here] != size:
                self._refuse(node, f"{_op_name(node)} changes the {size} channels of its input "
                                   f"({list(ins)} -> {list(out)})")
            if od is not None and here != od:
                self._refuse(node, f"{_op_name(node)} combines tensors whose channels lie in "
                                   "different dimensions")
            od = here
            group = g if group is None else self._union(group, g, node)
        if od is None or group is None:
            return
        size = out[od]
        for a in _tensor_args(node):
            if a in self.chan:
                continue
            ins = _shape(a)
            assert ins is not None
            here = od - (rank - len(ins))
            if 0 <= here < len(ins) and ins[here] == size and size > 1:
                source = _attr_source(a, here)
                if source is None:
                    self._refuse(node, f"{_op_name(node)} combines channels with a tensor of "
                                       f"{size} entries that is not a parameter")
                assert source is not None
                attr, dim = source
                if attr in self.sliced and self.sliced[attr][0] == dim:
                    group = self._union(group, self.sliced[attr][1], node)
                self.sliced[attr] = (dim, group)
                self.groups.get(group).members.append(str(attr.target))
        self.chan[node] = (od, group)


def _attr_source(node: fx.Node, dim: int) -> tuple[fx.Node, int] | None:
    """The get_attr node that ``node`` is a reshape (or cast) of, and its dimension matching
    ``node``'s dimension ``dim``; None when ``node`` comes from anything else."""
    while node.op != "get_attr":
        if node.op not in ("call_method", "call_function") or len(_tensor_args(node)) != 1:
            return None
        parent = _tensor_args(node)[0]
        if parent is not node.args[0]:
            return None
        ins, outs = _shape(parent), _shape(node)
        assert ins is not None and outs is not None
        if node.target in _RESHAPE:
            back = _reshaped_dim(outs, ins, dim)
        elif ins == outs:
            back = dim
        else:
            return None
        if back is None:
            return None
        node, dim = parent, back
    shape = _shape(node)
    if shape is None or sum(1 for s in shape if s > 1) != 1:
        return None
    return node, dim


def _reshaped_dim(ins: Sequence[int], outs: Sequence[int], d: int) -> int | None:
    """Where dimension ``d`` of shape ``ins`` lands in ``outs`` after a reshape, when it stays
    one dimension whole (only dimensions of size 1 joined to it or split from it), else None."""
    i = j = 0
    while i < len(ins) or j < len(outs):
        gi, gj = [i], [j]
        pi = ins[i] if i < len(ins) else 1
        pj = outs[j] if j < len(outs) else 1
        i += 1
        j += 1
        while pi != pj:
            if pi < pj and i < len(ins):
                pi *= ins[i]
                gi.append(i)
                i += 1
            elif j < len(outs):
                pj *= outs[j]
                gj.append(j)
                j += 1
            else:
                return None
        if d in gi:
            big_in = [k for k in gi if k < len(ins) and ins[k] > 1]
            big_out = [k for k in gj if k < len(outs) and outs[k] > 1]
            return big_out[0] if big_in == [d] and len(big_out) == 1 else None
    return None


# ===================================================================================== backbone
class DerivedSlimmable(SlimmableBackbone):
    """A traced network with width-aware layers (see the module docstring); sub-models are the
    widths, smallest first."""

    def __init__(self, trunk: FlexibleBackbone,
                 widths: Sequence[float] | Mapping[str, Any] = DEFAULT_WIDTHS, *,
                 name: str | None = None, in_chans: int = 3,
                 input_size: tuple[int, int] = (32, 32)):
        super().__init__(widths, in_chans=in_chans, input_size=input_size)
        if name is None:
            from kdreg_plugins.backbones.exits import _name_of

            name = _name_of(trunk)
        self.trunk_name = name
        if trunk.num_submodels != 1:
            raise OptionError(f"trunk {name} has {trunk.num_submodels} sub-models "
                              f"({', '.join(trunk.submodel_labels)}); slimmable needs a plain "
                              "network", key="trunk")
        from kdreg_plugins.backbones.timm_adapter import TimmBackbone

        root: nn.Module = trunk.net if isinstance(trunk, TimmBackbone) else trunk
        #: prefix of the trunk's state dict keys before the traced network's own
        self.source_prefix = "net." if isinstance(trunk, TimmBackbone) else ""
        self.input_mean, self.input_std = trunk.input_mean, trunk.input_std
        self.pretrained = trunk.pretrained
        was_training = root.training
        root = copy.deepcopy(root).eval()
        gm = trace(root, name)
        _propagate_shapes(gm, in_chans, self.input_size, name)
        analysis = ChannelAnalysis(gm, name)
        try:
            analysis.run()
        finally:
            gm.train(was_training)
        analysis.check()
        self.channel_groups = self._size_groups(analysis)
        self.analysis_layers = {t: (self._sizes(analysis, gin), self._sizes(analysis, gout))
                                for t, (gin, gout) in analysis.layers.items()}
        self._group_of = {t: (None if gin is None else analysis.groups.find(gin),
                              None if gout is None else analysis.groups.find(gout))
                          for t, (gin, gout) in analysis.layers.items()}
        _convert(gm, analysis)
        gm.train(was_training)
        self.net = gm
        self.split_nodes, self.rejected_points = _cut_points(gm, trunk.split_points())
        self._segments: dict[tuple[str | None, str | None], fx.GraphModule] = {}
        self.finish_widths()
        trunk.register_load_state_dict_post_hook(self._trunk_loaded)

    # ------------------------------------------------------------------ sizes
    def _size_groups(self, analysis: ChannelAnalysis) -> dict[int, ChannelGroup]:
        roots = dict.fromkeys(analysis.groups.find(g) for g in range(len(analysis.groups.info)))
        out = {root: analysis.groups.info[root] for root in roots}
        sliced = [info for info in out.values() if info.fixed is None]
        if sliced:  # the smallest group decides how narrow the model can be
            small = min(sliced, key=lambda info: info.size)
            narrowest = (self.width_range.min,) if self.width_range is not None else self.widths
            for width in narrowest:
                if int(small.size * width + 1e-9) == 0:
                    raise OptionError(
                        f"width {width:g} leaves layer {small.owner} of trunk {self.trunk_name} "
                        f"no channel (int({small.size} x {width:g}) = 0); the narrowest width "
                        f"this trunk allows is {math.ceil(1e6 / small.size) / 1e6:g}",
                        key="widths")
        slots = self.slot_widths
        for info in out.values():
            info.sizes = Channels([ChannelRule(info.size, info.multiple, info.fixed is not None)
                                   .at(w) for w in slots],
                                  ChannelRule(info.size, info.multiple, info.fixed is not None))
        return out

    @staticmethod
    def _channels(info: ChannelGroup, width: float) -> int:
        """``int(C * w)`` channels of a group of ``C`` (:func:`scale_channels`' rule), rounded
        down to whole groups of a grouped layer, at least one group."""
        k = int(info.size * width + 1e-9)
        return max(info.multiple, k // info.multiple * info.multiple)

    def _sizes(self, analysis: ChannelAnalysis, g: int | None) -> tuple[int, ...] | None:
        return None if g is None else analysis.groups.get(g).sizes

    def layer_channels(self, layer: str) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
        """Input and output channels of traced layer ``layer`` (a module path of the trunk's
        network), one per width."""
        return self.analysis_layers[layer]

    def same_group(self, a: str, b: str) -> bool:
        """Whether the outputs of layers ``a`` and ``b`` are sliced as one channel group."""
        return self._group_of[a][1] == self._group_of[b][1]

    # ------------------------------------------------------------------ forward
    def forward_width(self, x: Tensor) -> Tensor:
        return self.net(x)

    def classify(self, h: Tensor) -> Tensor:  # the traced graph classifies itself
        raise TypeError("DerivedSlimmable runs its traced graph; it has no separate classifier")

    def split_points(self) -> tuple[str, ...]:
        return tuple(self.split_nodes)

    def forward_segment(self, h: Tensor, start: str | None, end: str | None,
                        index: int | None = None) -> Tensor:
        """From split point ``start`` (None: the image) to ``end`` (None: the logits) at width
        ``index`` (None: the full width, the contract of every backbone's segments)."""
        segment_range(self.split_points(), start, end)
        self.set_width(-1 if index is None else index)
        key = (start, end)
        if key not in self._segments:
            self._segments[key] = _segment(self.net, self.split_nodes, start, end)
        return self._segments[key](h)

    def forward_features(self, x: Tensor, index: int, points: Sequence[str]) -> tuple[list[Tensor], Tensor]:
        """Features of width ``index`` at ``points`` and its logits, from one forward pass."""
        wanted = self.ordered_points(points)
        index = self.check_index(index)
        return walk_segments(lambda h, start, end: self.forward_segment(h, start, end, index), x, wanted)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._segments = {}  # segments hold references to tensors that may be replaced
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ counts, export
    def export_submodel(self, index: int) -> nn.Module:
        """Width ``index`` as the traced graph calling plain layers that hold only its channels
        (each slimmable layer's ``plain(index)``: sliced convolutions, linear and LayerNorm /
        GroupNorm layers, the width's own BatchNorm)."""
        i = self.eval_slot(index)
        gm = copy.deepcopy(self.net)
        for path, m in list(gm.named_modules()):
            if isinstance(m, SlimmableMixin):
                plain = getattr(m, "plain", None)
                if plain is None:
                    raise ExportError(f"layer {path} ({type(m).__name__}) has no plain "
                                      "counterpart for export")
                _set_module(gm, path, plain(i))
        return PlainWidth(gm).eval()

    # ------------------------------------------------------------------ weights
    def load_plain_state_dict(self, state: dict[str, Tensor]) -> None:
        """Take the weights of a plain network of the trunk's architecture (its state dict, keys
        as the trunk's): every layer as that network's, each width's BatchNorm its first
        channels. Raises ``KeyError`` naming a key the state lacks."""
        p = self.source_prefix
        handled: set[str] = set()
        with torch.no_grad():
            for path, m in self.net.named_modules():
                loader = getattr(m, "load_plain", None)
                if loader is not None:
                    loader(state, f"{p}{path}.")
                    handled.add(path)
            for key, t in self.net.state_dict(keep_vars=True).items():
                owner = key.rsplit(".", 1)[0] if "." in key else ""
                if any(owner == h or owner.startswith(h + ".") for h in handled):
                    continue
                src = state.get(p + key)
                if src is None:
                    raise KeyError(f"the plain state dict has no {p + key!r}")
                t.copy_(src)
        set_width_index(self, len(self.slot_widths) - 1)

    def _trunk_loaded(self, module: nn.Module, _incompatible: Any) -> None:
        self.load_plain_state_dict(module.state_dict())


class PlainWidth(nn.Module):
    """One width of a derived slimmable network: the traced graph with plain layers."""

    def __init__(self, graph: fx.GraphModule):
        super().__init__()
        self.graph = graph

    def forward(self, x: Tensor) -> Tensor:
        return self.graph(x)


def _propagate_shapes(gm: fx.GraphModule, in_chans: int, size: tuple[int, int], name: str) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    device = next(itertools.chain(gm.parameters(), gm.buffers()), torch.zeros(())).device
    x = torch.zeros(_PROBE_BATCH, in_chans, *size, device=device)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
    except Exception as exc:  # noqa: BLE001 - the traced graph fails to run; reported
        raise OptionError(f"trunk {name} cannot be made slimmable: its traced graph fails to run "
                          f"({type(exc).__name__}: {_first_line(exc)})", key="trunk") from None


def _set_module(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    if attr in owner._parameters:
        del owner._parameters[attr]
    if attr in owner._buffers:
        del owner._buffers[attr]
    owner._modules[attr] = module


def _convert(gm: fx.GraphModule, analysis: ChannelAnalysis) -> None:
    """Replace the layers of ``gm`` with width-aware ones, in place, and rewrite the graph's
    sliced parameters and fixed channel counts."""
    groups = analysis.groups

    def sizes(g: int | None) -> tuple[int, ...] | None:
        return None if g is None else groups.get(g).sizes

    for target, (gin, gout) in analysis.layers.items():
        m = gm.get_submodule(target)
        sin, sout = sizes(gin), sizes(gout)
        if all(s is None or groups.get(g).fixed is not None  # type: ignore[arg-type]
               for s, g in ((sin, gin), (sout, gout))):
            continue  # nothing of it is sliced: kept as it is
        new: nn.Module
        if isinstance(m, nn.Conv2d):
            assert sin is not None and sout is not None
            new = DerivedConv2d(m, sin, sout)
        elif isinstance(m, nn.Linear):
            assert sin is not None and sout is not None
            new = DerivedLinear(m, sin, sout)
        elif isinstance(m, _BatchNorm):
            assert sout is not None
            new = SwitchableNorm(m, sout)
        elif isinstance(m, nn.LayerNorm):
            assert sout is not None
            from timm.layers import LayerNorm2d

            new = SlicedLayerNorm(m, sout, channels_first=isinstance(m, LayerNorm2d))
        elif isinstance(m, nn.GroupNorm):
            assert sout is not None
            new = SlicedGroupNorm(m, sout)
        else:  # pragma: no cover - the analysis records only the kinds above
            raise TypeError(type(m).__name__)
        _set_module(gm, target, new)
    graph = gm.graph
    for attr, (dim, g) in analysis.sliced.items():
        info = groups.get(g)
        if info.fixed is not None:
            continue
        target = str(attr.target)
        value = _get_attr(gm, target)
        if not isinstance(value, SlicedTensor):
            _set_module(gm, target, SlicedTensor(value, dim, info.sizes))
        with graph.inserting_after(attr):
            call = graph.call_module(target)
        attr.replace_all_uses_with(call)
        graph.erase_node(attr)
    for node, pos in analysis.reshapes.items():
        x = node.args[0]
        assert isinstance(x, fx.Node)
        if groups.get(analysis.chan[x][1]).fixed is not None:
            continue
        args: Any = node.args
        shape = list(args[1:]) if node.target != torch.reshape else list(args[1])
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = list(shape[0])
        shape[pos] = -1
        node.args = (x, tuple(shape))
    graph.lint()
    gm.recompile()


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ===================================================================================== segments
def _free(node: fx.Node) -> bool:
    """A node that reads nothing: a parameter (``get_attr``, or a :class:`SlicedTensor` call)."""
    return node.op == "get_attr" or (node.op == "call_module" and not node.all_input_nodes)


def _cut_points(gm: fx.GraphModule, points: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """For each of the trunk's split points, the traced node whose output is the features there
    (the last node run inside that module), where the graph can be cut at it: nothing after it
    reads a tensor from before it. Returns the cuts and the points rejected with the reason."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    cuts: dict[str, str] = {}
    rejected: dict[str, str] = {}
    for p in points:
        inside = [n for n in nodes if n.op == "call_module" and str(n.target) == p
                  or any(path == p for path, _ in (n.meta.get("nn_module_stack") or {}).values())]
        if not inside:
            rejected[p] = "no traced operation runs inside it"
            continue
        cut = inside[-1]
        i = order[cut]
        later = nodes[i + 1:]
        crossing = [a for n in later for a in n.all_input_nodes if order[a] < i and not _free(a)]
        if crossing:
            rejected[p] = f"a later operation reads {crossing[0].name}, from before it"
            continue
        if _shape(cut) is None:
            rejected[p] = "its output is not one tensor"
            continue
        cuts[p] = cut.name
    return cuts, rejected


def _segment(gm: fx.GraphModule, cuts: dict[str, str], start: str | None,
             end: str | None) -> fx.GraphModule:
    """The part of ``gm`` from the features at split point ``start`` (None: its input) to those
    at ``end`` (None: its output), as a GraphModule sharing ``gm``'s layers."""
    nodes = list(gm.graph.nodes)
    names = [n.name for n in nodes]
    first = names.index(cuts[start]) if start is not None else -1
    last = names.index(cuts[end]) if end is not None else len(nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    h = graph.placeholder("h")
    if start is not None:
        env[nodes[first]] = h
    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            env[node] = h
            continue
        if node.op == "output":
            if end is None:
                graph.output(env[node.args[0]])
            break
        if _free(node) or first < i <= last:
            env[node] = graph.node_copy(node, lambda a: env[a])
        if i == last:
            graph.output(env[node])
            break
    segment = fx.GraphModule(gm, graph, class_name="SlimmableSegment")
    segment.graph.eliminate_dead_code()
    segment.recompile()
    return segment
