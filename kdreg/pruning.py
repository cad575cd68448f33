"""Pruning for export: a backbone's sub-model or front as a standalone module.

:class:`SubmodelModule` and :class:`FrontModule` wrap a (copied) backbone as a module whose
``forward(x)`` gives one sub-model's logits or the features at a split point;
:func:`pruned_copy` copies a backbone without the modules a call does not need (read from the
autograd graph of one probe pass, :mod:`kdreg.measure`), and :func:`truncated_copy` serves
``export_submodel`` of an early-exit model with it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from kdreg.measure import leaf_tensors, probe_with_graph

if TYPE_CHECKING:
    from kdreg.backbone import FlexibleBackbone


class SubmodelModule(nn.Module):
    """Sub-model ``index`` of ``model`` as a module whose ``forward(x)`` returns its logits."""

    def __init__(self, model: FlexibleBackbone, index: int):
        super().__init__()
        self.model = model
        self.index = model.check_index(index)

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_submodel(x, self.index)


class FrontModule(nn.Module):
    """The front of ``model`` up to split point ``split``: ``forward(x)`` returns the features."""

    def __init__(self, model: FlexibleBackbone, split: str):
        super().__init__()
        self.model = model
        self.split = model.check_split(split)

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_front(x, self.split)


class Pruned(nn.Module):
    """Stands in for a module that :func:`pruned_copy` leaves out; running it is an error."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"module {self.path!r} was left out of this truncated copy: the "
                           "sub-model does not use it")


def truncated_copy(
    model: FlexibleBackbone, index: int,
    run: Callable[[FlexibleBackbone, Tensor], Tensor | Sequence[Tensor]] | None = None,
) -> SubmodelModule:
    """Sub-model ``index`` of a copy of ``model`` in eval mode, holding only what ``run(model,
    x)`` (default: ``forward_submodel(x, index)``) uses (:func:`pruned_copy`); its forward is
    ``forward_submodel(x, index)``.

    For single-pass models whose ``forward_submodel`` stops at the chosen exit: an early-exit
    network truncated at its exit. A model that counts exits the anytime way (exit ``i`` costs
    heads ``1..i`` too) passes a ``run`` that evaluates every exit up to ``index``, so that the
    copy holds what ``count_params()[index]`` counts, earlier heads included.
    """
    index = model.check_index(index)
    keep = run or (lambda m, x: m.forward_submodel(x, index))
    return SubmodelModule(pruned_copy(model, keep), index).eval()


def pruned_copy(model: FlexibleBackbone,
                run: Callable[[FlexibleBackbone, Tensor], Tensor | Sequence[Tensor]]) -> FlexibleBackbone:
    """A deep copy of ``model`` without the modules that ``run(model, x)`` does not need: every
    module that it does not call (nor any module inside it) and whose parameters its outputs do
    not depend on is replaced by a parameterless :class:`Pruned` placeholder (a ``ModuleList``
    keeps its length). Read from one call on a probe batch (see :func:`probe_with_graph`)."""
    entered: set[int] = set()
    handles = [m.register_forward_pre_hook(lambda m, _args: entered.add(id(m)))
               for m in model.modules()]

    def depended(x: Tensor) -> set[int]:
        out = run(model, x)
        outs = [out] if isinstance(out, Tensor) else list(out)
        return {id(p) for t in outs for p in leaf_tensors(t)}

    try:
        used = probe_with_graph(model, depended)
    finally:
        for handle in handles:
            handle.remove()
    kept = [name for name, m in model.named_modules()
            if id(m) in entered or any(id(p) in used for p in m.parameters(recurse=False))]

    def needed(name: str) -> bool:
        return any(k == name or k.startswith(name + ".") for k in kept)

    twin = copy.deepcopy(model)
    pruned: list[str] = []
    for name, m in twin.named_modules():
        if (name and not needed(name) and not any(name.startswith(p + ".") for p in pruned)
                and (next(m.parameters(), None) is not None
                     or next(m.buffers(), None) is not None)):
            pruned.append(name)
    for name in pruned:
        parent, _, attr = name.rpartition(".")
        twin.get_submodule(parent)._modules[attr] = Pruned(name)
    return twin
