"""Swapping the traced graph's layers for sliced ones, in place, as the channel analysis found
them; sliced parameters read through :class:`SlicedTensor`, fixed channel counts of reshapes made
``-1``."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdreg_plugins.backbones.slimmable_derived.attention import sliced_attention
from kdreg_plugins.backbones.slimmable_derived.channels import ChannelAnalysis
from kdreg_plugins.backbones.slimmable_derived.indexed_layers import indexed_layer, narrow_pieces
from kdreg_plugins.backbones.slimmable_derived.layers import (
    DerivedConv2d,
    DerivedLinear,
    SlicedGroupNorm,
    SlicedLayerNorm,
    SlicedTensor,
    SwitchableNorm,
)


def set_module(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    if attr in owner._parameters:
        del owner._parameters[attr]
    if attr in owner._buffers:
        del owner._buffers[attr]
    owner._modules[attr] = module


def convert(gm: fx.GraphModule, analysis: ChannelAnalysis) -> None:
    """Replace the layers of ``gm`` with width-aware ones, in place, and rewrite the graph's
    sliced parameters and fixed channel counts."""
    groups = analysis.groups

    def sizes(g: int | None) -> tuple[int, ...] | None:
        return None if g is None else groups.get(g).sizes

    def indices(g: int | None) -> tuple[tuple[int, ...] | None, ...] | None:
        found = () if g is None or groups.get(g).fixed is not None else groups.get(g).indices
        return found if any(i is not None for i in found) else None

    for target, (gin, gout) in analysis.layers.items():
        m = gm.get_submodule(target)
        sin, sout = sizes(gin), sizes(gout)
        gheads = analysis.heads.get(target)
        if all(g is None or groups.get(g).fixed is not None for g in (gin, gout, gheads)):
            continue  # nothing of it is sliced: kept as it is
        new: nn.Module
        iin, iout = indices(gin), indices(gout)
        if iin is not None or iout is not None:  # a set of indices at some width
            new = indexed_layer(m, sin, sout, iin, iout)
        elif gheads is not None:
            assert sin is not None and sout is not None
            new = sliced_attention(m, sin, groups.get(gheads).sizes, sout)
        elif isinstance(m, nn.Conv2d):
            assert sin is not None and sout is not None
            new = DerivedConv2d(m, sin, sout)
        elif isinstance(m, nn.Linear):
            assert sin is not None and sout is not None
            new = DerivedLinear(m, sin, sout, analysis.chunks.get(target, 1))
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
        set_module(gm, target, new)
    graph = gm.graph
    for attr, (dim, g) in analysis.sliced.items():
        info = groups.get(g)
        if info.fixed is not None:
            continue
        target = str(attr.target)
        value = get_attr(gm, target)
        if not isinstance(value, SlicedTensor):
            set_module(gm, target, SlicedTensor(value, dim, info.sizes))
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
    narrow_pieces(gm, analysis.narrows, groups.get)
    graph.lint()
    gm.recompile()


def get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
