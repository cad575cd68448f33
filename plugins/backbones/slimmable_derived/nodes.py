"""What a traced node is: its shape, the layer it ran in, its tensor operands, the operations it
may be, and how a reshape moves a dimension."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F


def layer_of(node: fx.Node) -> str:
    """The innermost module a node ran in (its own for a module call), else the node's name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0])
    return node.name


def op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    return getattr(t, "__name__", str(t))


def shape_of(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


CONCAT = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack,
           "cat", "concat"}
SPLIT = {torch.split, torch.chunk, torch.tensor_split, torch.unbind, "split", "chunk",
          "tensor_split", "unbind", "split_with_sizes"}
MATMUL = {torch.matmul, torch.bmm, torch.mm, torch.einsum, torch.baddbmm, torch.addmm,
           operator.matmul, F.scaled_dot_product_attention, "matmul", "bmm", "mm", "baddbmm"}
WEIGHTED = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.linear, F.batch_norm,
             F.layer_norm, F.group_norm, F.instance_norm, torch.conv2d, torch.batch_norm}
RESHAPE = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, "reshape", "view",
            "flatten", "squeeze", "unsqueeze", "unflatten", torch.unflatten}
PERMUTE = {torch.permute, torch.transpose, torch.movedim, torch.swapaxes, "permute",
            "transpose", "movedim", "swapaxes"}
REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.prod,
           torch.logsumexp, "mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp",
           "max", "min", "norm", torch.max, torch.min, torch.norm}


#: operations on one tensor that act on each element alone (casts, copies, elementwise functions)
PER_ELEMENT = {"to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous",
               "clone", "detach", "exp", "sigmoid", "tanh", "abs", "neg", "sqrt", "pow",
               torch.exp, torch.sigmoid, torch.tanh, torch.abs, torch.neg, torch.sqrt, torch.pow,
               operator.neg, operator.pow, F.softplus, F.relu, F.gelu}


def tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            if shape_of(a) is not None and a not in found:
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


def attr_source(node: fx.Node, dim: int) -> tuple[fx.Node, int] | None:
    """The get_attr node that ``node`` is a reshape, cast or expansion of (a ViT's class token
    expanded over the batch), and its dimension matching ``node``'s dimension ``dim``; None when
    ``node`` comes from anything else or an expansion writes that dimension's size."""
    while node.op != "get_attr":
        if node.op not in ("call_method", "call_function") or len(tensor_args(node)) != 1:
            return None
        parent = tensor_args(node)[0]
        if parent is not node.args[0]:
            return None
        ins, outs = shape_of(parent), shape_of(node)
        assert ins is not None and outs is not None
        back: int | None
        if node.target in RESHAPE:
            back = reshaped_dim(outs, ins, dim)
        elif node.target == "expand":
            back = _expanded_dim(node, ins, outs, dim)
        elif ins == outs and node.target in PER_ELEMENT:
            back = dim
        else:
            return None
        if back is None:
            return None
        node, dim = parent, back
    shape = shape_of(node)
    if shape is None or shape[dim] <= 1:
        return None
    return node, dim


def _expanded_dim(node: fx.Node, ins: Sequence[int], outs: Sequence[int], d: int) -> int | None:
    """Dimension ``d`` of ``Tensor.expand``'s output ``outs`` in its input ``ins``, when the
    expansion keeps it (its size given as -1), else None."""
    args: Any = node.args[1:]
    sizes = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)
    back = d - (len(outs) - len(ins))
    if back < 0 or len(sizes) != len(outs) or sizes[d] != -1 or ins[back] != outs[d]:
        return None
    return back


def reshaped_dim(ins: Sequence[int], outs: Sequence[int], d: int) -> int | None:
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
