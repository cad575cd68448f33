"""Split points of a traced network and the segments between them."""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx

from kdreg_plugins.backbones.slimmable_derived.nodes import shape_of


def _free(node: fx.Node) -> bool:
    """A node that reads nothing: a parameter (``get_attr``, or a :class:`SlicedTensor` call)."""
    return node.op == "get_attr" or (node.op == "call_module" and not node.all_input_nodes)


def cut_points(gm: fx.GraphModule, points: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
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
        if shape_of(cut) is None:
            rejected[p] = "its output is not one tensor"
            continue
        cuts[p] = cut.name
    return cuts, rejected


def segment(gm: fx.GraphModule, cuts: dict[str, str], start: str | None,
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
