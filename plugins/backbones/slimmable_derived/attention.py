"""timm's multi-head self-attention sliced in whole heads.

A vision transformer's attention (``timm.layers.Attention``) is kept whole when the trunk is traced
and replaced by :class:`SlicedAttention`: at width ``i`` it reads the first ``in_list[i]`` channels
of its input, runs the first ``dims[i] / head_dim`` heads (the same rows of each of q, k and v of the
fused ``qkv`` projection, the head size kept), and writes the first ``out_list[i]`` channels of its
projection. ``plain(index)`` is that width as a ``timm.layers.Attention`` of its shape.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdreg_plugins.backbones.slimmable import SlimmableMixin, corner


def attention_types() -> tuple[type, ...]:
    """The attention layers a trunk's trace keeps whole (for :class:`SlicedAttention`)."""
    from timm.layers import Attention

    return (Attention,)


def _plain_layer_norm(m: nn.Module) -> bool:
    from timm.layers import LayerNorm as TimmLayerNorm

    return type(m) in (nn.LayerNorm, TimmLayerNorm) and len(m.normalized_shape) == 1


def attention_refusal(m: nn.Module) -> str | None:
    """Why attention layer ``m`` cannot be sliced in whole heads, or None when it can."""
    from timm.layers import Attention, RmsNorm

    if type(m).forward is not Attention.forward:
        return f"({type(m).__name__}) is an attention layer with a forward of its own"
    for name in ("q_norm", "k_norm"):
        norm = getattr(m, name)
        if isinstance(norm, nn.Identity):
            continue
        if not ((_plain_layer_norm(norm) or type(norm) is RmsNorm)
                and tuple(norm.normalized_shape) == (m.head_dim,)):
            return (f"normalises its heads with {name} ({type(norm).__name__}), which is not a "
                    "LayerNorm or RmsNorm over one head")
    if not (isinstance(m.norm, nn.Identity) or _plain_layer_norm(m.norm)):
        return (f"normalises its heads' output with {type(m.norm).__name__}, which is not a "
                "LayerNorm that can be sliced")
    return None


class SlicedAttention(nn.Module, SlimmableMixin):
    """``timm.layers.Attention`` run on its first ``in_list[i]`` input channels, its first
    ``dims[i] / head_dim`` heads and its first ``out_list[i]`` output channels at width ``i``; every
    weight is the original's, shared by all widths. ``q_norm`` and ``k_norm`` act on one head and
    are never sliced; the norm of the heads' output (``scale_norm``) is a LayerNorm sliced to the
    active heads."""

    def __init__(self, attn: nn.Module, in_list: Sequence[int], dims: Sequence[int],
                 out_list: Sequence[int]):
        super().__init__()
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scale)
        self.fused_attn = bool(attn.fused_attn)
        self.qkv, self.proj, self.gate = attn.qkv, attn.proj, attn.gate
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.in_list = tuple(int(c) for c in in_list)
        self.dims = tuple(int(c) for c in dims)
        self.out_list = tuple(int(c) for c in out_list)
        self._record_rules(in_list=in_list, dims=dims, out_list=out_list)
        self._init_widths(len(self.dims))

    def _active(self, i: int) -> tuple[int, int, int]:
        return self.in_list[i], self.dims[i], self.out_list[i]

    def _qkv(self, cin: int, dim: int) -> tuple[Tensor, Tensor | None]:
        """The rows of the active heads of each of q, k and v, and their input columns."""
        w, b = self.qkv.weight, self.qkv.bias
        full = w.shape[0] // 3
        if dim == full and cin == w.shape[1]:
            return w, b
        w = w.view(3, full, w.shape[1])[:, :dim, :cin].reshape(3 * dim, cin)
        return w, None if b is None else b.view(3, full)[:, :dim].reshape(3 * dim)

    def _norm(self, x: Tensor, dim: int) -> Tensor:
        norm = self.norm
        if isinstance(norm, nn.Identity):
            return x
        w = corner(norm.weight, dim) if norm.weight is not None else None
        b = corner(norm.bias, dim) if norm.bias is not None else None
        return F.layer_norm(x, (dim,), w, b, norm.eps)

    @staticmethod
    def _linear(layer: nn.Linear, x: Tensor, cout: int, cin: int) -> Tensor:
        bias = corner(layer.bias, cout) if layer.bias is not None else None
        return F.linear(x, corner(layer.weight, cout, cin), bias)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

        i = self.width_index
        cin, dim, cout = self._active(i)
        if x.shape[-1] != cin:
            raise ValueError(f"{type(self).__name__} at width index {i} expects {cin} input "
                             f"channels, got {x.shape[-1]}")
        B, N, _ = x.shape
        gate = self._linear(self.gate, x, dim, cin).sigmoid() if self.gate is not None else None
        w, b = self._qkv(cin, dim)
        qkv = F.linear(x, w, b).reshape(B, N, 3, dim // self.head_dim, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self._norm(x.transpose(1, 2).reshape(B, N, dim), dim)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self._linear(self.proj, x, cout, dim))

    def params_at(self, index: int) -> int:
        cin, dim, cout = self._active(self.check_width(index))
        count = 3 * dim * cin + (3 * dim if self.qkv.bias is not None else 0)
        count += cout * dim + (cout if self.proj.bias is not None else 0)
        if self.gate is not None:
            count += dim * cin + (dim if self.gate.bias is not None else 0)
        if not isinstance(self.norm, nn.Identity):
            count += dim * sum(p is not None for p in (self.norm.weight, self.norm.bias))
        return count + sum(p.numel() for m in (self.q_norm, self.k_norm) for p in m.parameters())

    def plain(self, index: int) -> nn.Module:
        """Width ``index`` as a ``timm.layers.Attention`` of its heads holding their weights."""
        from timm.layers import Attention

        cin, dim, cout = self._active(self.check_width(index))
        w = self.qkv.weight
        out = Attention(cin, num_heads=dim // self.head_dim, attn_head_dim=self.head_dim,
                        dim_out=cout, qkv_bias=self.qkv.bias is not None,
                        proj_bias=self.proj.bias is not None, gated=self.gate is not None,
                        attn_drop=self.attn_drop.p, proj_drop=self.proj_drop.p,
                        device=w.device, dtype=w.dtype)
        out.fused_attn = self.fused_attn
        out.q_norm, out.k_norm = copy.deepcopy(self.q_norm), copy.deepcopy(self.k_norm)
        if not isinstance(self.norm, nn.Identity):
            norm = copy.deepcopy(self.norm)
            norm.normalized_shape = (dim,)
            for name in ("weight", "bias"):
                p = getattr(norm, name)
                if p is not None:
                    setattr(norm, name, nn.Parameter(p.detach()[:dim].clone(), p.requires_grad))
            out.norm = norm
        with torch.no_grad():
            weight, bias = self._qkv(cin, dim)
            out.qkv.weight.copy_(weight)
            if bias is not None:
                out.qkv.bias.copy_(bias)
            for mine, theirs, rows, cols in ((self.proj, out.proj, cout, dim),
                                             (self.gate, out.gate, dim, cin)):
                if mine is None:
                    continue
                theirs.weight.copy_(mine.weight[:rows, :cols])
                if mine.bias is not None:
                    theirs.bias.copy_(mine.bias[:rows])
        return out

    def extra_repr(self) -> str:
        return (f"in_list={self.in_list}, dims={self.dims}, out_list={self.out_list}, "
                f"head_dim={self.head_dim}")
