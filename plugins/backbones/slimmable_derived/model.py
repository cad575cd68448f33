"""The slimmable model: a traced trunk whose layers are sliced per width (see the package's
docstring), with its counts, split points, export and weights."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from kdreg.backbone import FlexibleBackbone, segment_range, walk_segments
from kdreg.errors import ExportError, OptionError
from kdreg.feature_loss import tokens_of
from kdreg_plugins.backbones.slimmable import (
    DEFAULT_WIDTHS,
    Channels,
    RangeBatchNorm2d,
    SlimmableBackbone,
    SlimmableMixin,
    set_width_index,
    slimmable_layers,
)
from kdreg_plugins.backbones.slimmable_derived.attention import SlicedAttention
from kdreg_plugins.backbones.slimmable_derived.channels import ChannelAnalysis, ChannelGroup
from kdreg_plugins.backbones.slimmable_derived.convert import convert, set_module
from kdreg_plugins.backbones.slimmable_derived.indexed_layers import IndexedNorm
from kdreg_plugins.backbones.slimmable_derived.indices import IndexRule, rule_of_group
from kdreg_plugins.backbones.slimmable_derived.layers import SwitchableNorm
from kdreg_plugins.backbones.slimmable_derived.segments import cut_points, segment
from kdreg_plugins.backbones.slimmable_derived.tracing import first_line, trace

_PROBE_BATCH = 2
#: how a width slices attention: whole heads, or every head kept and sliced
HEADS = ("sliced", "kept")


class DerivedSlimmable(SlimmableBackbone):
    """A traced network with width-aware layers (see the module docstring); sub-models are the
    widths, smallest first."""

    def __init__(self, trunk: FlexibleBackbone,
                 widths: Sequence[float] | Mapping[str, Any] = DEFAULT_WIDTHS, *,
                 name: str | None = None, in_chans: int = 3,
                 input_size: tuple[int, int] = (32, 32), isolated: bool = False,
                 heads: str = "sliced"):
        super().__init__(widths, in_chans=in_chans, input_size=input_size)
        if not isinstance(isolated, bool):
            raise OptionError(f"isolated must be true or false, got {isolated!r}", key="isolated")
        if heads not in HEADS:
            raise OptionError(f"heads must be one of {', '.join(map(repr, HEADS))}, got {heads!r}",
                              key="heads")
        #: Scala's isolated activation: the smallest width takes the last channels of every layer
        self.isolated = isolated
        #: "sliced": a width runs whole heads; "kept": every head, each sliced (Scala)
        self.heads = heads
        if name is None:
            from kdreg_plugins.backbones.exits import _name_of

            name = _name_of(trunk)
        self.trunk_name = name
        if trunk.num_submodels != 1:
            raise OptionError(f"trunk {name} has {trunk.num_submodels} sub-models "
                              f"({', '.join(trunk.submodel_labels)}); slimmable needs a plain "
                              "network", key="trunk")
        from kdreg_plugins.backbones.timm_adapter import TimmBackbone

        root: nn.Module = trunk.net if isinstance(trunk, TimmBackbone) else trunk
        #: prefix of the trunk's state dict keys before the traced network's own
        self.source_prefix = "net." if isinstance(trunk, TimmBackbone) else ""
        self.input_mean, self.input_std = trunk.input_mean, trunk.input_std
        self.pretrained = trunk.pretrained
        #: how the trunk's tokens begin (class, distillation, register tokens), for feature losses
        self.token_layout = tokens_of(root)
        was_training = root.training
        root = copy.deepcopy(root).eval()
        gm = trace(root, name)
        _propagate_shapes(gm, in_chans, self.input_size, name)
        analysis = ChannelAnalysis(gm, name)
        try:
            analysis.run()
        finally:
            gm.train(was_training)
        analysis.check()
        self.channel_groups = self._size_groups(analysis)
        self.analysis_layers = {t: (self._sizes(analysis, gin),
                                    self._sizes(analysis, gout, analysis.chunks.get(t, 1)))
                                for t, (gin, gout) in analysis.layers.items()}
        self._group_of = {t: (None if gin is None else analysis.groups.find(gin),
                              None if gout is None else analysis.groups.find(gout))
                          for t, (gin, gout) in analysis.layers.items()}
        convert(gm, analysis)
        if heads == "kept":
            _keep_heads(gm, name)
        gm.train(was_training)
        self.net = gm
        self.split_nodes, self.rejected_points = cut_points(gm, trunk.split_points())
        self._segments: dict[tuple[str | None, str | None], fx.GraphModule] = {}
        self.finish_widths()
        if isolated:
            self._check_isolated()
        self._mark_tails()
        trunk.register_load_state_dict_post_hook(self._trunk_loaded)

    # ------------------------------------------------------------------ isolated activation
    def _check_isolated(self) -> None:
        for info in self.channel_groups.values():
            if any(ix is not None for ix in getattr(info, "indices", ())):
                raise OptionError(
                    f"isolated activation slices the first or last channels; layer {info.owner} "
                    f"of trunk {self.trunk_name} keeps a set of channel indices", key="isolated")
        for path, m in self.net.named_modules():
            if isinstance(m, (SwitchableNorm, RangeBatchNorm2d)):
                raise OptionError(
                    f"isolated activation slices networks normalised by LayerNorm or GroupNorm "
                    f"(transformers); layer {path} of trunk {self.trunk_name} is a BatchNorm",
                    key="isolated")

    def _mark_tails(self) -> None:
        """With ``isolated``, every width slot holding the smallest width takes the last channels
        of each layer (:attr:`SlimmableMixin.tail_slots`)."""
        smallest = self.width_range.min if self.width_range is not None else self.widths[0]
        tails = frozenset(i for i, w in enumerate(self.slot_widths)
                          if self.isolated and w == smallest)
        for layer in slimmable_layers(self):
            layer.tail_slots = tails

    def finish_widths(self) -> None:
        """A width range: each BatchNorm over channels kept as a set of indices becomes one
        :class:`IndexedRangeNorm` first (the others become :class:`RangeBatchNorm2d`)."""
        if self.width_range is not None:
            for path, m in list(self.named_modules()):
                if isinstance(m, IndexedNorm):
                    set_module(self, path, m.ranged(len(self.train_widths)))
        super().finish_widths()

    def _apply_slots(self) -> None:
        super()._apply_slots()
        if hasattr(self, "isolated"):   # finish_widths applies the slots before it is set
            self._mark_tails()

    def untrained_width_refusal(self) -> str | None:
        """A transformer (attention layers) is refused at widths it was not trained at: its
        LayerNorm keeps no statistics to recalibrate, and an untrained width of a ViT is near
        chance (Scala, Table 2); a CNN's BatchNorm is recalibrated instead."""
        if any(isinstance(m, SlicedAttention) for m in self.net.modules()):
            return (f"trunk {self.trunk_name} is a transformer, evaluated at the widths it was "
                    "trained at only (no BatchNorm statistics to recalibrate)")
        return None

    # ------------------------------------------------------------------ sizes
    def _size_groups(self, analysis: ChannelAnalysis) -> dict[int, ChannelGroup]:
        roots = dict.fromkeys(analysis.groups.find(g) for g in range(len(analysis.groups.info)))
        out = {root: analysis.groups.info[root] for root in roots}
        if self.heads == "kept":  # heads' channels in whole multiples of the heads instead
            for info in out.values():
                if info.head_dim > 1:
                    info.multiple, info.head_dim = info.size // info.head_dim, 1
        sliced = [info for info in out.values() if info.fixed is None]
        if sliced:  # the smallest group decides how narrow the model can be
            small = min(sliced, key=lambda info: info.size)
            narrowest = (self.width_range.min,) if self.width_range is not None else self.widths
            for width in narrowest:
                if int(small.size * width + 1e-9) == 0:
                    raise OptionError(
                        f"width {width:g} leaves layer {small.owner} of trunk {self.trunk_name} "
                        f"no channel (int({small.size} x {width:g}) = 0); the narrowest width "
                        f"this trunk allows is {math.ceil(1e6 / small.size) / 1e6:g}",
                        key="widths")
        if self.width_range is None or self.width_range.members:
            for info in sliced:
                self._check_whole_heads(info)
        slots = self.slot_widths
        for root, info in out.items():
            rule = rule_of_group(analysis.groups, root)
            info.sizes = Channels([rule.at(w) for w in slots], rule)
            info.indices = tuple(rule.indices(w) if isinstance(rule, IndexRule) else None
                                 for w in slots)
        return out

    def _check_whole_heads(self, info: ChannelGroup) -> None:
        """Refuse a width that keeps part of an attention head of ``info``'s channels, naming
        the widths that keep whole heads (rounded up to four decimals, so they do)."""
        if info.head_dim == 1:
            return
        heads = info.size // info.head_dim
        r = self.width_range
        for width in (r.members if r is not None else self.widths):
            kept = int(info.size * width + 1e-9)
            if kept % info.head_dim:
                valid = ", ".join(f"{math.ceil(k / heads * 1e4 - 1e-6) / 1e4:g}"
                                  for k in range(1, heads + 1))
                raise OptionError(
                    f"width {width:g} cuts an attention head of layer {info.owner} of trunk "
                    f"{self.trunk_name} (int({info.size} x {width:g}) = {kept} channels, heads "
                    f"of {info.head_dim}); the widths that keep whole heads are {valid}",
                    key="widths")

    @staticmethod
    def _channels(info: ChannelGroup, width: float) -> int:
        """``int(C * w)`` channels of a group of ``C`` (:func:`scale_channels`' rule), rounded
        down to whole groups of a grouped layer, at least one group."""
        k = int(info.size * width + 1e-9)
        return max(info.multiple, k // info.multiple * info.multiple)

    def _sizes(self, analysis: ChannelAnalysis, g: int | None,
               chunks: int = 1) -> tuple[int, ...] | None:
        return None if g is None else tuple(chunks * c for c in analysis.groups.get(g).sizes)

    def layer_channels(self, layer: str) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
        """Input and output channels of traced layer ``layer`` (a module path of the trunk's
        network), one per width."""
        return self.analysis_layers[layer]

    def same_group(self, a: str, b: str) -> bool:
        """Whether the outputs of layers ``a`` and ``b`` are sliced as one channel group."""
        return self._group_of[a][1] == self._group_of[b][1]

    # ------------------------------------------------------------------ forward
    def forward_width(self, x: Tensor) -> Tensor:
        return self.net(x)

    def classify(self, h: Tensor) -> Tensor:  # the traced graph classifies itself
        raise TypeError("DerivedSlimmable runs its traced graph; it has no separate classifier")

    def split_points(self) -> tuple[str, ...]:
        return tuple(self.split_nodes)

    def forward_segment(self, h: Tensor, start: str | None, end: str | None,
                        index: int | None = None) -> Tensor:
        """From split point ``start`` (None: the image) to ``end`` (None: the logits) at width
        ``index`` (None: the full width, the contract of every backbone's segments)."""
        segment_range(self.split_points(), start, end)
        self.set_width(-1 if index is None else index)
        key = (start, end)
        if key not in self._segments:
            self._segments[key] = segment(self.net, self.split_nodes, start, end)
        return self._segments[key](h)

    def forward_features(self, x: Tensor, index: int, points: Sequence[str]) -> tuple[list[Tensor], Tensor]:
        """Features of width ``index`` at ``points`` and its logits, from one forward pass."""
        wanted = self.ordered_points(points)
        index = self.check_index(index)
        return walk_segments(lambda h, start, end: self.forward_segment(h, start, end, index), x, wanted)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._segments = {}  # segments hold references to tensors that may be replaced
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ counts, export
    def export_submodel(self, index: int) -> nn.Module:
        """Width ``index`` as the traced graph calling plain layers that hold only its channels
        (each slimmable layer's ``plain(index)``: sliced convolutions, linear and LayerNorm /
        GroupNorm layers, the width's own BatchNorm)."""
        i = self.eval_slot(index)
        gm = copy.deepcopy(self.net)
        for path, m in list(gm.named_modules()):
            if isinstance(m, SlimmableMixin):
                plain = getattr(m, "plain", None)
                if plain is None:
                    raise ExportError(f"layer {path} ({type(m).__name__}) has no plain "
                                      "counterpart for export")
                set_module(gm, path, plain(i))
        return PlainWidth(gm).eval()

    # ------------------------------------------------------------------ weights
    def load_plain_state_dict(self, state: dict[str, Tensor]) -> None:
        """Take the weights of a plain network of the trunk's architecture (its state dict, keys
        as the trunk's): every layer as that network's, each width's BatchNorm its first
        channels. Raises ``KeyError`` naming a key the state lacks."""
        p = self.source_prefix
        handled: set[str] = set()
        with torch.no_grad():
            for path, m in self.net.named_modules():
                loader = getattr(m, "load_plain", None)
                if loader is not None:
                    loader(state, f"{p}{path}.")
                    handled.add(path)
            for key, t in self.net.state_dict(keep_vars=True).items():
                owner = key.rsplit(".", 1)[0] if "." in key else ""
                if any(owner == h or owner.startswith(h + ".") for h in handled):
                    continue
                src = state.get(p + key)
                if src is None:
                    raise KeyError(f"the plain state dict has no {p + key!r}")
                t.copy_(src)
        set_width_index(self, len(self.slot_widths) - 1)

    def _trunk_loaded(self, module: nn.Module, _incompatible: Any) -> None:
        self.load_plain_state_dict(module.state_dict())


def _keep_heads(gm: fx.GraphModule, name: str) -> None:
    """Every attention layer of ``gm`` keeps its heads (:meth:`SlicedAttention.keep_heads`), or an
    :class:`OptionError` naming the one that cannot."""
    for path, m in gm.named_modules():
        if isinstance(m, SlicedAttention):
            why = m.keep_heads()
            if why is not None:
                raise OptionError(f"heads = \"kept\" slices the channels of every head; layer "
                                  f"{path} of trunk {name} cannot: {why}", key="heads")


class PlainWidth(nn.Module):
    """One width of a derived slimmable network: the traced graph with plain layers."""

    def __init__(self, graph: fx.GraphModule):
        super().__init__()
        self.graph = graph

    def forward(self, x: Tensor) -> Tensor:
        return self.graph(x)


def _propagate_shapes(gm: fx.GraphModule, in_chans: int, size: tuple[int, int], name: str) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    device = next(itertools.chain(gm.parameters(), gm.buffers()), torch.zeros(())).device
    x = torch.zeros(_PROBE_BATCH, in_chans, *size, device=device)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
    except Exception as exc:  # noqa: BLE001 - the traced graph fails to run; reported
        raise OptionError(f"trunk {name} cannot be made slimmable: its traced graph fails to run "
                          f"({type(exc).__name__}: {first_line(exc)})", key="trunk") from None
