"""Scala (Zhang et al., NeurIPS 2024, "Slicing Vision Transformer for Flexible Inference") as kdreg
expresses it: a discrete width set trained by the sandwich rule (``widths = { set, sampled, eval
}``), every head kept and sliced (``heads = "kept"``), isolated activation (``isolated = true``),
an inplace graph whose largest width a frozen stage teaches too (``teacher`` on ipkd-ta-1),
transformers refused at untrained widths, and recipes/scala/ run tiny."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdreg
from kdreg.cli import main
from kdreg.engine.step import LossSettings, backward
from kdreg.errors import OptionError, UserError
from kdreg_plugins.backbones.slimmable import check_width_range
from kdreg_plugins.backbones.slimmable_derived import DerivedSlimmable
from kdreg_plugins.backbones.slimmable_derived.attention import SlicedAttention
from kdreg_plugins.backbones.timm_adapter import TimmBackbone, build_timm

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "scala" / "deit-s-scala.toml"
C = 5
SIZE = (32, 32)
#: Scala's X = 13: 0.25 to 1 in steps of 1/16 (its code's smallest_ratio, largest_ratio, granularity)
SCALA_SET = tuple(k / 16 for k in range(4, 17))
#: 4 heads of 16 channels: every 1/16 of the embedding is one channel of each head
SMALL = {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


def scrambled_trunk(seed: int = 0) -> TimmBackbone:
    """A tiny DeiT with every parameter drawn at random (timm's near-zero class token would hide
    a token sliced wrong)."""
    trunk = build_timm(num_classes=C, in_chans=3, input_size=SIZE, model="deit_small_patch16_224",
                       model_options=SMALL)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trunk.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return trunk.eval()


def batch(n: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def plain_deit(trunk: TimmBackbone, width: float, *, heads: str, tail: bool = False) -> nn.Module:
    """The timm DeiT of ``width`` of the embedding, with every head (``heads = "kept"``) or
    ``width`` of them, holding the trunk's weights cut to its shape: the first entries of every
    dimension (``tail``: the last), of each head within q, k, v and the projection's input."""
    full = trunk.net.state_dict()
    dim, n_heads = int(SMALL["embed_dim"] * width), SMALL["num_heads"]
    if heads != "kept":
        n_heads = int(n_heads * width)
    plain = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=C,
                              img_size=SIZE, **{**SMALL, "embed_dim": dim, "num_heads": n_heads})
    state = {}
    H, hd_full = SMALL["num_heads"], SMALL["embed_dim"] // SMALL["num_heads"]
    for key, t in plain.state_dict().items():
        src, shape = full[key], tuple(t.shape)
        if heads == "kept" and ".attn.qkv." in key:    # (3 * H * hd, in) -> per head
            src, shape = src.reshape(3, H, hd_full, *src.shape[1:]), (3, H, shape[0] // (3 * H), *shape[1:])
        elif heads == "kept" and key.endswith(".attn.proj.weight"):
            src, shape = src.reshape(src.shape[0], H, hd_full), (shape[0], H, shape[1] // H)
        elif ".attn.qkv." in key:                       # whole heads of each of q, k and v
            src, shape = src.reshape(3, src.shape[0] // 3, *src.shape[1:]), (3, shape[0] // 3, *shape[1:])
        index = tuple(slice(n - k, None) if tail else slice(k) for n, k in zip(src.shape, shape))
        state[key] = src[index].reshape(t.shape)
    plain.load_state_dict(state)
    return plain.eval()


def slimmable(widths: Any, trunk: TimmBackbone | None = None, **options: Any) -> DerivedSlimmable:
    return DerivedSlimmable(trunk if trunk is not None else scrambled_trunk(), widths,
                            name="deit_small_patch16_224", input_size=SIZE, **options)


# ------------------------------------------------------------------------------ the width set
def scala_draw(rng: random.Random, smallest: float = 0.25, largest: float = 1.0,
               granularity: float = 0.0625) -> tuple[float, float]:
    """Scala-pytorch engine_scala.py, train_one_epoch, written out: the two sampled widths."""
    middle = (largest + smallest) / 2
    w3q = float(rng.randint(int(middle // granularity), int(largest // granularity - 1)) * granularity)
    w2q = float(rng.randint(int(smallest // granularity + 1), int(middle // granularity - 1)) * granularity)
    return w2q, w3q


def test_a_width_set_trains_its_ends_and_one_member_of_each_stratum_as_scala_does() -> None:
    r = check_width_range({"set": list(SCALA_SET), "sampled": 2})
    assert (r.min, r.max, r.members) == (0.25, 1.0, SCALA_SET)
    assert r.eval == (0.25, 0.5, 0.75, 1.0)          # Scala's reported widths, the default
    assert r.train_labels == ("min", "sampled1", "sampled2", "max")
    draws = [r.draw(seed) for seed in range(600)]
    assert draws[:50] == [r.draw(seed) for seed in range(50)]          # the seed decides
    ours = Counter(d[1:3] for d in draws)
    rng = random.Random(0)
    theirs = Counter(scala_draw(rng) for _ in range(600))
    assert set(ours) == set(theirs)                   # the same pairs, and every one of them
    assert len(ours) == 5 * 6 and all(d[0] == 0.25 and d[3] == 1.0 for d in draws)
    assert all(d == tuple(sorted(d)) for d in draws)
    assert max(ours.values()) < 3 * min(ours.values())   # uniform within each stratum
    assert r.initial_widths() == (0.25, 0.4375, 0.75, 1.0)   # the middle of each stratum


def test_a_width_set_trains_a_hand_written_slimmable_cnn_with_calibrated_batchnorm() -> None:
    from kdreg_plugins.backbones.slimmable import RangeBatchNorm2d
    from kdreg_plugins.backbones.tiny import build_tiny_slimmable

    model = build_tiny_slimmable(num_classes=C, channels=16, input_size=(8, 8),
                                 widths={"set": [0.25, 0.5, 0.75, 1.0], "sampled": 1})
    assert model.train_labels == ("min", "sampled1", "max") and model.needs_calibration()
    assert any(isinstance(m, RangeBatchNorm2d) for m in model.modules())
    model.train()
    seen = set()
    for seed in range(20):
        model.begin_step(seed)
        seen.add(model.train_widths)
        logits = model(torch.randn(2, 3, 8, 8))
        assert len(logits) == 3 and all(t.shape == (2, C) for t in logits)
    assert seen == {(0.25, 0.5, 1.0), (0.25, 0.75, 1.0)}


@pytest.mark.parametrize(("spec", "message"), [
    ({"set": [0.25, 0.5, 1.0], "min": 0.25}, "a width set gives its own smallest and largest width; "
                                             "drop min (or the set)"),
    ({"set": [0.5]}, "a width set needs at least two widths, got [0.5]"),
    ({"set": [0.25, 0.5, 1.0], "sampled": 2}, "widths.sampled (2) exceeds the 1 widths inside the set "
                                              "[0.25, 0.5, 1.0]"),
    ({"set": [0.25, 0.5, 1.0], "sampled": 1, "eval": [0.25, 0.3]}, "evaluated widths 0.3 are not in the trained set "
                                                     "0.25, 0.5, 1"),
    ({"set": [0.5, 0.25]}, "widths must be strictly increasing, got [0.5, 0.25]"),
])
def test_bad_width_sets_are_one_line_each(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionError) as info:
        check_width_range(spec)
    assert str(info.value) == message and info.value.key == "widths"


# ------------------------------------------------------------------------------ heads kept, isolated
def test_every_width_of_the_set_is_the_plain_deit_with_all_heads_each_sliced() -> None:
    trunk = scrambled_trunk()
    model = slimmable({"set": list(SCALA_SET), "sampled": 2, "eval": [0.25, 0.3125, 0.5, 1.0]},
                      trunk, heads="kept").eval()
    x = batch()
    assert not model.needs_calibration()            # LayerNorm keeps no statistics
    for index, width in enumerate(model.widths):
        plain = plain_deit(trunk, width, heads="kept")
        with torch.no_grad():
            expected = plain(x)
            torch.testing.assert_close(model.forward_submodel(x, index), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.export_submodel(index)(x), expected, rtol=1e-5, atol=1e-5)
        assert model.count_params()[index] == sum(p.numel() for p in plain.parameters())
    with torch.no_grad():
        assert torch.equal(model.forward_submodel(x, 3), trunk.net(x))
    attn = [m for m in model.modules() if isinstance(m, SlicedAttention)]
    assert [m.dims[model.eval_slot(1)] for m in attn] == [20, 20]  # 0.3125 of 64: 5 channels a head


def test_isolated_activation_runs_the_smallest_width_on_the_last_slices() -> None:
    trunk = scrambled_trunk()
    x = batch()
    for heads in ("kept", "sliced"):
        model = slimmable([0.25, 0.5, 1.0], trunk, heads=heads, isolated=True).eval()
        last = plain_deit(trunk, 0.25, heads=heads, tail=True)
        first = plain_deit(trunk, 0.5, heads=heads)
        with torch.no_grad():
            expected = last(x)
            torch.testing.assert_close(model.forward_submodel(x, 0), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.export_submodel(0)(x), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.forward_submodel(x, 1), first(x), rtol=1e-5, atol=1e-5)
            assert torch.equal(model.forward_submodel(x, 2), trunk.net(x))     # 1.0 unchanged
    # training the smallest width reaches the last rows of a weight only
    model.train()
    model.forward_submodel(x, 0).sum().backward()
    grad = model.net.get_submodule("blocks.0.mlp.fc1").weight.grad
    assert grad is not None and grad[-64:, -16:].abs().sum() > 0
    assert grad[:-64].abs().sum() == 0 and grad[:, :-16].abs().sum() == 0


def test_isolated_activation_on_a_width_set_isolates_its_smallest_member_in_every_slot() -> None:
    trunk = scrambled_trunk()
    model = slimmable({"set": list(SCALA_SET), "sampled": 2}, trunk, heads="kept", isolated=True)
    model.train()
    model.begin_step(3)
    x = batch()
    expected = plain_deit(trunk, 0.25, heads="kept", tail=True)(x)
    torch.testing.assert_close(model.forward_submodel(x, 0), expected, rtol=1e-5, atol=1e-5)
    middle = model.train_widths[1]
    torch.testing.assert_close(model.forward_submodel(x, 1), plain_deit(trunk, middle, heads="kept")(x),
                               rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():                           # evaluated x0.25 is the isolated one too
        torch.testing.assert_close(model.forward_submodel(x, 0), expected, rtol=1e-5, atol=1e-5)


def test_isolated_activation_and_kept_heads_are_refused_where_they_cannot_slice() -> None:
    cnn = kdreg.build_backbone("resnet8", num_classes=C, input_size=(8, 8))
    with pytest.raises(OptionError, match=r"isolated activation slices networks normalised by LayerNorm "
                                          r"or GroupNorm \(transformers\); layer .* is a BatchNorm"):
        DerivedSlimmable(cnn, [0.5, 1.0], name="resnet8", input_size=(8, 8), isolated=True)
    qk = build_timm(num_classes=C, in_chans=3, input_size=SIZE, model="vit_tiny_patch16_224",
                    model_options={**SMALL, "qk_norm": True})
    with pytest.raises(OptionError, match=r'heads = "kept" slices the channels of every head; layer '
                                          r"blocks.0.attn of trunk vit cannot: it normalises its queries"):
        DerivedSlimmable(qk, [0.5, 1.0], name="vit", input_size=SIZE, heads="kept")
    with pytest.raises(OptionError, match=r"heads must be one of 'sliced', 'kept', got 'dims'"):
        slimmable([0.5, 1.0], heads="dims")


# ------------------------------------------------------------------------------ untrained widths
def test_a_transformer_is_refused_at_a_width_it_was_not_trained_at() -> None:
    model = slimmable({"set": [0.25, 0.5, 0.75, 1.0], "sampled": 1}, heads="kept")
    with pytest.raises(OptionError) as info:
        model.set_eval_widths([0.3, 0.5, 0.6])
    assert str(info.value) == ("width(s) 0.3, 0.6 were not trained (trained: 0.25, 0.5, 0.75, 1): trunk "
                               "deit_small_patch16_224 is a transformer, evaluated at the widths it was "
                               "trained at only (no BatchNorm statistics to recalibrate)")
    model.set_eval_widths([0.25, 0.75])
    assert model.submodel_labels == ("x0.25", "x0.75") and not model.needs_calibration()
    cnn = kdreg.build_backbone("resnet8", num_classes=C, input_size=(8, 8))
    net = DerivedSlimmable(cnn, {"set": [0.25, 0.5, 1.0], "sampled": 1}, name="resnet8", input_size=(8, 8))
    net.set_eval_widths([0.3, 0.6])               # a CNN's BatchNorm is recalibrated instead
    assert net.needs_calibration() and net.submodel_labels == ("x0.3", "x0.6")


# ------------------------------------------------------------------------------ the graph
def test_ipkd_ta_1_with_a_teacher_stage_is_scalas_progressive_transfer() -> None:
    graph = kdreg.get_teacher_graph("ipkd-ta-1", 4, teacher="teacher")
    assert graph.describe().splitlines() == ["0 <- 1 (1)", "1 <- 2 (1)", "2 <- 3 (1)", "3 <- teacher (1)"]
    assert graph.external == ("teacher",) and graph.name == "ipkd-ta-1"
    for name in ("ipkd", "ipkd-ta-m", "subset"):
        g = kdreg.get_teacher_graph(name, 3, teacher=["a", "b"], teacher_weight=0.5)
        assert g.teachers_of(2) == [("a", 0.25), ("b", 0.25)] and g.external == ("a", "b"), name
    with pytest.raises(UserError, match=r"teacher_weight must be a finite number > 0, got 0.0 @ "
                                        r"graph.teacher_weight"):
        kdreg.get_teacher_graph("ipkd", 3, teacher="t", teacher_weight=0.0)


def test_the_engine_computes_the_mixed_graph_as_the_rule_written_out() -> None:
    """L = sum_i<n-1 [(1-lam) CE(a_i, y) + lam tau^2 KL(p_{i+1} || p_i)] + (1-lam) CE(a_n, y)
    + lam tau^2 KL(p_T || p_n), p = softmax(a / tau), teachers detached: value and gradients."""
    lam, tau = 0.6, 2.0
    torch.manual_seed(0)
    model = slimmable({"set": list(SCALA_SET), "sampled": 2}, heads="kept", isolated=True).train()
    model.begin_step(11)
    x, y = batch(4), torch.tensor([0, 1, 2, 3])
    t = torch.randn(4, C, generator=torch.Generator().manual_seed(5))
    graph = kdreg.get_teacher_graph("ipkd-ta-1", model.num_train_submodels, teacher="teacher")
    out = backward(model, x, y, LossSettings(graph, lam=lam, tau=tau, divergence="kl"), {"teacher": t})
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    def kl(student: Tensor, teacher: Tensor) -> Tensor:
        pt = F.softmax(teacher.detach() / tau, -1)
        return tau * tau * (pt * (pt.log() - F.log_softmax(student / tau, -1))).sum(-1).mean()

    a = [model.forward_submodel(x, i) for i in range(4)]
    teachers = [*a[1:], t]
    total = sum((1 - lam) * F.cross_entropy(a[i], y) + lam * kl(a[i], teachers[i]) for i in range(4))
    assert isinstance(total, Tensor)
    total.backward()
    torch.testing.assert_close(out.loss, total.detach(), rtol=1e-5, atol=1e-6)
    theirs = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys() and len(ours) == len(list(model.parameters()))
    for name, g in ours.items():
        torch.testing.assert_close(g, theirs[name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------ the recipe
TINY_RUN = [
    "--set", "data.dataset=cifar10-sample", "--set", "data.image_size=32",
    "--set", "data.batch_size=16", "--set", "data.eval_batch_size=50", "--set", "data.workers=0",
    "--set", "data.train_limit=32", "--set", "data.test_limit=50",
    "--set", "train.epochs=1", "--set", "train.device=cpu", "--set", "train.schedule.warmup_epochs=0",
    "--set", "stages.teacher.epochs=1",
    "--set", ('stages.teacher.backbone={ name = "timm", model = "vit_tiny_patch16_224", model_options = '
              '{ patch_size = 8, depth = 1, embed_dim = 32, num_heads = 2 } }'),
    "--set", ("stages.scala.backbone.trunk.model_options={ drop_path_rate = 0.1, patch_size = 8, depth = 1, "
              "embed_dim = 64, num_heads = 4 }"),
]


def test_the_scala_recipe_validates_and_runs_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(RECIPE), "--set", f"data.root={tmp_path / 'imagenet'}"]) == 0
    assert "deit-s-scala.toml: ok" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["run", str(RECIPE), "--out", str(out), *TINY_RUN, "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    teacher, student = result["stages"]
    assert student["name"] == "scala" and student["graph"] == "ipkd-ta-1"
    assert student["teachers"] == ["teacher"]
    assert student["submodels"] == ["x0.25", "x0.5", "x0.75", "x1.0"]
    assert len(student["test_accuracy"]) == 4 and "calibration_images" not in student
    capsys.readouterr()
    # a width the set did not train: one line, exit 2
    assert main(["eval", str(out), "--widths", "0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "width(s) 0.3 were not trained (trained: 0.25, 0.3125" in err[0], err
    assert "is a transformer" in err[0]
