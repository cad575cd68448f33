"""``slimmable`` over CNN families that concatenate, split or slice channels: a width keeps a
set of channel indices where its first channels cannot serve
(plugins/backbones/slimmable_derived/indices.py, indexed_layers.py)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from timm.models import cspnet, densenet, dla, efficientnet, ghostnet, vgg
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from torch import Tensor, nn

import kdreg
from kdreg.backbone import FlexibleBackbone
from kdreg.calibrate import calibrate
from kdreg.engine.step import LossSettings, backward
from kdreg.errors import OptionError
from kdreg_plugins.backbones.slimmable import (
    RangeBatchNorm2d,
    SlimmableMixin,
    SwitchableBatchNorm2d,
)
from kdreg_plugins.backbones.slimmable_derived import DerivedSlimmable
from kdreg_plugins.backbones.slimmable_derived.indexed_layers import (
    ChannelPieces,
    IndexedConv2d,
    IndexedNorm,
    IndexedRangeNorm,
)
from kdreg_plugins.backbones.slimmable_derived.layers import DerivedConv2d, SwitchableNorm
from kdreg_plugins.backbones.timm_adapter import TimmBackbone

C = 5
SIZE = (32, 32)
WIDTHS = (0.25, 0.5, 0.75, 1.0)

pytestmark = pytest.mark.usefixtures("one_thread")


def _dla(scale: float = 1.0) -> nn.Module:
    """dla34's DLA (its DlaBasic blocks and tree roots), one tree fewer, channels / 4."""
    channels = [max(1, int(c * scale)) for c in (4, 8, 16, 32, 64, 128)]
    return dla.DLA(levels=(1, 1, 1, 2, 1, 1), channels=channels, block=dla.DlaBasic,
                   num_classes=C)


def _cspresnet() -> nn.Module:
    """cspresnet50's CspNet (cross stages, each splitting its channels in two), one block a
    stage, channels / 8."""
    cfg = cspnet.model_cfgs["cspresnet50"]
    cfg = dataclasses.replace(cfg, stem=dataclasses.replace(cfg.stem, out_chs=8),
                              stages=dataclasses.replace(cfg.stages, depth=(1, 1, 1, 1),
                                                         out_chs=(16, 32, 64, 128)))
    return cspnet.CspNet(cfg, num_classes=C)


def _mixnet() -> nn.Module:
    """mixnet_s's blocks: depthwise kernels 3, 5 and 7 over 40 channels split 14 + 13 + 13, and
    pointwise convolutions over their input split in two (the channel counts as written)."""
    arch = [["ds_r1_k3_s1_e1_c8"],
            ["ir_r1_k3.5.7_s2_e5_c16_se0.5_nsw", "ir_r1_k3.5_a1.1_p1.1_s1_e3_c16_se0.5_nsw"]]
    return efficientnet.EfficientNet(block_args=decode_arch_def(arch), num_features=64,
                                     stem_size=8, num_classes=C,
                                     round_chs_fn=partial(round_channels, multiplier=0))


def _ghostnet() -> nn.Module:
    """ghostnet_100's GhostNet (ghost modules concatenating a convolution's channels with their
    cheap depthwise copies, cut to the output's count), 6 of its blocks, width 0.5."""
    cfgs = [[[3, 16, 16, 0, 1]], [[3, 48, 24, 0, 2]], [[3, 72, 24, 0, 1]],
            [[5, 72, 40, 0.25, 2]], [[3, 240, 80, 0, 2]], [[5, 672, 160, 0.25, 2]]]
    return ghostnet.GhostNet(cfgs, num_classes=C, width=0.5)


#: family -> (the timm model, how the test builds it, the builder)
FAMILIES: dict[str, tuple[str, str, Callable[[], nn.Module]]] = {
    "densenet": ("densenet121", "its DenseNet, blocks of 2 + 2 layers of growth 8",
                 lambda: densenet.DenseNet(growth_rate=8, block_config=(2, 2), num_classes=C)),
    "dla": ("dla34", "its DLA, levels 1-1-1-2-1-1, channels / 4", _dla),
    "cspresnet": ("cspresnet50", "its CspNet, one block a stage, channels / 8", _cspresnet),
    "mixnet": ("mixnet_s", "2 of its blocks, kernels 3-5-7 and split pointwise convs", _mixnet),
    "ghostnet": ("ghostnet_100", "its GhostNet, 6 of its blocks, width 0.5", _ghostnet),
    "rexnet": ("rexnet_100", "`width_mult = 0.5, depth_mult = 0.34`",
               lambda: timm.create_model("rexnet_100", num_classes=C, width_mult=0.5,
                                         depth_mult=0.34)),
    "vgg": ("vgg11", "its VGG, channels / 8, ConvMlp head of 32 hidden channels",
            lambda: vgg.VGG([8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"],
                            num_classes=C, mlp_ratio=1 / 128)),
}


def family_rows() -> str:
    """This file's rows of the README's family table."""
    def made(family: str) -> str:
        return ("its ConvMlp head's convolutions sliced" if family == "vgg" else
                "channels kept as a set of indices")

    return "\n".join(f"| {family} | `{model}`: {how} (`test_slimmable_concat.py`) | yes: "
                     f"{made(family)}; every width trained one IPKD-TA-M step |"
                     for family, (model, how, _) in FAMILIES.items())


def trunk_of(family: str) -> TimmBackbone:
    """The family's network (seeded), its norms' entries and statistics each their own."""
    torch.manual_seed(0)
    net = FAMILIES[family][2]()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.5, 0.5)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return TimmBackbone(net, model_name=FAMILIES[family][0], in_chans=3, input_size=SIZE).eval()


def batch(n: int = 2) -> Tensor:
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(0))


def switched_off(model: DerivedSlimmable, trunk: FlexibleBackbone, index: int) -> nn.Module:
    """The trunk's network with every channel that evaluated width ``index`` does not keep
    switched off (its convolution's rows and its BatchNorm's affine entries zero), each kept
    BatchNorm channel holding the width's own statistics: in eval mode, the width's logits."""
    net = copy.deepcopy(trunk.net if isinstance(trunk, TimmBackbone) else trunk).eval()
    slot = model.eval_slot(index)
    with torch.no_grad():
        for path, m in model.net.named_modules():
            if isinstance(m, DerivedConv2d):
                picks = m.picks_out.indices[slot] if isinstance(m, IndexedConv2d) else None
                kept, full = picks or range(m.out_list[slot]), net.get_submodule(path)
                off = torch.ones(m.out_channels, dtype=torch.bool)
                off[list(kept)] = False
                full.weight[off] = 0
                if full.bias is not None:
                    full.bias[off] = 0
            elif isinstance(m, (SwitchableNorm, RangeBatchNorm2d)):
                own = m.plain(slot)  # the width's own BatchNorm
                picks = (m.indices[slot] if isinstance(m, IndexedNorm) else
                         m.picks.indices[slot] if isinstance(m, IndexedRangeNorm) else None)
                kept = list(picks or range(own.num_features))
                full = net.get_submodule(path)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(full, name)
                    if name in ("weight", "bias"):
                        t.zero_()
                    t[kept] = getattr(own, name)
    return net


# ------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_width_is_the_trunk_and_a_narrow_width_is_its_exported_plain_network(
        family: str) -> None:
    trunk = trunk_of(family)
    model = DerivedSlimmable(trunk, WIDTHS, name=family, input_size=SIZE).eval()
    if family == "vgg":  # the ConvMlp head's convolutions sliced inside it
        assert isinstance(model.net.get_submodule("pre_logits.fc1"), DerivedConv2d)
    else:
        assert any(isinstance(m, (IndexedConv2d, ChannelPieces)) for m in model.modules())
    params = model.count_params()
    assert params[-1] == sum(p.numel() for p in trunk.parameters())
    assert params == sorted(params) and len(set(params)) == 4
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_submodel(x, 3), trunk(x)[0], rtol=0, atol=0)
    for index in (0, 1):
        with torch.no_grad():  # the trunk computes the width with the other channels off
            torch.testing.assert_close(model.forward_submodel(x, index),
                                       switched_off(model, trunk, index)(x))
        plain = model.export_submodel(index)
        assert not any(isinstance(m, SlimmableMixin) for m in plain.modules())
        assert sum(p.numel() for p in plain.parameters()) == params[index]
        for train in (False, True):  # the width's own running statistics, then batch ones
            model.train(train)
            plain.train(train)
            with torch.no_grad():  # the same dropout masks (the heads' dropout)
                torch.manual_seed(1)
                got = model.forward_submodel(x, index)
                torch.manual_seed(1)
                torch.testing.assert_close(got, plain(x))
        model.eval()


@pytest.mark.parametrize(("family", "plain_of"), [
    ("densenet", lambda w: densenet.DenseNet(growth_rate=int(8 * w), block_config=(2, 2),
                                             num_classes=C)),
    ("dla", lambda w: _dla(w))])
def test_a_narrow_densenet_or_dla_is_the_plain_timm_network_of_its_channels(
        family: str, plain_of: Callable[[float], nn.Module]) -> None:
    """Every concatenation of a narrow width keeps each part's first channels at the part's
    offset: the plain network of the narrow channels, holding the kept weights, computes it."""
    model = DerivedSlimmable(trunk_of(family), WIDTHS, name=family, input_size=SIZE).eval()
    x = batch()
    for index, width in ((0, 0.25), (1, 0.5)):
        plain = plain_of(width).eval()
        plain.load_state_dict(model.export_submodel(index).graph.state_dict())  # strict
        assert sum(p.numel() for p in plain.parameters()) == model.count_params()[index]
        with torch.no_grad():
            torch.testing.assert_close(model.forward_submodel(x, index), plain(x))
    if family == "densenet":  # layer 2 reads the stem's 16 channels and layer 1's 8
        path = "features.denseblock1.denselayer2"
        norm, conv = (model.net.get_submodule(f"{path}.{n}") for n in ("norm1", "conv1"))
        assert isinstance(norm, IndexedNorm) and isinstance(conv, IndexedConv2d)
        kept = (*range(8), *range(16, 20))
        assert norm.indices[1] == conv.picks_in.indices[1] == kept
        assert norm.indices[3] is None  # all of them: the first ones
        trunk = trunk_of(family).net.get_submodule(path)
        exported = model.export_submodel(1).graph.get_submodule(path)
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(exported.norm1, name),
                               getattr(trunk.norm1, name)[list(kept)]), name
        assert torch.equal(exported.conv1.weight, trunk.conv1.weight[:16][:, list(kept)])


@pytest.mark.parametrize("family", ["densenet", "cspresnet"])
def test_another_networks_weights_reach_every_width_at_its_kept_channels(family: str) -> None:
    """``load_plain_state_dict`` fills each width's BatchNorm and weights from the kept
    channels: a model built from other weights, given the trunk's, is the model of the trunk."""
    trunk = trunk_of(family)
    model = DerivedSlimmable(trunk, WIDTHS, name=family, input_size=SIZE).eval()
    torch.manual_seed(3)
    other = TimmBackbone(FAMILIES[family][2](), model_name=family, in_chans=3, input_size=SIZE)
    again = DerivedSlimmable(other, WIDTHS, name=family, input_size=SIZE).eval()
    again.load_plain_state_dict(trunk.state_dict())
    x = batch()
    with torch.no_grad():
        for index in range(4):
            torch.testing.assert_close(again.forward_submodel(x, index),
                                       model.forward_submodel(x, index), rtol=0, atol=0)


class _ChunkedTrunk(FlexibleBackbone):
    """A convolution's output chunked in two, one half gating the other."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(8, C)

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        a, b = self.conv(x).chunk(2, dim=1)
        return [self.fc((a * b.sigmoid()).mean((2, 3)))]


def test_each_chunk_of_a_split_keeps_its_own_first_channels() -> None:
    torch.manual_seed(0)
    trunk = _ChunkedTrunk()
    model = DerivedSlimmable(trunk, WIDTHS, name="chunked", input_size=SIZE).eval()
    conv = model.net.get_submodule("conv")
    assert isinstance(conv, IndexedConv2d)
    assert model.layer_channels("conv")[1] == (4, 8, 12, 16)
    assert conv.picks_out.indices[1] == (0, 1, 2, 3, 8, 9, 10, 11)
    x = batch()
    rows = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])
    h = nn.functional.conv2d(x, trunk.conv.weight[rows], trunk.conv.bias[rows], padding=1)
    a, b = h[:, :4], h[:, 4:]
    want = nn.functional.linear((a * b.sigmoid()).mean((2, 3)), trunk.fc.weight[:, :4],
                                trunk.fc.bias)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_submodel(x, 1), want)


class _AlignedTrunk(FlexibleBackbone):
    """A convolution's output split into 8 + 3 channels, the 3 read by their own convolution,
    and added to a concatenation of 8 channels with the image's 3 (never sliced)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 11, 3, padding=1)
        self.q = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(15, C)

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        b = self.b(x)
        _, q = b.split([8, 3], 1)
        h = torch.cat([self.a(x), x], 1) + b
        return [self.fc(torch.cat([h, self.q(q)], 1).mean((2, 3)))]


def test_channels_joined_elementwise_are_aligned_part_by_part() -> None:
    """The split's second piece meets the image's channels: kept whole at every width, as its
    convolution's last 3 output channels."""
    torch.manual_seed(0)
    trunk = _AlignedTrunk().eval()
    model = DerivedSlimmable(trunk, WIDTHS, name="aligned", input_size=SIZE).eval()
    assert model.layer_channels("q")[0] == (3, 3, 3, 3)
    b = model.net.get_submodule("b")
    assert isinstance(b, IndexedConv2d) and b.picks_out.indices[0] == (0, 1, 8, 9, 10)
    x = batch()
    with torch.no_grad():
        for index in range(3):
            torch.testing.assert_close(model.forward_submodel(x, index),
                                       switched_off(model, trunk, index)(x)[0])


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_width_trains_one_ipkd_ta_m_step(family: str) -> None:
    trunk = trunk_of(family)
    model = DerivedSlimmable(trunk, WIDTHS, name=family, input_size=SIZE)
    macs = model.count_macs()
    assert macs == sorted(macs) and len(set(macs)) == 4 and macs[-1] == trunk.count_macs()[0]
    graph = kdreg.get_teacher_graph("ipkd-ta-m", model.num_submodels)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    out = backward(model, batch(4), torch.tensor([0, 1, 2, 3]),
                   LossSettings(graph, lam=0.8, tau=1.0, divergence="ce"))
    assert torch.isfinite(out.loss)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    indexed = [n for n, m in model.named_modules() if isinstance(m, IndexedConv2d)]
    assert all(f"{n}.weight" in changed for n in indexed)  # the index sets' weights trained
    norms = [n for n, m in model.named_modules() if isinstance(m, SwitchableBatchNorm2d)]
    assert bool(norms) == (family != "vgg")  # vgg11 has no BatchNorm
    for i in range(4 if norms else 0):  # every width ran and trained its own BatchNorm
        assert any(n.startswith(f"{name}.bn.{i}.") for n in changed for name in norms), i


@pytest.mark.parametrize("family", ["densenet", "cspresnet"])
def test_a_width_range_trains_and_evaluates_channels_kept_as_indices(family: str) -> None:
    """Universally slimmable (US-Nets): the step's drawn widths and the evaluated ones each
    keep their own index sets; one BatchNorm per layer, its evaluated widths' statistics
    calibrated at their kept channels."""
    trunk = trunk_of(family)
    model = DerivedSlimmable(trunk, {"min": 0.25, "max": 1.0, "sampled": 1,
                                     "eval": [0.25, 0.6, 1.0]}, name=family, input_size=SIZE)
    norms = [m for m in model.modules() if isinstance(m, IndexedRangeNorm)]
    assert norms and not any(isinstance(m, SwitchableBatchNorm2d) for m in model.modules())
    model.train()
    model.begin_step(3)
    sum(out.square().mean() for out in model(batch(4))).backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in norms)
    calibrate(model, [(torch.rand(8, 3, *SIZE, generator=torch.Generator().manual_seed(1)),)], 8)
    model.eval()
    if family == "densenet":  # at 0.6: int(16 x 0.6) = 9 of the stem's, int(8 x 0.6) = 4
        norm = model.net.get_submodule("features.denseblock1.denselayer2.norm1")
        assert isinstance(norm, IndexedRangeNorm)
        assert norm.picks.indices[model.eval_slot(1)] == (*range(9), *range(16, 20))
    x = batch()
    for index in range(3):
        plain = model.export_submodel(index)
        assert sum(p.numel() for p in plain.parameters()) == model.count_params()[index]
        with torch.no_grad():
            got = model.forward_submodel(x, index)
            torch.testing.assert_close(got, switched_off(model, trunk, index)(x))
            torch.testing.assert_close(got, plain(x))


# ------------------------------------------------------------------------------ refusals


class _GroupedOverConcat(FlexibleBackbone):
    """A grouped convolution (groups of 4 channels) over a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.fc = nn.Linear(16, C)

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        return [self.fc(self.grouped(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))]


def test_a_grouped_convolution_over_concatenated_channels_is_refused_naming_it() -> None:
    with pytest.raises(OptionError) as err:
        DerivedSlimmable(_GroupedOverConcat(), WIDTHS, name="grouped", input_size=SIZE)
    assert str(err.value) == (
        "trunk grouped cannot be made slimmable: layer grouped (Conv2d) takes channels kept as "
        "a set of indices (parts of a concatenation or a split), which only convolutions, "
        "linear layers and BatchNorm take")


# ------------------------------------------------------------------------------ the README
def test_the_readme_family_table_has_this_tests_families_after_the_other_cnns() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = family_rows()
    assert rows in readme, "README's family table lacks:\n" + rows
    after = readme[readme.index(rows) + len(rows):].lstrip("\n").split("\n", 1)[0]
    assert after.startswith("| vit |")  # the transformers' rows follow
