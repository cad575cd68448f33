"""``slimmable``: any traceable convolutional network or vision transformer made slimmable for
inplace distillation.

``backbone = { name = "slimmable", trunk = { name = "timm", model = "resnet50" }, widths = [0.25,
0.5, 0.75, 1.0] }`` (any built-in plain backbone as ``trunk`` too, or ``trunk = "teacher"``, an
earlier stage of the recipe). The trunk's network is traced with ``torch.fx`` (timm's untraceable
modules and functions kept whole, as timm's own feature extraction does; convolutions,
normalisation, linear and attention layers, ``DropPath`` kept as modules; inputs of the forward
after the image, a ViT's ``attn_mask``, at their defaults) and its layers are replaced, in the
traced ``GraphModule``, by width-aware ones: the forward of every width is the traced graph's own
generated code calling them.

**What is sliced.** Width ``i`` runs every layer on the first ``k`` channels of its input and
output. Convolutions and linear layers share one weight across widths (the corner of the full one;
a depthwise or grouped convolution keeps its group width, ``groups = active channels / group
width``; timm's ``Conv2dSame`` keeps its padding computed from the input); every BatchNorm is private to its width (own affine parameters and running statistics,
timm's ``BatchNormAct2d`` with its activation); LayerNorm (channels last, or timm's
``LayerNorm2d``) and GroupNorm share their vectors, sliced (a GroupNorm keeps its group size, or its
single group); parameters used directly by the graph with a channel dimension (ConvNeXt's and
a ViT's layer scale, a ViT's position embedding, and its class, distillation and register tokens,
expanded over the batch and concatenated to the patches) are sliced with the tensor they meet. The
stem's input and the classifier's output are never sliced; the classifier's input is.

**Attention.** timm's multi-head self-attention (``timm.layers.Attention``, every ViT, DeiT and
DeiT-III block; ``EvaAttention``, EVA and EVA-02 with their rotary position embeddings, fused or
separate q, k and v) is kept whole and sliced in whole heads (:mod:`.attention`): its input and its
projection's output follow their channel groups; its heads' channels are a group of their own,
which runs the same first heads of each of q, k and v of the fused ``qkv`` projection, the head
size kept, so that a narrow width is the timm ViT of its embedding and heads holding the first
channels of the weights. A list of widths must keep whole heads (a width that cuts one is an error
naming the widths that do); a width range rounds each width down to whole heads. The MLP's hidden
units follow the ``int(C * w)`` rule: with an MLP ratio that is not a whole number (EVA-02's 8/3)
a width may keep one unit fewer than the timm model built at its embedding.

**Channel constraints.** Every tensor's channel dimension belongs to a *channel group*, the
channels that must be sliced together, found by propagating through the graph: a convolution or
linear layer starts a new group at its output; normalisation, activations, pooling, depthwise and
grouped convolutions keep their input's; tensors combined elementwise (a residual addition, a
squeeze-excitation gate multiplying its input) share one group; permutes and reshapes that keep
the channel dimension whole carry it along (a fixed channel count in a reshape becomes ``-1``); a
linear layer's output cut into equal chunks (a gated MLP's value and gate, timm's ``GluMlp``) is a
group of the chunk's size, the layer writing the first channels of each chunk. Groups joined to
the image or to the logits stay whole; so do a group of one channel (a spatial
gate broadcast over the channels) and tensors computed from no sliced channels (the image, a
reduction over the channels). A group of ``C`` channels runs ``int(C * w)`` of them at width
``w``, the rule of the hand-written slimmable backbones
(:func:`kdreg_plugins.backbones.slimmable.scale_channels`), rounded down to whole groups of a
grouped convolution or GroupNorm (at least one group); a width that leaves the smallest group no
channel is an error naming its layer and the narrowest width the trunk allows.

**Channels kept as a set of indices** (:mod:`.indices`), where the first ones cannot serve: a
concatenation along channels (DenseNet, DLA, GhostNet) is a group whose *parts* are its inputs'
groups, and at a width it keeps each part's kept channels at that part's offset; a split of
channels (a CSP stage's halves, MixNet's kernel groups) or a slice of a range of them (GhostNet's
first ``out_chs``, ReXNet's partial residual) cuts its input's group into parts, each piece
keeping its own first channels and the producer the union. Groups joined elementwise are aligned
part by part. Convolutions, linear layers and BatchNorm reading or writing such channels take
exactly those (:mod:`.indexed_layers`; the first channels stay plain slices), and the splits and
slices become width-aware pieces. With a width range, every drawn or evaluated width computes
its own sets, and such a BatchNorm is one :class:`~.indexed_layers.IndexedRangeNorm`. timm's
``ConvMlp`` (VGG's head, kept whole) has its two convolutions sliced inside it.

**Refused.** A network whose channels cannot be sliced consistently is refused when built, with
the layer and the reason: a grouped convolution (beyond depthwise), a LayerNorm, GroupNorm,
attention or parameter over channels kept as a set of indices, strided slices or single channels
picked by index, reshapes that
mix channels with other dimensions (channel shuffle, Swin's window attention), matrix products of
activations (attention other than timm's ``Attention`` and ``EvaAttention``), an attention layer
with a forward of its own or q/k norms other than a LayerNorm or RmsNorm over one head, functional
convolutions or linear maps with their own weights, layers with weights of a kind it does not
know, and padding of channels.

**Counts, split points, export.** Parameters per width are the slimmable layers' own counts
(:func:`~kdreg_plugins.backbones.slimmable.count_params_at`), MACs the engine's counter on each
width's forward; at width 1.0 both equal the trunk's. The split points are the trunk's (timm's
``feature_info`` stages, a built-in backbone's stages) where the traced graph can be cut (nothing
later reads an earlier activation), the others listed in ``rejected_points``; :meth:`DerivedSlimmable.forward_segment` runs the
full width, or width ``index``. :meth:`DerivedSlimmable.export_submodel` is one width as the traced
graph calling plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` (that width's own) / ``nn.Linear`` /
``Attention`` or ``EvaAttention`` (that width's heads) layers that hold only its channels.

**Weights.** The slimmable model starts from the trunk's weights: width 1.0 computes what the
trunk computes, a narrow width uses their first channels (and the slice of each BatchNorm).
:meth:`DerivedSlimmable.load_plain_state_dict` takes the weights of a plain network of the trunk's
architecture again; a trunk's own later ``load_state_dict`` (the engine loading an earlier stage's
trained weights into ``trunk = "teacher"``) reaches the slimmable model the same way.

**Modules.** :mod:`.tracing` traces the trunk; :mod:`.nodes` reads traced nodes (shapes,
operands, reshapes); :mod:`.channels` finds the channel groups and what is refused;
:mod:`.indices` the parts of concatenated and split channels; :mod:`.layers` holds the sliced
layers, :mod:`.indexed_layers` those taking a set of indices, :mod:`.attention` timm's attention
sliced in whole heads,
and :mod:`.convert` swaps them into the graph; :mod:`.segments` cuts the graph at split points;
:mod:`.model` is :class:`DerivedSlimmable`.

**Training mode.** Functions the network calls with ``training=self.training`` (timm's dropout
before the classifier) read the model's mode when they run; any other Python-level decision a
network takes on ``self.training`` outside the modules kept whole is taken once, in eval mode, when
it is traced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kdreg.backbone import FlexibleBackbone
from kdreg.options import StageRef
from kdreg_plugins.backbones.slimmable import DEFAULT_WIDTHS
from kdreg_plugins.backbones.slimmable_derived.layers import TensorHolder
from kdreg_plugins.backbones.slimmable_derived.model import DerivedSlimmable, PlainWidth

__all__ = ["DerivedSlimmable", "PlainWidth", "TensorHolder", "build_slimmable", "register"]


def register(register: Any) -> None:
    register(
        "slimmable",
        build_slimmable,
        description="any traceable CNN or ViT (timm or built-in) made slimmable: widths, a BN per "
                    "width",
    )


def build_slimmable(
    *,
    num_classes: int,
    in_chans: int,
    input_size: tuple[int, int],
    trunk: StageRef | dict | FlexibleBackbone,
    widths: Sequence[float] | Mapping[str, Any] = DEFAULT_WIDTHS,
    isolated: bool = False,
    heads: str = "sliced",
) -> DerivedSlimmable:
    """Make ``trunk`` (a backbone table, an earlier stage's name or a backbone) slimmable at
    ``widths`` (in (0, 1], increasing): its convolutions, normalisation and linear layers sliced
    to the first channels, a private BatchNorm per width. ``widths = { min, max, sampled, eval }``
    makes it universally slimmable (US-Nets): any width in the range, one BatchNorm per layer
    with calibrated statistics per evaluated width; ``widths = { set = [...], sampled, eval }``
    trains a discrete set by the same sandwich rule (Scala). ``isolated``: Scala's isolated
    activation, the smallest width takes the LAST channels of every layer (networks without
    BatchNorm). ``heads = "kept"``: every width keeps all attention heads, each sliced to its
    first channels (Scala's slicing), instead of whole heads."""
    from kdreg_plugins.backbones.exits import _trunk

    net, name = _trunk(trunk, num_classes=num_classes, in_chans=in_chans, input_size=input_size)
    return DerivedSlimmable(net, widths, name=name, in_chans=in_chans, input_size=input_size,
                            isolated=isolated, heads=heads)

