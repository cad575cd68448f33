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

from kdreg_plugins.backbones.slimmable import SlimmableMixin, check_in_features
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


def _pick(t: Tensor, dim: int, idx: Tensor | None, count: int) -> Tensor:
    """``t``'s entries ``idx`` along ``dim``, or its first ``count`` where ``idx`` is None."""
    if idx is None:
        return t if count == t.shape[dim] else t.narrow(dim, 0, count)
    return t.index_select(dim, idx)


class IndexedConv2d(DerivedConv2d):
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


class IndexedLinear(DerivedLinear):
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

    def load_plain(self, state: dict[str, Tensor], prefix: str) -> None:
        with torch.no_grad():
            for bn, c, idx in zip(self.bn, self.num_features_list, self.indices):
                pick = list(range(c)) if idx is None else list(idx)
                for name, t in bn.state_dict(keep_vars=True).items():
                    src = state[prefix + name]
                    t.copy_(src[pick] if src.dim() == 1 and t.dim() == 1 else src)


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

    def __init__(self, dim: int, spans: Sequence[Sequence[tuple[int, int]]], pieces: bool):
        super().__init__()
        self.dim, self.pieces = dim, pieces
        self.spans = tuple(tuple(s) for s in spans)
        SlimmableMixin._init_widths(self, len(self.spans))

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
        spans = []
        for i in range(len(counts[0])):
            starts = [0]
            for c in counts:
                starts.append(starts[-1] + c[i])
            spans.append([(starts[a], starts[b] - starts[a]) for a, b in ranges])
        target = f"kdreg_channels_{k}"
        gm.add_submodule(target, ChannelPieces(dim, spans, pieces))
        x = node.args[0]
        with gm.graph.inserting_after(node):
            call = gm.graph.call_module(target, (x,))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
