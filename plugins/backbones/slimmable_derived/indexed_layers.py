"""Sliced layers whose channels at a width are a set of indices (:mod:`.indices`): convolutions,
linear layers and BatchNorm taking exactly the kept channels of a concatenation or a split, and
the splits and slices of channels themselves, whose pieces' sizes follow the width."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdreg_plugins.backbones.slimmable import (
    ChannelRule,
    Channels,
    RangeBatchNorm2d,
    SlimmableMixin,
    check_in_features,
    rule_of,
)
from kdreg_plugins.backbones.slimmable_derived.indices import IndexRule
from kdreg_plugins.backbones.slimmable_derived.layers import (
    DerivedConv2d,
    DerivedLinear,
    SwitchableNorm,
)

if TYPE_CHECKING:
    from kdreg_plugins.backbones.slimmable_derived.channels import ChannelGroup

#: per width slot, the kept channels' indices, or None where they are the first ones
Indices = Sequence[tuple[int, ...] | None]


class _Picks:
    """Index tensors per width slot, made once per device."""

    def __init__(self, indices: Indices):
        self.indices = tuple(indices)
        self._made: dict[tuple[int, torch.device], Tensor] = {}

    def at(self, i: int, device: torch.device) -> Tensor | None:
        idx = self.indices[i]
        if idx is None:
            return None
        key = (i, device)
        if key not in self._made:
            self._made[key] = torch.tensor(idx, dtype=torch.long, device=device)
        return self._made[key]

    def __deepcopy__(self, memo: dict[int, Any]) -> _Picks:
        return _Picks(self.indices)


def indices_at(rule: ChannelRule, widths: Sequence[float]) -> tuple[tuple[int, ...] | None, ...]:
    """The kept channels' indices under ``rule`` at each of ``widths`` (None: the first ones)."""
    return tuple(rule.indices(w) if isinstance(rule, IndexRule) else None for w in widths)


def _pick(t: Tensor, dim: int, idx: Tensor | None, count: int) -> Tensor:
    """``t``'s entries ``idx`` along ``dim``, or its first ``count`` where ``idx`` is None."""
    if idx is None:
        return t if count == t.shape[dim] else t.narrow(dim, 0, count)
    return t.index_select(dim, idx)


class _InOutPicks:
    """The input and output index picks of a sliced layer, recomputed when its width slots are
    redrawn (a width range)."""

    picks_in: _Picks
    picks_out: _Picks
    channel_rules: dict[str, Any]

    def set_slot_widths(self, widths: Sequence[float]) -> None:
        super().set_slot_widths(widths)  # type: ignore[misc]
        self.picks_in = _Picks(indices_at(self.channel_rules["in_list"], widths))
        self.picks_out = _Picks(indices_at(self.channel_rules["out_list"], widths))


class IndexedConv2d(_InOutPicks, DerivedConv2d):
    """:class:`DerivedConv2d` whose input and output channels at width ``i`` are ``in_index[i]``
    and ``out_index[i]`` of the full layer's (the first ones where None)."""

    def __init__(self, conv: nn.Conv2d, in_list: Sequence[int], out_list: Sequence[int],
                 in_index: Indices, out_index: Indices):
        super().__init__(conv, in_list, out_list)
        self.picks_in, self.picks_out = _Picks(in_index), _Picks(out_index)

    def _weights(self, i: int) -> tuple[Tensor, Tensor | None]:
        cin, cout, _ = self._active(i)
        dev = self.weight.device
        rows = self.picks_out.at(i, dev)
        weight = _pick(self.weight, 0, rows, cout)
        if self.groups == 1:
            weight = _pick(weight, 1, self.picks_in.at(i, dev), cin)
        bias = None if self.bias is None else _pick(self.bias, 0, rows, cout)
        return weight, bias


class IndexedLinear(_InOutPicks, DerivedLinear):
    """:class:`DerivedLinear` (one chunk) whose input and output features at width ``i`` are
    ``in_index[i]`` and ``out_index[i]`` of the full layer's (the first ones where None)."""

    def __init__(self, linear: nn.Linear, in_list: Sequence[int], out_list: Sequence[int],
                 in_index: Indices, out_index: Indices):
        super().__init__(linear, in_list, out_list)
        self.picks_in, self.picks_out = _Picks(in_index), _Picks(out_index)

    def _weights(self, i: int) -> tuple[Tensor, Tensor | None]:
        cin, cout = self.in_list[i], self.out_list[i]
        dev = self.weight.device
        rows = self.picks_out.at(i, dev)
        weight = _pick(_pick(self.weight, 0, rows, cout), 1, self.picks_in.at(i, dev), cin)
        return weight, None if self.bias is None else _pick(self.bias, 0, rows, cout)

    def forward(self, x: Tensor) -> Tensor:
        i = self.width_index
        check_in_features(self, x, i, self.in_list[i])
        return F.linear(x, *self._weights(i))

    def plain(self, index: int) -> nn.Linear:
        out = super().plain(index)
        weight, bias = self._weights(self.check_width(index))
        with torch.no_grad():
            out.weight.copy_(weight)
            if bias is not None and out.bias is not None:
                out.bias.copy_(bias)
        return out


def picked_batch_norm(norm: _BatchNorm, idx: Sequence[int] | None, channels: int) -> _BatchNorm:
    """A copy of ``norm`` holding the affine parameters and statistics of channels ``idx``
    (its first ``channels`` where None)."""
    out = copy.deepcopy(norm)
    full = norm.num_features
    pick = torch.arange(channels) if idx is None else torch.tensor(idx, dtype=torch.long)
    for name, p in list(out.named_parameters(recurse=False)):
        if p.dim() == 1 and p.shape[0] == full:
            setattr(out, name, nn.Parameter(p.detach()[pick.to(p.device)].clone(),
                                            p.requires_grad))
    for name, b in list(out.named_buffers(recurse=False)):
        if b is not None and b.dim() == 1 and b.shape[0] == full:
            setattr(out, name, b[pick.to(b.device)].clone())
    out.num_features = channels
    return out


class IndexedNorm(SwitchableNorm):
    """:class:`SwitchableNorm` whose width ``i`` starts from channels ``indices[i]`` of the
    original BatchNorm (its first ones where None)."""

    def __init__(self, norm: _BatchNorm, sizes: Sequence[int], indices: Indices):
        nn.Module.__init__(self)
        self.num_features_list = tuple(int(c) for c in sizes)
        self.indices = tuple(indices)
        self.bn = nn.ModuleList(picked_batch_norm(norm, idx, c)
                                for idx, c in zip(self.indices, self.num_features_list))
        self._record_rules(num_features_list=sizes)
        self._init_widths(len(self.num_features_list))
        self.template = [copy.deepcopy(norm)]  # a list: not a submodule of this one

    def ranged(self, num_train: int) -> IndexedRangeNorm:
        """This layer as one BatchNorm for a width range (:class:`IndexedRangeNorm`)."""
        rule = self.channel_rules["num_features_list"]
        return IndexedRangeNorm(self.template[0], Channels(self.num_features_list, rule),
                                num_train)

    def load_plain(self, state: dict[str, Tensor], prefix: str) -> None:
        with torch.no_grad():
            for bn, c, idx in zip(self.bn, self.num_features_list, self.indices):
                pick = list(range(c)) if idx is None else list(idx)
                for name, t in bn.state_dict(keep_vars=True).items():
                    src = state[prefix + name]
                    t.copy_(src[pick] if src.dim() == 1 and t.dim() == 1 else src)


class IndexedRangeNorm(RangeBatchNorm2d):
    """:class:`RangeBatchNorm2d` over all of a BatchNorm's channels whose width slot ``i`` takes
    channels ``indices_at(rule, slot widths)[i]`` of its shared affine parameters and of its
    evaluated widths' statistics (the first ones where None)."""

    def __init__(self, norm: _BatchNorm, sizes: Sequence[int], num_train: int):
        super().__init__(norm, sizes, num_train)
        self.picks = _Picks((None,) * len(self.num_features_list))

    def set_slot_widths(self, widths: Sequence[float]) -> None:
        super().set_slot_widths(widths)
        self.picks = _Picks(indices_at(self.channel_rules["num_features_list"], widths))

    def forward(self, x: Tensor) -> Tensor:
        idx = self.picks.at(self.width_index, x.device)
        if idx is None:
            return super().forward(x)
        j = self.width_index - self.num_train
        w = None if self.weight is None else self.weight.index_select(0, idx)
        b = None if self.bias is None else self.bias.index_select(0, idx)
        if j < 0 or self.running_mean is None or self.running_var is None:
            out = F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        else:
            mean, var = self.running_mean[j, idx], self.running_var[j, idx]  # copies
            if self.training:
                assert self.num_batches_tracked is not None
                self.num_batches_tracked[j] += 1
                factor = (1.0 / float(self.num_batches_tracked[j]) if self.momentum is None
                          else self.momentum)
                out = F.batch_norm(x, mean, var, w, b, True, factor, self.eps)
                self.running_mean[j, idx], self.running_var[j, idx] = mean, var
            else:
                out = F.batch_norm(x, mean, var, w, b, False, 0.0, self.eps)
        return out if self.post is None else self.post(out)

    def plain(self, index: int) -> nn.Module:
        out = super().plain(index)
        idx = self.picks.indices[index]
        if idx is None:
            return out
        j, pick = index - self.num_train, list(idx)
        values = {"weight": self.weight, "bias": self.bias,
                  "running_mean": None if self.running_mean is None else self.running_mean[j],
                  "running_var": None if self.running_var is None else self.running_var[j]}
        with torch.no_grad():
            for name, value in values.items():
                current = getattr(out, name, None)
                if value is not None and current is not None:
                    current.copy_(value.detach()[pick])
        return out


def indexed_layer(m: nn.Module, sin: Sequence[int] | None, sout: Sequence[int] | None,
                  iin: Indices | None, iout: Indices | None) -> nn.Module:
    """The sliced layer of ``m`` (a convolution, linear layer or BatchNorm) whose input or
    output channels are a set of indices at some width."""
    n = len(sout or sin or ())
    iin = iin or (None,) * n
    iout = iout or (None,) * n
    if isinstance(m, nn.Conv2d):
        assert sin is not None and sout is not None
        return IndexedConv2d(m, sin, sout, iin, iout)
    if isinstance(m, nn.Linear):
        assert sin is not None and sout is not None
        return IndexedLinear(m, sin, sout, iin, iout)
    assert isinstance(m, _BatchNorm) and sout is not None
    return IndexedNorm(m, sout, iout)


class PlainPieces(nn.Module):
    """A split (``pieces``: a tuple) or a slice (one tensor) of the channels along ``dim``:
    ``spans``, (start, length) of each piece (an exported width's)."""

    def __init__(self, dim: int, spans: Sequence[tuple[int, int]], pieces: bool):
        super().__init__()
        self.dim, self.pieces, self.spans = dim, pieces, tuple(spans)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = tuple(x.narrow(self.dim, a, k) for a, k in self.spans)
        return out if self.pieces else out[0]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, spans={self.spans}"


class ChannelPieces(nn.Module, SlimmableMixin):
    """:class:`PlainPieces` whose spans at width ``i`` are ``spans[i]``, in the width's
    channels."""

    width_index: int

    def __init__(self, dim: int, rules: Sequence[ChannelRule], ranges: Sequence[tuple[int, int]],
                 pieces: bool, counts: Sequence[Sequence[int]]):
        super().__init__()
        self.dim, self.pieces = dim, pieces
        #: each tile's rule, and each piece's range of tiles
        self.rules, self.ranges = tuple(rules), tuple(ranges)
        self.spans = self._spans(counts)
        SlimmableMixin._init_widths(self, len(self.spans))

    def _spans(self, counts: Sequence[Sequence[int]]) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per width slot, each piece's (start, length) from each tile's count per slot."""
        out = []
        for i in range(len(counts[0])):
            starts = [0]
            for c in counts:
                starts.append(starts[-1] + c[i])
            out.append(tuple((starts[a], starts[b] - starts[a]) for a, b in self.ranges))
        return tuple(out)

    def set_slot_widths(self, widths: Sequence[float]) -> None:
        self.spans = self._spans([[rule.at(w) for w in widths] for rule in self.rules])
        SlimmableMixin.set_slot_widths(self, widths)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = tuple(x.narrow(self.dim, a, k) for a, k in self.spans[self.width_index])
        return out if self.pieces else out[0]

    def params_at(self, index: int) -> int:
        return 0

    def plain(self, index: int) -> PlainPieces:
        return PlainPieces(self.dim, self.spans[SlimmableMixin.check_width(self, index)],
                           self.pieces)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, spans={self.spans}"


def narrow_pieces(gm: fx.GraphModule, narrows: dict[fx.Node, Any],
                  group: Callable[[int], ChannelGroup]) -> None:
    """Replace each split or slice of sliced channels in ``gm``'s graph (``narrows``: node ->
    (dim, the input's tiles, each piece's range of tiles, whether it is a tuple)) by a
    :class:`ChannelPieces` call; ``group(tile)`` is a tile's channel group."""
    for k, (node, (dim, tiles, ranges, pieces)) in enumerate(narrows.items()):
        counts = [group(t).sizes for t in tiles]
        if all(set(c) == {group(t).size} for c, t in zip(counts, tiles)):
            continue  # nothing of it is sliced: its fixed sizes hold at every width
        rules = [rule_of(c) for c in counts]
        target = f"kdreg_channels_{k}"
        gm.add_submodule(target, ChannelPieces(dim, rules, ranges, pieces, counts))
        x = node.args[0]
        with gm.graph.inserting_after(node):
            call = gm.graph.call_module(target, (x,))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
