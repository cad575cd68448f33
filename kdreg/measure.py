"""Measuring a model: the operations a call runs, and what its outputs depend on.

:func:`count_macs` counts the multiply-accumulates of the convolutions and matrix products a call
runs (torch's flop counter). The rest reads the autograd graph of one forward pass on a probe
batch (:func:`probe_with_graph`): the parameters an output was computed from
(:func:`leaf_tensors`, :func:`params_depended_on`) and the operations it was computed through
(:func:`macs_depended_on`). :class:`~kdreg.backbone.FlexibleBackbone`'s default ``count_params``
and ``count_macs`` of a single-pass model are built on them, and so is
:func:`kdreg.pruning.pruned_copy`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from kdreg.backbone import FlexibleBackbone

T = TypeVar("T")


def count_macs(fn) -> int:
    """Multiply-accumulates of the convolutions and matrix products that ``fn()`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops()) // 2


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without any)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# What a model's outputs depend on: the autograd graph of one forward pass on a probe batch


def leaf_tensors(t: Tensor) -> list[Tensor]:
    """The distinct leaf tensors (parameters that require grad) ``t`` was computed from."""
    found: dict[int, Tensor] = {}
    for fn in _graph_nodes(t).values():
        leaf = getattr(fn, "variable", None)
        if isinstance(leaf, Tensor):
            found[id(leaf)] = leaf
    return list(found.values())


def _graph_nodes(t: Tensor) -> dict[int, Any]:
    """Every autograd node ``t`` was computed through, by ``id``.

    The nodes are held in the result: a node's Python object lives only while referenced, and
    ids of dead objects are reused, so an id is only a node's name while the node is held.
    """
    nodes: dict[int, Any] = {}
    stack = [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in nodes:
            continue
        nodes[id(fn)] = fn
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return nodes


def probe_with_graph(model: FlexibleBackbone, fn: Callable[[Tensor], T],
                     input_size: Sequence[int] | None = None) -> T:
    """``fn(zeros)`` on a one-image zero batch at ``input_size`` (default: the model's), in eval
    mode with gradients enabled and every parameter requiring grad, so that the outputs' autograd
    graph reaches every parameter they depend on; the modes and flags are restored after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    h, w = input_size or model.input_size
    x = torch.zeros(1, model.in_chans, h, w, device=device_of(model))
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            return fn(x)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)


def params_depended_on(model: FlexibleBackbone, outputs: Callable[[Tensor], Sequence[Tensor]],
                       input_size: Sequence[int] | None = None) -> list[int]:
    """For each tensor of ``outputs(x)``, the number of ``model``'s parameters it depends on.

    ``count_params`` of a single-pass model is ``params_depended_on(model, model.forward)``; the
    trunk parameters up to split points are ``params_depended_on(trunk, lambda x:
    trunk.forward_stages(x, points)[0])``. Parameters used under ``no_grad`` are not seen.
    """
    own = {id(p) for p in model.parameters()}

    def measure(x: Tensor) -> list[int]:
        return [sum(p.numel() for p in leaf_tensors(out) if id(p) in own) for out in outputs(x)]

    return probe_with_graph(model, measure, input_size)


def macs_depended_on(model: FlexibleBackbone, outputs: Callable[[Tensor], Sequence[Tensor]],
                     input_size: Sequence[int] | None = None) -> list[int]:
    """For each tensor of ``outputs(x)``, the multiply-accumulates (as :func:`count_macs` counts
    them) of the operations it was computed through, from one forward pass of one image.

    Every operation's MACs are recorded with its output, whose autograd node places it in the
    graph; an output counts the operations whose nodes it reaches. Operations run under
    ``no_grad`` are not seen.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import flop_registry

    records: list[tuple[list[Tensor], int]] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            flops = flop_registry.get(func._overloadpacket)
            if flops is not None:
                tensors = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
                records.append((tensors, int(flops(*args, **kwargs, out_val=out)) // 2))
            return out

    def measure(x: Tensor) -> list[int]:
        with Recorder():
            outs = list(outputs(x))
        counts = []
        for out in outs:
            nodes = _graph_nodes(out)
            counts.append(sum(macs for tensors, macs in records
                              if any(id(t.grad_fn) in nodes for t in tensors)))
        return counts

    return probe_with_graph(model, measure, input_size)
