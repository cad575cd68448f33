"""``slimmable`` over timm vision transformers (ViT, DeiT, DeiT-III, EVA-02): widths slice the
embedding, every token, whole heads of each of q, k and v, the MLP, every LayerNorm and layer scale
(plugins/backbones/slimmable_derived/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from timm.layers import Attention, GluMlp
from timm.models.eva import EvaAttention
from torch import Tensor, nn

import kdreg
from kdreg.backbone import FlexibleBackbone
from kdreg.engine.step import LossSettings, backward
from kdreg.errors import OptionError, RecipeError
from kdreg.export import Normalised, standalone, to_program
from kdreg.measure import count_macs
from kdreg_plugins.backbones.slimmable import SlimmableMixin
from kdreg_plugins.backbones.slimmable_derived import DerivedSlimmable
from kdreg_plugins.backbones.slimmable_derived.attention import SlicedAttention
from kdreg_plugins.backbones.timm_adapter import TimmBackbone, build_timm

C = 5
SIZE = (32, 32)
WIDTHS = (0.25, 0.5, 0.75, 1.0)
#: 4 heads of 16 channels: every width of WIDTHS keeps whole heads
SMALL = {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 4}

pytestmark = pytest.mark.usefixtures("one_thread")

#: name -> (timm model, its options besides SMALL): the transformers the slicer must follow
VITS: dict[str, tuple[str, dict[str, Any]]] = {
    # a class token, a position embedding over it, a classifier on the class token
    "vit": ("vit_tiny_patch16_224", {}),
    # class and distillation tokens, two classifiers averaged
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {}),
    # 4 register tokens, position embedding of the patches only, layer scale
    "dinov2-registers": ("vit_small_patch14_reg4_dinov2", {}),
    # no class token, average pooling and its LayerNorm, q/k norms, the heads' norm, MLP norm
    "gap-qk-norm": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg",
                                             "qk_norm": True, "qkv_bias": False,
                                             "scale_attn_norm": True, "scale_mlp_norm": True}),
    # EVA-02: fused q, k, v with q and v biases, rotary position embedding, SwiGLU MLP with its
    # norm, layer scale as parameters of the block
    "eva02": ("eva02_tiny_patch14_224", {"mlp_ratio": 4, "scale_mlp": True, "init_values": 0.5}),
    # EVA-02 tiny's own MLP (GluMlp): one fc1 whose output is chunked into value and gate
    "eva02-glu": ("eva02_tiny_patch14_224", {"mlp_ratio": 4}),
    # EVA-02 with q, k and v projected apart (as eva02_base)
    "eva02-separate-qkv": ("eva02_tiny_patch14_224", {"mlp_ratio": 4, "scale_mlp": True,
                                                      "qkv_fused": False}),
}


def scrambled_trunk(model: str, seed: int = 0, **options: Any) -> TimmBackbone:
    """A timm backbone with every parameter drawn at random (timm's initial class token and
    layer scale are near zero, which would hide a token or branch sliced wrong)."""
    trunk = build_timm(num_classes=C, in_chans=3, input_size=SIZE, model=model,
                       model_options={**SMALL, **options})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trunk.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return trunk.eval()


_CACHE: dict[str, tuple[TimmBackbone, DerivedSlimmable]] = {}


def vit(name: str) -> tuple[TimmBackbone, DerivedSlimmable]:
    """The scrambled trunk of ``VITS[name]`` and the slimmable model made of it, built once."""
    if name not in _CACHE:
        model, options = VITS[name]
        trunk = scrambled_trunk(model, **options)
        _CACHE[name] = trunk, DerivedSlimmable(trunk, WIDTHS, name=model, input_size=SIZE).eval()
    return _CACHE[name]


def batch(n: int = 2) -> Tensor:
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(1))


def sliced_state(full: dict[str, Tensor], plain: nn.Module) -> dict[str, Tensor]:
    """``full``'s weights cut to the shapes of ``plain``'s: the first entries of every dimension,
    and of each of q, k and v of a fused ``qkv`` projection and of the value and gate of a
    ``GluMlp``'s ``fc1``."""
    glu = {f"{path}.fc1." for path, m in plain.named_modules() if isinstance(m, GluMlp)}
    out = {}
    for key, t in plain.state_dict().items():
        src, shape = full[key], tuple(t.shape)
        n = 3 if ".attn.qkv." in key else 2 if key.rsplit(".", 1)[0] + "." in glu else 1
        if n > 1:  # stacked chunks: the first rows of each
            src = src.reshape(n, src.shape[0] // n, *src.shape[1:])
            shape = (n, shape[0] // n, *shape[1:])
        out[key] = src[tuple(slice(0, k) for k in shape)].reshape(t.shape)
    return out


def plain_vit(name: str, width: float) -> nn.Module:
    """The timm model of ``VITS[name]`` built at ``width`` of its embedding and heads, holding the
    trunk's weights cut to its shape."""
    model, options = VITS[name]
    trunk, _ = vit(name)
    dim, heads = int(SMALL["embed_dim"] * width), int(SMALL["num_heads"] * width)
    plain = timm.create_model(model, pretrained=False, num_classes=C, img_size=SIZE,
                              **{**SMALL, **options, "embed_dim": dim, "num_heads": heads})
    plain.load_state_dict(sliced_state(trunk.net.state_dict(), plain))
    return plain.eval()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("name", list(VITS))
def test_full_width_is_the_trunk_and_takes_another_networks_weights(name: str) -> None:
    trunk, model = vit(name)
    x = batch()
    with torch.no_grad():
        assert torch.equal(model.forward_submodel(x, 3), trunk.net(x))
    assert model.count_params()[3] == n_params(trunk.net)
    assert model.count_macs()[3] == trunk.count_macs()[0]
    other = scrambled_trunk(VITS[name][0], **VITS[name][1], seed=7).net
    try:  # every sliced layer, token and head takes the other network's weights
        model.load_plain_state_dict({f"net.{k}": v for k, v in other.state_dict().items()})
        with torch.no_grad():
            assert torch.equal(model.forward_submodel(x, 3), other(x))
    finally:
        model.load_plain_state_dict({f"net.{k}": v for k, v in trunk.net.state_dict().items()})


@pytest.mark.parametrize("name", list(VITS))
def test_each_width_is_the_plain_timm_vit_of_its_shape_and_exports_as_it(name: str) -> None:
    _, model = vit(name)
    x = batch()
    for index, width in enumerate(WIDTHS):
        plain = plain_vit(name, width)
        with torch.no_grad():
            expected = plain(x)
            torch.testing.assert_close(model.forward_submodel(x, index), expected,
                                       rtol=1e-5, atol=1e-5)
            exported = model.export_submodel(index)
            torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-5)
        assert model.count_params()[index] == n_params(plain) == n_params(exported), width
        assert not any(isinstance(m, SlimmableMixin) for m in exported.modules())
        heads = [m.num_heads for m in exported.modules() if isinstance(m, (Attention, EvaAttention))]
        assert heads == [int(SMALL["num_heads"] * width)] * SMALL["depth"]


def test_attention_computed_without_the_fused_kernel_is_sliced_as_well() -> None:
    trunk = scrambled_trunk("vit_tiny_patch16_224")
    for m in trunk.net.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
    model = DerivedSlimmable(trunk, WIDTHS, name="vit", input_size=SIZE).eval()
    x = batch()
    with torch.no_grad():
        assert torch.equal(model.forward_submodel(x, 3), trunk.net(x))
        torch.testing.assert_close(model.forward_submodel(x, 1), plain_vit("vit", 0.5)(x),
                                   rtol=1e-5, atol=1e-5)


def test_a_width_exports_as_a_program_of_its_parameters_and_macs() -> None:
    _, model = vit("dinov2-registers")
    index, mean, std = 1, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    net = standalone(model, index, mean, std)  # checked to reproduce the width's logits
    assert n_params(net) == model.count_params()[index]
    assert count_macs(lambda: net(torch.zeros(1, 3, *SIZE))) == model.count_macs()[index]
    program = to_program(Normalised(net, mean, std).eval(), (3, *SIZE))
    x = torch.rand(3, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), Normalised(net, mean, std)(x))


def test_widths_short_of_the_full_width_keep_all_of_the_trunks_weights() -> None:
    trunk = scrambled_trunk("vit_tiny_patch16_224")
    model = DerivedSlimmable(trunk, (0.25, 0.5), name="vit", input_size=SIZE).eval()
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_submodel(x, 1), plain_vit("vit", 0.5)(x),
                                   rtol=1e-5, atol=1e-5)


def test_heads_are_whole_in_each_of_q_k_and_v() -> None:
    _, model = vit("vit")
    attn = model.net.get_submodule("blocks.0.attn")
    assert isinstance(attn, SlicedAttention)
    assert attn.dims == (16, 32, 48, 64) and attn.in_list == attn.out_list == (16, 32, 48, 64)
    weight, _ = attn._qkv(32, 32)
    full = attn.qkv.weight
    for chunk in range(3):  # q, k, v: the first two heads' rows of each
        assert torch.equal(weight[32 * chunk:32 * (chunk + 1)], full[64 * chunk:64 * chunk + 32, :32])


def test_split_points_are_the_blocks_and_give_each_widths_tokens() -> None:
    _, model = vit("dinov2-registers")
    assert model.split_points() == ("blocks.0", "blocks.1")
    feats, logits = model.forward_features(batch(), 1, ["blocks.0"])
    assert feats[0].shape == (2, 5 + 16, 32)  # class and 4 register tokens, 16 patches
    torch.testing.assert_close(logits, model.forward_submodel(batch(), 1))


def test_a_width_range_rounds_each_width_down_to_whole_heads() -> None:
    trunk = scrambled_trunk("vit_tiny_patch16_224")
    model = DerivedSlimmable(trunk, {"min": 0.25, "max": 1.0, "sampled": 1, "eval": [0.25, 0.6, 1.0]},
                             name="vit", input_size=SIZE).eval()
    attn = model.net.get_submodule("blocks.0.attn")
    assert isinstance(attn, SlicedAttention)
    slot = model.eval_slot(1)
    assert (attn.in_list[slot], attn.dims[slot]) == (38, 32)  # int(64 x 0.6) channels, 2 heads
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.export_submodel(1)(x), model.forward_submodel(x, 1),
                                   rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ refusals
def test_a_width_that_cuts_a_head_is_refused_naming_the_widths_that_keep_whole_heads() -> None:
    with pytest.raises(RecipeError) as err:
        kdreg.build_backbone("slimmable", num_classes=C, input_size=SIZE, widths=[0.25, 1.0],
                             trunk={"name": "timm", "model": "vit_tiny_patch16_224",
                                    "model_options": {**SMALL, "embed_dim": 96, "num_heads": 6}})
    assert err.value.problems == [
        "width 0.25 cuts an attention head of layer blocks.0.attn of trunk timm "
        "vit_tiny_patch16_224 (int(96 x 0.25) = 24 channels, heads of 16); the widths that keep "
        "whole heads are 0.1667, 0.3334, 0.5, 0.6667, 0.8334, 1 @ backbone.widths"]


def test_the_widths_named_as_keeping_whole_heads_do() -> None:
    trunk = scrambled_trunk("vit_tiny_patch16_224", embed_dim=96, num_heads=6)
    model = DerivedSlimmable(trunk, (0.1667, 0.3334, 0.5, 0.6667, 0.8334, 1.0), name="vit",
                             input_size=SIZE)
    attn = model.net.get_submodule("blocks.1.attn")
    assert isinstance(attn, SlicedAttention)
    assert [d // attn.head_dim for d in attn.dims] == [1, 2, 3, 4, 5, 6]


class OwnAttention(Attention):
    """An attention layer with a forward of its own: the slicer cannot know what it computes."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        return super().forward(x, attn_mask, is_causal) * 2


def _refusal(trunk: TimmBackbone) -> str:
    with pytest.raises(OptionError) as err:
        DerivedSlimmable(trunk, WIDTHS, name="vit", input_size=SIZE)
    assert err.value.key == "trunk"
    return str(err.value)


def test_attention_with_a_forward_of_its_own_is_refused_naming_the_layer() -> None:
    trunk = build_timm(num_classes=C, in_chans=3, input_size=SIZE, model="vit_tiny_patch16_224",
                       model_options={**SMALL, "attn_layer": OwnAttention})
    assert _refusal(trunk) == ("trunk vit cannot be made slimmable: layer blocks.0.attn "
                               "(OwnAttention) is an attention layer with a forward of its own")


def test_a_query_norm_that_mixes_heads_is_refused_naming_the_layer() -> None:
    trunk = build_timm(num_classes=C, in_chans=3, input_size=SIZE, model="vit_tiny_patch16_224",
                       model_options=SMALL)
    trunk.net.blocks[1].attn.q_norm = nn.Softmax(dim=1)  # over the heads
    assert _refusal(trunk) == (
        "trunk vit cannot be made slimmable: layer blocks.1.attn normalises its heads with q_norm "
        "(Softmax), which is not a LayerNorm or RmsNorm over one head")


#: transformer -> (timm model, its options, the layer named in the refusal, the reason given)
REFUSED: dict[str, tuple[str, dict[str, Any], str, str]] = {
    # window attention over heads and channels reshaped together
    "swin": ("swin_tiny_patch4_window7_224",
             {"depths": (1, 1), "embed_dim": 32, "num_heads": (2, 4), "window_size": 4,
              "patch_size": 2},
             "layers.0.blocks.0.attn", "reshapes channels together with other dimensions"),
}


@pytest.mark.parametrize("family", list(REFUSED))
def test_other_transformer_blocks_are_refused_naming_the_layer(family: str) -> None:
    model, options, layer, reason = REFUSED[family]
    trunk = build_timm(num_classes=C, in_chans=3, input_size=SIZE, model=model,
                       model_options=options)
    message = _refusal(trunk)
    assert message.startswith(f"trunk vit cannot be made slimmable: layer {layer} {reason}")
    assert "\n" not in message


class _ChunkedTrunk(FlexibleBackbone):
    """A convolution's output split into its even and odd channels (ranges of channels are
    sliced, tests/test_slimmable_concat.py; strided ones are not)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(8, C)

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        h = self.conv(x)
        a, b = h[:, ::2], h[:, 1::2]
        return [self.fc((a * b.sigmoid()).mean((2, 3)))]


def test_a_split_of_channels_other_than_into_ranges_is_refused() -> None:
    with pytest.raises(OptionError) as err:
        DerivedSlimmable(_ChunkedTrunk(), WIDTHS, name="chunked", input_size=SIZE)
    assert str(err.value) == ("trunk chunked cannot be made slimmable: layer getitem slices "
                              "channels with step 2 (only a range of channels is sliced)")


def test_a_gated_mlp_writes_the_first_channels_of_each_chunk() -> None:
    _, model = vit("eva02-glu")
    fc1 = model.net.get_submodule("blocks.0.mlp.fc1")
    assert fc1.chunks == 2 and fc1.out_list == (64, 128, 192, 256)
    assert model.layer_channels("blocks.0.mlp.fc1") == ((16, 32, 48, 64), (128, 256, 384, 512))
    weight, _ = fc1._rows(64, 16)
    assert torch.equal(weight, torch.cat([fc1.weight[:64, :16], fc1.weight[256:320, :16]]))


# ------------------------------------------------------------------------------ training
def test_a_slimmable_vit_trains_one_ipkd_ta_m_step() -> None:
    torch.manual_seed(0)
    model = kdreg.build_backbone("slimmable", num_classes=C, input_size=SIZE, widths=list(WIDTHS),
                                 trunk={"name": "timm", "model": "deit_tiny_distilled_patch16_224",
                                        "model_options": SMALL})
    assert isinstance(model, DerivedSlimmable)
    params, macs = model.count_params(), model.count_macs()
    assert params == sorted(params) and len(set(params)) == 4
    assert macs == sorted(macs) and len(set(macs)) == 4
    graph = kdreg.get_teacher_graph("ipkd-ta-m", model.num_submodels)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    out = backward(model, batch(4), torch.tensor([0, 1, 2, 3]),
                   LossSettings(graph, lam=0.8, tau=1.0, divergence="ce"))
    assert torch.isfinite(out.loss)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p)]
    assert unchanged == []  # every token, head, norm and classifier took part


# ------------------------------------------------------------------------------ the README
#: family -> the entry of VITS made slimmable, and what the tests above check of it
MADE = {"vit": "vit", "deit-distilled": "deit-distilled", "vit-registers": "dinov2-registers",
        "eva02 (SwiGLU MLP of ratio 4)": "eva02", "eva02 (GluMlp of ratio 4)": "eva02-glu"}


def transformer_rows() -> str:
    """The transformers' rows of the README's family table, as this file's tests make them."""
    made = "yes: every width is the timm model of its embedding and heads"
    lines = [f"| {family} | `{VITS[key][0]}`, 2 blocks of 4 heads (`test_slimmable_vit.py`) | "
             f"{made}{'; trained one IPKD-TA-M step' if key == 'deit-distilled' else ''} |"
             for family, key in MADE.items()]
    lines += [f"| {family} | `{model}` | refused: layer `{layer}` {reason} |"
              for family, (model, _, layer, reason) in REFUSED.items()]
    return "\n".join(lines)


def test_the_readme_family_table_ends_with_this_tests_transformers() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = transformer_rows()
    assert rows in readme, "README's family table lacks, after its CNNs:\n" + rows
    before = readme[:readme.index(rows)].rstrip("\n").rsplit("\n", 1)[-1]
    assert before.startswith("| ") and "|---|" not in before  # the CNN rows' table
