"""The channel analysis of a traced network: every tensor's channel dimension and the *channel
group* it belongs to (channels sliced together), propagated through the graph node by node, and
the refusals of what cannot be sliced consistently."""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdreg.errors import OptionError
from kdreg_plugins.backbones.slimmable_derived.attention import attention_refusal, attention_types
from kdreg_plugins.backbones.slimmable_derived.indices import (
    composite,
    cut,
    settle_fixed,
    tile,
    union_parts,
)
from kdreg_plugins.backbones.slimmable_derived.layers import is_conv2d_same
from kdreg_plugins.backbones.slimmable_derived.nodes import (
    CONCAT,
    MATMUL,
    PERMUTE,
    REDUCE,
    RESHAPE,
    SPLIT,
    WEIGHTED,
    attr_source,
    layer_of,
    op_name,
    reshaped_dim,
    shape_of,
    tensor_args,
)
from kdreg_plugins.backbones.slimmable_derived.tracing import first_line


@dataclass
class ChannelGroup:
    """Channels that are sliced together: a layer's output and every tensor tied to it."""

    size: int
    owner: str  # the layer that creates it (for messages)
    fixed: str | None = None  # why it is never sliced
    multiple: int = 1  # sliced to whole groups of this many channels
    #: attention heads of this many channels: a fixed width that cuts one is refused
    head_dim: int = 1
    members: list[str] = field(default_factory=list)
    sizes: tuple[int, ...] = ()
    #: a concatenation of other groups' channels, in order (:mod:`.indices`): a width keeps each
    #: part's kept channels at that part's offset; empty for a group of its own channels
    parts: list[int] = field(default_factory=list)
    #: per width slot, the kept channels' indices where they are not the first ones, else None
    indices: tuple[tuple[int, ...] | None, ...] = ()


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
        if ia.parts or ib.parts:
            return union_parts(self, a, b, layer)
        if b < a:
            a, b, ia, ib = b, a, ib, ia
        self.parent[b] = a
        ia.fixed = ia.fixed or ib.fixed
        ia.multiple = math.lcm(ia.multiple, ib.multiple)
        ia.head_dim = math.lcm(ia.head_dim, ib.head_dim)
        ia.members += ib.members
        return a

    def get(self, g: int) -> ChannelGroup:
        return self.info[self.find(g)]


def is_conv_mlp(m: nn.Module) -> bool:
    """timm's ``ConvMlp`` as timm writes it: two plain convolutions, the second 1x1."""
    try:
        from timm.models.vgg import ConvMlp
    except ImportError:  # a timm without VGG
        return False
    return (type(m) is ConvMlp and all(type(getattr(m, n, None)) is nn.Conv2d
                                       and getattr(m, n).groups == 1 for n in ("fc1", "fc2")))


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
        #: the same by parameter name, which every get_attr node of a parameter shares
        self.sliced_targets: dict[str, tuple[int, int]] = {}
        #: attention layer target -> the group of its heads' channels
        self.heads: dict[str, int] = {}
        #: linear layer target -> the number of equal chunks its output is cut into
        self.chunks: dict[str, int] = {}
        #: reshape nodes whose fixed channel count becomes -1: node -> argument position
        self.reshapes: dict[fx.Node, int] = {}
        #: splits and slices of channels (:mod:`.indices`): node -> (channel dim, the input's
        #: tiles, each output's range of tiles; one range for a slice, which is not a tuple)
        self.narrows: dict[fx.Node, tuple[int, list[int], list[tuple[int, int]], bool]] = {}
        #: tuples of tensors (a split's pieces): node -> each piece's channel dim and group
        self.items: dict[fx.Node, list[tuple[int, int]]] = {}
        #: (refusal, the groups it touches, whether it stands whatever they are)
        self.refusals: list[tuple[Refused, list[int], bool]] = []
        self.modules = dict(gm.named_modules())
        self.output_group: int | None = None

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        self._run_nodes()
        settle_fixed(self.groups)
        self._refuse_indexed()

    def _run_nodes(self) -> None:
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
                reason = (f"is an operation ({op_name(node)}) whose channels kdreg cannot "
                          f"follow ({type(exc).__name__}: {first_line(exc)})")
                self.refusals.append((Refused(layer_of(node), reason), [], True))

    def _unsliced(self, node: fx.Node) -> None:
        """An operation on channels that are never sliced: its output's are not either."""
        self.chan.pop(node, None)
        shape = shape_of(node)
        first = next(a for a in tensor_args(node) if a in self.chan)
        d = self.chan[first][0]
        if shape is not None and len(shape) == len(shape_of(first) or ()) and d < len(shape):
            self.chan[node] = (d, self._new(shape[d], layer_of(node),
                                            "computed from no sliced channels"))

    def _groups_of(self, node: fx.Node) -> list[int]:
        return [self.chan[a][1] for a in tensor_args(node) if a in self.chan]

    def check(self) -> None:
        """Raise the first refusal that touches a group to be sliced."""
        for exc, groups, always in self.refusals:
            if always or not groups or any(self.groups.get(g).fixed is None for g in groups):
                raise OptionError(f"trunk {self.name} cannot be made slimmable: layer {exc.layer} "
                                  f"{exc.reason}", key="trunk")

    def _refuse(self, node: fx.Node, reason: str) -> None:
        raise Refused(layer_of(node), reason)

    def _new(self, size: int, owner: str, fixed: str | None = None) -> int:
        g = self.groups.new(size, owner, fixed)
        self.groups.info[g].members.append(owner)
        return g

    def _union(self, a: int, b: int, node: fx.Node) -> int:
        return self.groups.union(a, b, layer_of(node))

    # ------------------------------------------------------------------ one node
    def _visit(self, node: fx.Node) -> None:
        shape = shape_of(node)
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
        elif isinstance(m, attention_types()):
            self._attention(node, m, target)
        elif is_conv_mlp(m):
            self._conv_mlp(node, m, target)
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
        if type(m).forward is not nn.Conv2d.forward and not is_conv2d_same(m):
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

    def _conv_mlp(self, node: fx.Node, m: Any, target: str) -> None:
        """timm's ``ConvMlp`` (VGG's head, kept whole for its input-size check): its two
        convolutions sliced as any, inside it."""
        x, c = self._input(node)
        if c is None:
            c = (1, self._new(m.fc1.in_channels, target, "computed from no sliced channels"))
        if c[0] != 1 or self.groups.get(c[1]).size != m.fc1.in_channels:
            self._refuse(node, f"({type(m).__name__}) takes channels it cannot follow")
        hidden = self._new(m.fc1.out_channels, f"{target}.fc1")
        self._layer(f"{target}.fc1", c[1], hidden, node)
        out = self._new(m.fc2.out_channels, f"{target}.fc2")
        self._layer(f"{target}.fc2", hidden, out, node)
        self.chan[node] = (1, out)

    def _linear(self, node: fx.Node, m: nn.Linear, target: str) -> None:
        from timm.layers import Linear as TimmLinear

        x, c = self._input(node)
        if type(m).forward not in (nn.Linear.forward, TimmLinear.forward):
            self._refuse(node, f"({type(m).__name__}) is a linear layer with a forward of its own")
        shape = shape_of(x)
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

    def _attention(self, node: fx.Node, m: nn.Module, target: str) -> None:
        """Multi-head self-attention over ``(batch, tokens, channels)``: its input channels, the
        channels of its heads (a group of its own, sliced in whole heads) and its projection's."""
        x, c = self._input(node)
        reason = attention_refusal(m)
        if reason is not None:
            self._refuse(node, reason)
        shape = shape_of(x)
        assert shape is not None
        if len(shape) != 3:
            self._refuse(node, f"attends over a tensor of shape {list(shape)}, not (batch, "
                               "tokens, channels)")
        if c is None:
            c = (2, self._new(shape[2], target, "computed from no sliced channels"))
        if c[0] != 2:
            self._refuse(node, "attends over a dimension other than the channels")
        gin = c[1]
        if target in self.heads:  # called twice: one set of heads
            heads = self.heads[target]
        else:
            heads = self._new(m.num_heads * m.head_dim, target)
            info = self.groups.get(heads)
            info.head_dim = info.multiple = m.head_dim
            self.heads[target] = heads
        self._layer(target, gin, self._new(m.proj.out_features, target), node)
        self.chan[node] = (2, self.layers[target][1])  # type: ignore[arg-type]

    def _norm(self, node: fx.Node, m: nn.Module, target: str) -> None:
        from timm.layers import GroupNorm as TimmGroupNorm
        from timm.layers import GroupNorm1, LayerNorm2d
        from timm.layers import LayerNorm as TimmLayerNorm

        x, c = self._input(node)
        shape = shape_of(x)
        assert shape is not None
        if c is None:  # computed from no sliced channels: kept whole
            self.chan[node] = (1, self._new(shape_of(node)[1], target,  # type: ignore[index]
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
        tracked = [a for a in tensor_args(node) if a in self.chan]
        if node.op == "call_method" and t in ("size", "dim", "numel"):
            return
        if t is getattr or (node.op == "call_function" and t is operator.getitem
                            and shape_of(node.args[0]) is None):
            if t is operator.getitem and isinstance(node.args[0], fx.Node):
                items = self.items.get(node.args[0])
                if items is not None and isinstance(node.args[1], int):
                    self.chan[node] = items[node.args[1]]
                else:
                    self.chan_like(node, self.chan.get(node.args[0]))
            return
        if not tracked:
            return
        if t in WEIGHTED:
            self._refuse(node, f"calls {op_name(node)} with weights of its own that cannot "
                               "be sliced")
        if t in MATMUL:
            self._refuse(node, f"multiplies activations as matrices ({op_name(node)}, as "
                               "attention heads do)")
        if t in CONCAT:
            self._concat(node, tracked)
        elif t in SPLIT:
            self._split(node)
        elif t is operator.getitem:
            self._getitem(node)
        elif t in RESHAPE:
            self._reshape(node)
        elif t in PERMUTE:
            self._permute(node)
        elif t in REDUCE:
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
        rank = len(shape_of(first) or ())
        d = self._dim(node)
        if d is None:
            self._refuse(node, f"{op_name(node)} along a dimension only known at run time")
        assert d is not None
        d %= rank + (1 if node.target is torch.stack else 0)
        cd, g = self.chan[first]
        if node.target is torch.stack:
            self._refuse(node, "stacks tensors with channels into a new dimension")
        if d == cd:
            self._concat_channels(node, cd, rank)
            return
        for a in tracked[1:]:
            if self.chan[a][0] != cd:
                self._refuse(node, "concatenates tensors whose channels lie in different "
                                   "dimensions")
            g = self._union(g, self.chan[a][1], node)
        size = (shape_of(first) or ())[cd]
        for a in tensor_args(node):
            if a not in self.chan and len(shape_of(a) or ()) == rank and size > 1:
                source = attr_source(a, cd)  # a learned token, as vision transformers prepend
                if source is None:
                    self._refuse(node, f"concatenates the channels' tensors with a tensor of "
                                       f"{size} fixed channels, not a parameter's channels in "
                                       "their order")
                assert source is not None
                g = self._slice_attr(source, g, node)
        self.chan[node] = (cd, g)

    def _concat_channels(self, node: fx.Node, cd: int, rank: int) -> None:
        """A concatenation along the channels: a group whose parts are its inputs' groups."""
        tensors: Any = node.args[0] if node.args else node.kwargs.get("tensors")
        parts: list[int] = []
        for a in tensors:
            shape = shape_of(a)
            if shape is None or len(shape) != rank:
                self._refuse(node, f"concatenates channels ({op_name(node)}) of operands it "
                                   "cannot follow")
            assert shape is not None
            if a in self.chan:
                if self.chan[a][0] != cd:
                    self._refuse(node, "concatenates tensors whose channels lie in different "
                                       "dimensions")
                parts.append(self.chan[a][1])
            else:
                parts.append(self._new(shape[cd], layer_of(node), "computed from no sliced "
                                                                  "channels"))
        self.chan[node] = (cd, composite(self.groups, parts, layer_of(node)))

    def _split_channels(self, node: fx.Node, x: fx.Node, cd: int) -> None:
        """A split of the channels into pieces: the group of ``x`` cut at the pieces'
        boundaries (:func:`.indices.tile`), each piece the concatenation of its tiles."""
        meta = node.meta.get("tensor_meta")
        if (node.target in (torch.unbind, "unbind") or not isinstance(meta, (tuple, list))
                or not all(hasattr(m, "shape") for m in meta)):
            self._refuse(node, f"splits channels ({op_name(node)}) into pieces it cannot follow")
        assert isinstance(meta, (tuple, list))
        offsets = list(itertools.accumulate((m.shape[cd] for m in meta), initial=0))
        layer = layer_of(node)
        tiles = tile(self.groups, self.chan[x][1], set(offsets), layer)
        starts = list(itertools.accumulate((self.groups.get(t).size for t in tiles), initial=0))
        ranges = [(starts.index(a), starts.index(b)) for a, b in zip(offsets, offsets[1:])]
        self.items[node] = [(cd, composite(self.groups, tiles[i:j], layer)) for i, j in ranges]
        self.narrows[node] = (cd, tiles, ranges, True)

    def _slice_channels(self, node: fx.Node, x: fx.Node, cd: int, it: slice,
                        items: tuple[Any, ...]) -> None:
        """``x[:, a:b]``: the channels ``a:b`` of ``x``'s group, a concatenation of its tiles."""
        size = (shape_of(x) or ())[cd]
        bounds = (it.start, it.stop, it.step)
        whole = slice(None)
        if (not all(b is None or isinstance(b, int) for b in bounds)
                or any(i is None or (i is not Ellipsis and i != whole and i is not it)
                       for i in items)):
            self._refuse(node, "slices channels together with other dimensions")
        start, stop, step = it.indices(size)
        if step != 1 or stop <= start:
            self._refuse(node, f"slices channels with step {step} (only a range of channels "
                               "is sliced)")
        layer = layer_of(node)
        tiles, i, j = cut(self.groups, self.chan[x][1], start, stop, layer)
        self.chan[node] = (cd, composite(self.groups, tiles[i:j], layer))
        self.narrows[node] = (cd, tiles, [(i, j)], False)

    def _refuse_indexed(self) -> None:
        """Layers that meet channels kept as a set of indices (:mod:`.indices`) and cannot take
        them: any but convolutions (not grouped beyond depthwise), linear layers and BatchNorm."""
        def indexed(g: int | None) -> bool:
            info = None if g is None else self.groups.get(g)
            return info is not None and info.fixed is None and bool(info.parts)

        reason = ("takes channels kept as a set of indices (parts of a concatenation or a "
                  "split), which only convolutions, linear layers and BatchNorm take")
        for target, (gin, gout) in self.layers.items():
            if not any(indexed(g) for g in (gin, gout, self.heads.get(target))):
                continue
            m = self.modules[target]
            grouped = isinstance(m, nn.Conv2d) and m.in_channels // m.groups > 1 < m.groups
            if (target in self.heads or target in self.chunks or grouped
                    or not isinstance(m, (nn.Conv2d, nn.Linear, _BatchNorm))):
                self.refusals.append((Refused(target, f"({type(m).__name__}) {reason}"), [],
                                      True))
        for attr, (_, g) in self.sliced.items():
            if indexed(g):
                self.refusals.append((Refused(str(attr.target), f"(a parameter) {reason}"), [],
                                      True))

    def _split(self, node: fx.Node) -> None:
        x = node.args[0]
        assert isinstance(x, fx.Node)
        cd, g = self.chan[x]
        rank = len(shape_of(x) or ())
        default = 0
        pos = 1 if node.target in (torch.unbind, "unbind") else 2
        d = self._dim(node, default, pos)
        if d is not None and d % rank == cd:
            if not self._linear_chunks(node, x):
                self._split_channels(node, x, cd)
                return
            g = self._chunks_of_linear(node, x, cd)
        elif d is None:
            self._refuse(node, f"splits channels ({op_name(node)}): their slices cannot stay "
                               "consistent")
        self.chan[node] = (cd, g)

    def _linear_chunks(self, node: fx.Node, x: fx.Node) -> int | None:
        """The number of equal chunks ``node`` cuts the output ``x`` of a linear layer into (a
        gated MLP's value and gate), when nothing else reads that output; else None."""
        cd = self.chan[x][0]
        size = (shape_of(x) or ())[cd]
        args: Any = node.args
        n: Any = None
        if node.target in (torch.chunk, "chunk"):
            n = node.kwargs.get("chunks", args[1] if len(args) > 1 else None)
        elif node.target in (torch.split, "split"):
            part = node.kwargs.get("split_size_or_sections",
                                   node.kwargs.get("split_size", args[1] if len(args) > 1 else None))
            n = size // part if isinstance(part, int) and part > 0 and size % part == 0 else None
        target = str(x.target)
        layer = self.modules.get(target) if x.op == "call_module" else None
        if (not isinstance(n, int) or n < 2 or size % n or not isinstance(layer, nn.Linear)
                or len(x.users) != 1 or self.groups.get(self.chan[x][1]).members != [target]):
            return None
        return n

    def _chunks_of_linear(self, node: fx.Node, x: fx.Node, cd: int) -> int:
        """The group of each of the equal chunks that ``node`` cuts the output ``x`` of a linear
        layer into, the layer then sliced chunk by chunk (the first channels of each)."""
        size = (shape_of(x) or ())[cd]
        n = self._linear_chunks(node, x)
        assert n is not None
        target = str(x.target)
        whole = self.groups.get(self.chan[x][1])
        whole.fixed = "sliced as its chunks"
        g = self._new(size // n, target)
        self.layers[target] = (self.layers[target][0], g)
        self.chunks[target] = n
        return g

    def _getitem(self, node: fx.Node) -> None:
        x, index = node.args[0], node.args[1]
        assert isinstance(x, fx.Node)
        cd, g = self.chan[x]
        rank = len(shape_of(x) or ())
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
                        self._slice_channels(node, x, cd, it, items)
                        return
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
        ins, outs = shape_of(x), shape_of(node)
        assert ins is not None and outs is not None
        mapped = reshaped_dim(ins, outs, cd)
        if mapped is None:
            self._refuse(node, f"reshapes channels together with other dimensions "
                               f"({op_name(node)} {list(ins)} -> {list(outs)}, as a channel "
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
        rank = len(shape_of(x) or ())
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
            self._refuse(node, f"{op_name(node)} of dimensions only known at run time")
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
        ins = shape_of(x)
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
            self._refuse(node, f"{op_name(node)} over dimensions only known at run time")
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
        rank = len(shape_of(x) or ())
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
        pad = list(pad) if isinstance(pad, (tuple, list)) else []
        k = rank - 1 - cd  # pairs from the last dimension
        if len(pad) > 2 * k + 1 and any(p != 0 for p in pad[2 * k:2 * k + 2]):
            self._refuse(node, "pads channels")
        self.chan[node] = (cd, g)

    def _generic(self, node: fx.Node) -> None:
        """Elementwise and shape-keeping operations: every operand's channel dimension lands on
        one output dimension, and operands share their group."""
        out = shape_of(node)
        tracked = [a for a in tensor_args(node) if a in self.chan]
        if not tracked:
            return
        if out is None:
            if any(self.groups.get(self.chan[a][1]).fixed is None for a in tracked):
                self._refuse(node, f"{op_name(node)} returns something other than one tensor")
            return
        rank = len(out)
        od: int | None = None
        group: int | None = None
        for a in tracked:
            d, g = self.chan[a]
            ins = shape_of(a)
            assert ins is not None
            here = d + rank - len(ins)
            size = ins[d]
            if size == 1 and here >= 0 and out[here] > 1:
                continue  # one channel, broadcast over the other operand's (a spatial gate)
            if here < 0 or out[here] != size:
                self._refuse(node, f"{op_name(node)} changes the {size} channels of its input "
                                   f"({list(ins)} -> {list(out)})")
            if od is not None and here != od:
                self._refuse(node, f"{op_name(node)} combines tensors whose channels lie in "
                                   "different dimensions")
            od = here
            group = g if group is None else self._union(group, g, node)
        if od is None or group is None:
            return
        size = out[od]
        for a in tensor_args(node):
            if a in self.chan:
                continue
            ins = shape_of(a)
            assert ins is not None
            here = od - (rank - len(ins))
            if 0 <= here < len(ins) and ins[here] == size and size > 1:
                source = attr_source(a, here)
                if source is None:
                    self._refuse(node, f"{op_name(node)} combines channels with a tensor of "
                                       f"{size} entries that is not a parameter")
                assert source is not None
                group = self._slice_attr(source, group, node)
        self.chan[node] = (od, group)

    def _slice_attr(self, source: tuple[fx.Node, int], group: int, node: fx.Node) -> int:
        """Slice parameter ``source`` (a get_attr node, its dimension) with channel group
        ``group``; returns the group, joined to the one the parameter is sliced with already."""
        attr, dim = source
        target = str(attr.target)
        known = self.sliced_targets.get(target)
        if known is not None:
            if known[0] != dim:
                self._refuse(node, f"reads parameter {target} with channels along dimension "
                                   f"{dim}, another operation along dimension {known[0]}")
            group = self._union(group, known[1], node)
        self.sliced_targets[target] = self.sliced[attr] = (dim, group)
        self.groups.get(group).members.append(target)
        return group
