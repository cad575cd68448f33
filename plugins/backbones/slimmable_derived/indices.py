"""Channel groups made of parts: a width as a set of channel indices where the first channels
cannot serve.

A concatenation along channels (DenseNet, DLA, GhostNet, a CSP stage's halves joined again) is a
group whose *parts* are its inputs' groups, in order; a split of a group (a CSP stage's halves,
MixNet's kernel groups, a slice of channels as ReXNet's partial residual takes) makes the group a
concatenation of new parts, one per piece. At width ``w`` each part keeps its own channels, the
first ``int(C * w)`` of a part of ``C``, at that part's offset: the whole keeps the union, and its
consumers (convolutions, linear layers, BatchNorm) take exactly those channels. Groups joined
elementwise are aligned part by part first, splitting a part where the other side has a boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdreg_plugins.backbones.slimmable import ChannelRule

if TYPE_CHECKING:
    from kdreg_plugins.backbones.slimmable_derived.channels import _Groups

#: how often groups joined elementwise are re-aligned before the join is refused
_ALIGN_ROUNDS = 16


def _refused(layer: str, reason: str) -> Exception:
    from kdreg_plugins.backbones.slimmable_derived.channels import Refused

    return Refused(layer, reason)


def leaves(groups: _Groups, g: int) -> list[int]:
    """The groups of their own channels that ``g`` is the concatenation of, in order."""
    g = groups.find(g)
    parts = groups.info[g].parts
    if not parts:
        return [g]
    return [leaf for p in parts for leaf in leaves(groups, p)]


def boundaries(groups: _Groups, g: int) -> list[int]:
    """Offsets where one of ``g``'s leaves ends and the next begins."""
    out, offset = [], 0
    for leaf in leaves(groups, g)[:-1]:
        offset += groups.info[leaf].size
        out.append(offset)
    return out


def refine(groups: _Groups, g: int, sizes: list[int], layer: str) -> None:
    """Make group ``g`` (of its own channels) the concatenation of new groups of ``sizes``."""
    g = groups.find(g)
    info = groups.info[g]
    if info.multiple > 1:
        raise _refused(layer, f"splits channels that a grouped convolution or GroupNorm "
                              f"({info.owner}) slices in whole groups of {info.multiple}")
    parts = [groups.new(s, info.owner, info.fixed) for s in sizes]
    for p in parts:
        groups.info[p].members.append(info.owner)
    info.parts = parts


def tile(groups: _Groups, g: int, cuts: set[int], layer: str, offset: int = 0) -> list[int]:
    """Groups tiling ``g``'s channels in order such that every offset of ``cuts`` (relative to
    ``offset``, ``g``'s first channel) is a boundary between two of them; a group of its own
    channels cut inside is refined into pieces."""
    g = groups.find(g)
    size = groups.info[g].size
    inner = sorted(c - offset for c in cuts if offset < c < offset + size)
    if not inner:
        return [g]
    if not groups.info[g].parts:
        ends = [*inner, size]
        refine(groups, g, [b - a for a, b in zip([0, *inner], ends)], layer)
    out: list[int] = []
    here = offset
    for p in list(groups.info[g].parts):
        out += tile(groups, p, cuts, layer, here)
        here += groups.info[groups.find(p)].size
    return out


def cut(groups: _Groups, g: int, start: int, stop: int, layer: str) -> tuple[list[int], int, int]:
    """``g``'s channels ``start:stop`` as a range of ``g``'s tiles: (the tiles, first, end)."""
    tiles = tile(groups, g, {start, stop}, layer)
    offsets, here = [], 0
    for t in tiles:
        offsets.append(here)
        here += groups.info[groups.find(t)].size
    offsets.append(here)
    return tiles, offsets.index(start), offsets.index(stop)


def composite(groups: _Groups, parts: list[int], owner: str) -> int:
    """The group of the concatenation of ``parts`` (the part itself when there is one)."""
    if len(parts) == 1:
        return groups.find(parts[0])
    g = groups.new(sum(groups.get(p).size for p in parts), owner)
    groups.info[g].members.append(owner)
    groups.info[g].parts = list(parts)
    return g


def union_parts(groups: _Groups, a: int, b: int, layer: str) -> int:
    """Join groups ``a`` and ``b`` of equal size, one or both concatenations: both are tiled
    at every boundary of either, the tiles joined pairwise, then ``a`` and ``b`` themselves."""
    for _ in range(_ALIGN_ROUNDS):
        cuts = set(boundaries(groups, a)) | set(boundaries(groups, b))
        ta, tb = tile(groups, a, cuts, layer), tile(groups, b, cuts, layer)
        sizes_a = [groups.get(t).size for t in ta]
        if sizes_a == [groups.get(t).size for t in tb]:
            break
    else:
        raise _refused(layer, "joins concatenated channels whose parts cannot be aligned")
    for x, y in zip(ta, tb):
        groups.union(x, y, layer)
    a, b = groups.find(a), groups.find(b)
    if a == b:
        return a
    if b < a:
        a, b = b, a
    ia, ib = groups.info[a], groups.info[b]
    groups.parent[b] = a
    ia.parts = ia.parts or ib.parts
    ia.fixed = ia.fixed or ib.fixed
    ia.members += ib.members
    if ib.multiple > 1 or ib.head_dim > 1 or ia.multiple > 1 or ia.head_dim > 1:
        raise _refused(layer, "joins concatenated channels with channels sliced in whole groups "
                              "(a grouped convolution, GroupNorm or attention heads)")
    return a


def settle_fixed(groups: _Groups) -> None:
    """A concatenation never sliced has parts never sliced; one whose parts are all never
    sliced is not sliced either."""
    roots = {groups.find(g) for g in range(len(groups.info))}
    changed = True
    while changed:
        changed = False
        for r in roots:
            info = groups.info[r]
            if not info.parts:
                continue
            parts = [groups.info[groups.find(p)] for p in info.parts]
            if info.fixed is not None:
                for p in parts:
                    if p.fixed is None:
                        p.fixed, changed = info.fixed, True
            elif all(p.fixed is not None for p in parts):
                info.fixed, changed = "made of channels that are never sliced", True


@dataclass(frozen=True)
class IndexRule(ChannelRule):
    """The channels a concatenation keeps at a width: each part's (its :class:`ChannelRule`'s
    count) at that part's offset. ``at`` is their number, :meth:`indices` the indices."""

    parts: tuple[tuple[int, ChannelRule], ...] = ()

    def at(self, width: float) -> int:
        return sum(rule.at(width) for _, rule in self.parts)

    def empty_at(self, width: float) -> bool:
        return any(rule.empty_at(width) for _, rule in self.parts)

    def indices(self, width: float) -> tuple[int, ...] | None:
        """The kept channels' indices, None when they are the first ones."""
        out = [offset + k for offset, rule in self.parts for k in range(rule.at(width))]
        return None if out == list(range(len(out))) else tuple(out)


def rule_of_group(groups: _Groups, g: int) -> ChannelRule:
    """The rule of a root group: its own, or an :class:`IndexRule` over its leaves."""
    info = groups.info[groups.find(g)]
    if not info.parts or info.fixed is not None:
        return ChannelRule(info.size, info.multiple, info.fixed is not None)
    parts, offset = [], 0
    for leaf in leaves(groups, g):
        li = groups.info[leaf]
        parts.append((offset, ChannelRule(li.size, li.multiple, li.fixed is not None)))
        offset += li.size
    return IndexRule(info.size, parts=tuple(parts))
