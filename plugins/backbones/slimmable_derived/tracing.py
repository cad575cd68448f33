"""Tracing a trunk with ``torch.fx``: timm's untraceable modules and functions kept whole, the
layers that are sliced kept as modules, and the training flag read when the graph runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdreg.errors import OptionError


def _leaf_types() -> tuple[tuple[type, ...], Callable[[type], bool]]:
    from timm.layers import DropPath
    from timm.layers._fx import is_notrace_module

    from kdreg_plugins.backbones.slimmable_derived.attention import attention_types

    kept = (nn.Conv2d, nn.Linear, _BatchNorm, nn.LayerNorm, nn.GroupNorm, DropPath,
            *attention_types())
    return kept, is_notrace_module


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer with timm's untraceable modules and functions kept whole, and
    every convolution, linear, normalisation and attention layer kept as a module."""

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
                          f"({type(exc).__name__}: {first_line(exc)})", key="trunk") from None
    out = next(n for n in graph.nodes if n.op == "output")
    value = out.args[0]
    if isinstance(value, (list, tuple)):
        if len(value) != 1 or not isinstance(value[0], fx.Node):
            raise OptionError(f"trunk {name} cannot be made slimmable: its traced forward "
                              "returns several outputs, not one tensor of logits", key="trunk")
        out.args = (value[0],)
    _inputs_at_defaults(graph, name)
    _follow_training(root, graph)
    gm = fx.GraphModule(root, graph, class_name="SlimmableGraph")
    return gm


def _inputs_at_defaults(graph: fx.Graph, name: str) -> None:
    """Inputs of the forward after the image (a ViT's ``attn_mask``) become their defaults, the
    values they take when the network is called with the image alone."""
    for node in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        if not node.args:
            raise OptionError(f"trunk {name} cannot be made slimmable: its forward takes input "
                              f"{node.target!r} besides the image, without a default", key="trunk")
        default = node.args[0]
        for user in list(node.users):
            user.args = _replaced(user.args, node, default)
            user.kwargs = _replaced(user.kwargs, node, default)
        graph.erase_node(node)


def _replaced(value: Any, node: fx.Node, by: Any) -> Any:
    return fx.node.map_arg(value, lambda a: by if a is node else a)


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


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""
