"""timm's multi-head self-attention sliced in whole heads.

The attention of a vision transformer (``timm.layers.Attention``: ViT, DeiT, DeiT-III; timm's
``EvaAttention``: EVA, EVA-02 with rotary position embeddings) is kept whole when the trunk is
traced and replaced by :class:`SlicedAttention` (:class:`SlicedEvaAttention`): at width ``i`` it
reads the first ``in_list[i]`` channels of its input, runs the first ``dims[i] / head_dim`` heads
(the same rows of each of q, k and v, the head size kept) and writes the first ``out_list[i]``
channels of its projection (at a width slot in ``tail_slots``, Scala's isolated activation: the
last channels and heads). With :meth:`SlicedAttention.keep_heads` (the slimmable backbone's
``heads = "kept"``, Scala's slicing) every width keeps all heads and runs the first
``dims[i] / num_heads`` channels of each head instead. ``plain(index)`` is that width as the
original class of its shape.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdreg_plugins.backbones.slimmable import SlimmableMixin, chunk_corner, corner


def attention_types() -> tuple[type, ...]:
    """The attention layers a trunk's trace keeps whole (for :func:`sliced_attention`): those
    this timm has."""
    from timm.models import eva, vision_transformer

    found = (getattr(vision_transformer, "Attention", None), getattr(eva, "EvaAttention", None))
    return tuple(kind for kind in found if isinstance(kind, type))


def _plain_layer_norm(m: nn.Module) -> bool:
    from timm.layers import LayerNorm as TimmLayerNorm

    return type(m) in (nn.LayerNorm, TimmLayerNorm) and len(m.normalized_shape) == 1


def attention_refusal(m: nn.Module) -> str | None:
    """Why attention layer ``m`` cannot be sliced in whole heads, or None when it can."""
    from timm.layers import RmsNorm

    if not any(type(m).forward is kind.forward for kind in attention_types()):
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


def sliced_attention(attn: nn.Module, in_list: Sequence[int], dims: Sequence[int],
                     out_list: Sequence[int]) -> SlicedAttention:
    """The sliced counterpart of attention layer ``attn`` (one :func:`attention_refusal` passed)."""
    from timm.models.eva import EvaAttention

    kind = SlicedEvaAttention if isinstance(attn, EvaAttention) else SlicedAttention
    return kind(attn, in_list, dims, out_list)


def _sliced_linear(layer: nn.Linear, rows: int, cols: int, tail: bool = False) -> nn.Linear:
    out = nn.Linear(cols, rows, bias=layer.bias is not None, device=layer.weight.device,
                    dtype=layer.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(corner(layer.weight, rows, cols, tail=tail))
        if layer.bias is not None:
            out.bias.copy_(corner(layer.bias, rows, tail=tail))
    return out


def _span(full: int, k: int, tail: bool) -> slice:
    """The first ``k`` of ``full`` entries, or with ``tail`` the last."""
    return slice(full - k, None) if tail else slice(k)


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
        self.num_heads = int(attn.num_heads)
        #: every width keeps all heads, each sliced to its first channels (:meth:`keep_heads`)
        self.kept_heads = False
        self.scale = float(attn.scale)
        self.fused_attn = bool(attn.fused_attn)
        self.qkv, self.proj, self.gate = attn.qkv, attn.proj, getattr(attn, "gate", None)
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.in_list = tuple(int(c) for c in in_list)
        self.dims = tuple(int(c) for c in dims)
        self.out_list = tuple(int(c) for c in out_list)
        self._record_rules(in_list=in_list, dims=dims, out_list=out_list)
        self._init_widths(len(self.dims))

    def _active(self, i: int) -> tuple[int, int, int]:
        return self.in_list[i], self.dims[i], self.out_list[i]

    def keep_heads(self) -> str | None:
        """Keep every head at every width, slicing each head's channels instead (``dims`` whole
        multiples of the heads); returns why this layer cannot, or None when it now does. The
        head's scale follows its sliced size, as in the plain layer of that shape."""
        if type(self) is not SlicedAttention:
            return "its rotary position embedding acts on whole heads"
        if not all(isinstance(n, nn.Identity) for n in (self.q_norm, self.k_norm, self.norm)):
            return "it normalises its queries, keys or heads' output"
        if self.gate is not None:
            return "it gates its heads' output"
        self.kept_heads = True
        return None

    def _head_size(self, dim: int) -> int:
        return dim // self.num_heads if self.kept_heads else self.head_dim

    def _per_head(self, t: Tensor, chunks: int, dim: int, tail: bool) -> Tensor:
        """Rows of ``t`` (``chunks`` stacked blocks of the heads) at ``dim`` active channels:
        the first (``tail``: last) channels of every head of each block (kept heads)."""
        size = self._head_size(dim)
        rest = t.shape[1:]
        view = t.reshape(chunks, self.num_heads, self.head_dim, *rest)
        return view[:, :, _span(self.head_dim, size, tail)].reshape(chunks * dim, *rest)

    def _proj(self, cout: int, dim: int, tail: bool) -> tuple[Tensor, Tensor | None]:
        """The projection's weight and bias at ``cout`` outputs from ``dim`` head channels."""
        w, b = self.proj.weight, self.proj.bias
        bias = None if b is None else corner(b, cout, tail=tail)
        if not self.kept_heads or dim == w.shape[1]:
            return corner(w, cout, dim, tail=tail), bias
        rows = corner(w, cout, None, tail=tail)
        return self._per_head(rows.t(), 1, dim, tail).t(), bias

    # ------------------------------------------------------------------ forward
    def _qkv(self, cin: int, dim: int, tail: bool = False) -> tuple[Tensor, Tensor | None]:
        """The rows of the active heads of each of q, k and v of the fused projection, and their
        input columns (``tail``: the last heads and columns)."""
        assert self.qkv is not None
        w, b = self.qkv.weight, self.qkv.bias
        full = w.shape[0] // 3
        if dim == full and cin == w.shape[1]:
            return w, b
        if self.kept_heads:
            w = self._per_head(w[:, _span(w.shape[1], cin, tail)], 3, dim, tail)
            return w, None if b is None else self._per_head(b, 3, dim, tail)
        return chunk_corner(w, 3, dim, cin, tail=tail), None if b is None else chunk_corner(b, 3, dim, tail=tail)

    def _heads(self, x: Tensor, cin: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
        """q, k and v of the active heads, each ``(batch, heads, tokens, head_dim)``."""
        w, b = self._qkv(cin, dim, self.from_end(self.width_index))
        qkv = F.linear(x, w, b).reshape(x.shape[0], x.shape[1], 3, -1, self._head_size(dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _norm(self, x: Tensor, dim: int) -> Tensor:
        norm = self.norm
        if isinstance(norm, nn.Identity):
            return x
        t = self.from_end(self.width_index)
        w = corner(norm.weight, dim, tail=t) if norm.weight is not None else None
        b = corner(norm.bias, dim, tail=t) if norm.bias is not None else None
        return F.layer_norm(x, (dim,), w, b, norm.eps)

    def _linear(self, layer: nn.Linear, x: Tensor, cout: int, cin: int) -> Tensor:
        t = self.from_end(self.width_index)
        bias = corner(layer.bias, cout, tail=t) if layer.bias is not None else None
        return F.linear(x, corner(layer.weight, cout, cin, tail=t), bias)

    def _run(self, x: Tensor, rope: Tensor | None, attn_mask: Tensor | None,
             is_causal: bool) -> Tensor:
        i = self.width_index
        cin, dim, cout = self._active(i)
        if x.shape[-1] != cin:
            raise ValueError(f"{type(self).__name__} at width index {i} expects {cin} input "
                             f"channels, got {x.shape[-1]}")
        B, N, _ = x.shape
        gate = self._linear(self.gate, x, dim, cin).sigmoid() if self.gate is not None else None
        q, k, v = self._heads(x, cin, dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self._rotate(q, rope).type_as(v), self._rotate(k, rope).type_as(v)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

            scale = self.scale * (self.head_dim / self._head_size(dim)) ** 0.5
            attn = (q * scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self._norm(x.transpose(1, 2).reshape(B, N, dim), dim)
        if gate is not None:
            x = x * gate
        return self.proj_drop(F.linear(x, *self._proj(cout, dim, self.from_end(i))))

    def _rotate(self, t: Tensor, rope: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__} takes no rotary position embedding")

    def forward(self, x: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        return self._run(x, None, attn_mask, is_causal)

    # ------------------------------------------------------------------ counts, export
    def _qkv_params(self, cin: int, dim: int) -> int:
        assert self.qkv is not None
        return 3 * dim * cin + (3 * dim if self.qkv.bias is not None else 0)

    def params_at(self, index: int) -> int:
        cin, dim, cout = self._active(self.check_width(index))
        count = self._qkv_params(cin, dim)
        count += cout * dim + (cout if self.proj.bias is not None else 0)
        if self.gate is not None:
            count += dim * cin + (dim if self.gate.bias is not None else 0)
        if not isinstance(self.norm, nn.Identity):
            count += dim * sum(p is not None for p in (self.norm.weight, self.norm.bias))
        return count + sum(p.numel() for m in (self.q_norm, self.k_norm) for p in m.parameters())

    def _plain_attention(self, cin: int, dim: int, tail: bool) -> nn.Module:
        """The original class with the active heads, its own projections still to fill."""
        from timm.models.vision_transformer import Attention

        w, _ = self._qkv(cin, dim, tail)
        heads = self.num_heads if self.kept_heads else dim // self.head_dim
        out = Attention(cin, num_heads=heads, attn_head_dim=self._head_size(dim),
                        qkv_bias=self.qkv is not None and self.qkv.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            weight, bias = self._qkv(cin, dim, tail)
            out.qkv.weight.copy_(weight)
            if bias is not None:
                out.qkv.bias.copy_(bias)
        return out

    def plain(self, index: int) -> nn.Module:
        """Width ``index`` as the original attention class of its heads holding their weights."""
        cin, dim, cout = self._active(self.check_width(index))
        t = self.from_end(index)
        out = self._plain_attention(cin, dim, t)
        out.fused_attn = self.fused_attn
        out.q_norm, out.k_norm = copy.deepcopy(self.q_norm), copy.deepcopy(self.k_norm)
        out.attn_drop, out.proj_drop = copy.deepcopy(self.attn_drop), copy.deepcopy(self.proj_drop)
        out.proj = nn.Linear(dim, cout, bias=self.proj.bias is not None,
                             device=self.proj.weight.device, dtype=self.proj.weight.dtype)
        with torch.no_grad():
            weight, bias = self._proj(cout, dim, t)
            out.proj.weight.copy_(weight)
            if bias is not None:
                out.proj.bias.copy_(bias)
        out.gate = None if self.gate is None else _sliced_linear(self.gate, dim, cin, t)
        out.norm = copy.deepcopy(self.norm)
        if not isinstance(self.norm, nn.Identity):
            out.norm.normalized_shape = (dim,)
            for name in ("weight", "bias"):
                p = getattr(out.norm, name)
                if p is not None:
                    setattr(out.norm, name, nn.Parameter(corner(p.detach(), dim, tail=t).clone(),
                                                         p.requires_grad))
        return out

    def extra_repr(self) -> str:
        return (f"in_list={self.in_list}, dims={self.dims}, out_list={self.out_list}, "
                f"head_dim={self.head_dim}")


class SlicedEvaAttention(SlicedAttention):
    """timm's ``EvaAttention`` sliced as :class:`SlicedAttention`: q, k and v from one fused
    projection (its q and v biases, zero k bias, sliced alike) or three; the rotary position
    embedding acts within one head and is never sliced."""

    k_bias: Tensor | None

    def __init__(self, attn: nn.Module, in_list: Sequence[int], dims: Sequence[int],
                 out_list: Sequence[int]):
        super().__init__(attn, in_list, dims, out_list)
        self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.q_bias, self.v_bias = attn.q_bias, attn.v_bias
        self.register_buffer("k_bias", attn.k_bias, persistent=False)
        self.qkv_bias_separate = bool(attn.qkv_bias_separate)
        self.num_prefix_tokens = int(attn.num_prefix_tokens)
        self.rotate_half = bool(attn.rotate_half)

    def _bias(self, dim: int, tail: bool = False) -> Tensor | None:
        if self.q_bias is None or self.v_bias is None or self.k_bias is None:
            return None
        return torch.cat([corner(b, dim, tail=tail) for b in (self.q_bias, self.k_bias, self.v_bias)])

    def _heads(self, x: Tensor, cin: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        if self.qkv is None:
            return tuple(  # type: ignore[return-value]
                self._linear(p, x, dim, cin).reshape(B, N, -1, self.head_dim).transpose(1, 2)
                for p in (self.q_proj, self.k_proj, self.v_proj))
        t = self.from_end(self.width_index)
        w, _ = self._qkv(cin, dim, t)
        bias = self._bias(dim, t)
        if self.qkv_bias_separate and bias is not None:
            qkv = F.linear(x, w) + bias
        else:
            qkv = F.linear(x, w, bias)
        q, k, v = qkv.reshape(B, N, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _rotate(self, t: Tensor, rope: Tensor) -> Tensor:
        from timm.layers import apply_rot_embed_cat

        n = self.num_prefix_tokens
        return torch.cat([t[:, :, :n, :], apply_rot_embed_cat(t[:, :, n:, :], rope,
                                                              half=self.rotate_half)], dim=2)

    def forward(self, x: Tensor, rope: Tensor | None = None,  # type: ignore[override]
                attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return self._run(x, rope, attn_mask, is_causal)

    def _qkv_params(self, cin: int, dim: int) -> int:
        if self.qkv is None:
            return sum(dim * cin + (dim if p.bias is not None else 0)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        return 3 * dim * cin + dim * ((self.q_bias is not None) + (self.v_bias is not None))

    def _plain_attention(self, cin: int, dim: int, tail: bool) -> nn.Module:
        from timm.models.eva import EvaAttention

        fused = self.qkv is not None
        out = EvaAttention(cin, num_heads=dim // self.head_dim, attn_head_dim=self.head_dim,
                           qkv_bias=(self.q_bias is not None if fused
                                     else self.q_proj.bias is not None),
                           qkv_fused=fused, qkv_bias_separate=self.qkv_bias_separate,
                           num_prefix_tokens=self.num_prefix_tokens, scale_norm=False,
                           rotate_half=self.rotate_half, device=self.proj.weight.device,
                           dtype=self.proj.weight.dtype)
        with torch.no_grad():
            if fused:
                out.qkv.weight.copy_(self._qkv(cin, dim, tail)[0])
                for name in ("q_bias", "k_bias", "v_bias"):
                    mine = getattr(self, name)
                    if mine is not None:
                        getattr(out, name).copy_(corner(mine, dim, tail=tail))
            else:
                for name in ("q_proj", "k_proj", "v_proj"):
                    setattr(out, name, _sliced_linear(getattr(self, name), dim, cin, tail))
        return out
