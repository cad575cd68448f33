"""Feature losses on a transformer's tokens ``[B, N, C]``: fitnet on pooled final features against
timm's ``FeatureDistillationTask`` (a ViT taught by a CNN and a CNN by a ViT), the poolings (the
class token, the mean of the patch tokens without class, distillation and register tokens),
fitnet token by token, the refusals (``at`` on tokens, token counts that differ, a class token
that is not there) and inplace feature distillation between the widths of a slimmable ViT
against the rule written out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.task import FeatureDistillationTask
from timm.task.distillation import DistillationTeacher
from torch import Tensor, nn

from kdreg.cli import main
from kdreg.create import create
from kdreg.engine import checkpoint
from kdreg.engine.assemble import DataShape, StagePlan, assemble
from kdreg.engine.run import Run
from kdreg.engine.step import stage_backward
from kdreg.feature_loss import FeatureBatch, FeatureLoss, FeatureSetup, Tokens, tokens_of
from kdreg.recipe import parse_recipe
from kdreg.stages import freeze
from kdreg_plugins.backbones.slimmable_derived import DerivedSlimmable
from kdreg_plugins.backbones.timm_adapter import build_timm

pytestmark = pytest.mark.usefixtures("one_thread")

C = 5
SIZE = (32, 32)
#: a ViT of 2 blocks, 16 patches of 8 x 8; its last block's tokens are its pooled pre-logits
#: features when it has no final norm
VIT = {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3, "final_norm": False}
PATH = "recipe.stages.student.feature_losses[0]"


def toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def vit(**options: Any) -> dict[str, Any]:
    return {"name": "timm", "model": "vit_tiny_patch16_224", "model_options": {**VIT, **options}}


CNN = {"name": "timm", "model": "test_resnet"}      # timm's 0.4 M-parameter ResNet, layer4 96 channels


def recipe(student: dict[str, Any], teacher: dict[str, Any], loss: dict[str, Any], lam: float = 0.0) -> str:
    return (f'[[stages]]\nname = "teacher"\nbackbone = {toml(teacher)}\n'
            f'[[stages]]\nname = "student"\nbackbone = {toml(student)}\n'
            f'graph = {{ name = "kd", teacher = "teacher" }}\nlam = {lam}\ntau = 2.0\n'
            f"feature_losses = [{toml(loss)}]\n")


def plans_of(text: str) -> list[StagePlan]:
    plans = assemble(parse_recipe(text), DataShape(C, input_size=SIZE, num_samples=32,
                                                   train_labels=torch.arange(32) % C), seed=0)
    freeze(plans[0].model)
    return plans


def batch(n: int = 4, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *SIZE, generator=g), torch.randint(0, C, (n,), generator=g)


def grads(*modules: nn.Module) -> dict[str, Tensor]:
    out = {f"{k}.{n}": p.grad.clone() for k, m in enumerate(modules) for n, p in m.named_parameters()
           if p.grad is not None}
    for m in modules:
        m.zero_grad(set_to_none=True)
    return out


# ------------------------------------------------------------------------------ against timm
@pytest.mark.parametrize(("student", "teacher", "points", "tokens"), [
    # a ViT taught by a CNN: its class token against the CNN's pooled last stage
    (vit(), CNN, (["blocks.1"], ["layer4"]), "cls"),
    # a ViT with 2 register tokens pooling the mean of its patches, taught by a wider ViT pooling
    # its class token: each side pooled as its own classifier pools it
    (vit(reg_tokens=2, global_pool="avg"), vit(embed_dim=64, num_heads=4), (["blocks.1"], ["blocks.1"]), "head"),
    # a CNN taught by a ViT (its class token)
    (CNN, vit(embed_dim=64, num_heads=4), (["layer4"], ["blocks.1"]), "auto"),    # "head" for a map
], ids=["cnn-teaches-vit", "vit-registers-mean", "vit-teaches-cnn"])
def test_fitnet_on_pooled_final_features_equals_timms_feature_distillation_task(
        student: dict[str, Any], teacher: dict[str, Any], points: tuple[list[str], list[str]],
        tokens: str) -> None:
    """The same student, teacher, projection weights and batch: timm's loss ``CE + w * mse(proj(
    pre_logits_s), pre_logits_t)`` and kdreg's fitnet at the last split points (tokens pooled as
    the head pools them, a map average-pooled, a linear connector) in a kd stage with lam 0, its
    value and every gradient (the student's and the projection's)."""
    loss = {"name": "fitnet", "student_points": points[0], "teacher_points": points[1],
            "tokens": tokens, "weight": 3.0}
    t_plan, plan = plans_of(recipe(student, teacher, loss))
    (edge,) = plan.features
    connector = edge.loss.regressors[0]
    assert isinstance(connector, nn.Linear)
    x, y = batch()
    model = plan.model.train()
    out = stage_backward(model, x, y, plan.loss, plan.frozen)
    ours = grads(model.net, connector)

    net, teacher_net = model.net, t_plan.model.net
    distiller = DistillationTeacher(teacher_net)
    mean = torch.tensor(net.pretrained_cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(net.pretrained_cfg["std"]).view(1, -1, 1, 1)
    distiller.mean_kd.copy_(mean)          # kdreg feeds both the same images: so does timm here
    distiller.std_kd.copy_(std)
    task = FeatureDistillationTask(net, distiller, criterion=nn.CrossEntropyLoss(),
                                   distill_loss_weight=3.0, task_loss_weight=1.0, verbose=False)
    projection = task.trainable_module.projection
    assert isinstance(projection, nn.Linear) and projection.weight.shape == connector.weight.shape
    projection.load_state_dict(connector.state_dict())
    task.train()
    result = task(x, y)
    result["loss"].backward()
    theirs = grads(net, projection)
    assert out.loss.item() == pytest.approx(result["loss"].item(), rel=1e-5)
    assert result["kd_loss"].item() > 0.01 * result["task_loss"].item()   # the feature term counts
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------ tokens and pooling
def test_the_token_layout_is_read_from_each_timm_transformer_and_kept_by_a_slimmable_one() -> None:
    small = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    cases = {
        "vit_tiny_patch16_224": ({}, Tokens(1, True, "cls")),
        "deit_tiny_distilled_patch16_224": ({}, Tokens(2, True, "cls")),
        "vit_small_patch14_reg4_dinov2": ({}, Tokens(5, True, "cls")),
        "vit_base_patch16_224": ({"class_token": False, "global_pool": "avg"}, Tokens(0, False, "mean")),
    }
    for model, (options, layout) in cases.items():
        net = timm.create_model(model, pretrained=False, num_classes=C, img_size=SIZE, **small, **options)
        assert tokens_of(net) == layout, model
    trunk = build_timm(num_classes=C, in_chans=3, input_size=SIZE, model="vit_small_patch14_reg4_dinov2",
                       model_options=small)
    assert tokens_of(DerivedSlimmable(trunk, (0.5, 1.0), input_size=SIZE)) == Tokens(5, True, "cls")
    assert tokens_of(nn.Conv2d(3, 4, 1)) == Tokens()


def test_pooling_takes_the_class_token_or_the_mean_of_the_patches_never_a_prefix_token() -> None:
    f = torch.randn(3, 7, 4)
    deit = Tokens(2, True, "cls")     # class, distillation, 5 patches
    assert torch.equal(deit.pool(f, "cls"), f[:, 0])
    torch.testing.assert_close(deit.pool(f, "mean"), f[:, 2:].sum(1) / 5)
    with pytest.raises(ValueError, match="no class token"):
        Tokens(0, False).pool(f, "cls")


def build(name: str, **options: Any) -> FeatureLoss:
    loss = create("feature_loss", name, options, provided={}, path=PATH)
    assert isinstance(loss, FeatureLoss)
    return loss


@pytest.mark.parametrize("name", ["sp", "pkt", "rkd", "crd"])
@pytest.mark.parametrize(("tokens", "pooled"), [("cls", lambda f: f[:, 0]),
                                                 ("mean", lambda f: f[:, 3:].mean(1)),
                                                 ("head", lambda f: f[:, 0])])
def test_relational_losses_pool_tokens_and_a_map_as_the_vectors_written_out(name: str, tokens: str,
                                                                            pooled: Any) -> None:
    """Tokens (a class token and 2 register tokens before 9 patches) against a CNN's map: the
    loss equals the same loss on the pooled tokens and the map as the method takes it (sp
    flattens it, the others average-pool it), value and gradient; the other way round the
    same."""
    flat = name == "sp"
    layout = Tokens(3, True, "cls")
    g = torch.Generator().manual_seed(0)
    tok = torch.randn(6, 12, 8, generator=g, dtype=torch.float64)
    fmap = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    labels = torch.arange(16) % 4
    for s, t, shapes in ((tok, fmap, ((12, 8), (5, 3, 3))), (fmap, tok, ((5, 3, 3), (12, 8)))):
        values, gradients = [], []
        for features, info in (((s, t), FeatureSetup((shapes[0],), (shapes[1],), 16, 4, labels,
                                                     student_tokens=layout, teacher_tokens=layout)),
                               ((vec(s, pooled, flat), vec(t, pooled, flat)),
                                FeatureSetup(((vec(s, pooled, flat).shape[1],),),
                                             ((vec(t, pooled, flat).shape[1],),), 16, 4, labels))):
            torch.manual_seed(3)        # CRD's embeddings, memory and negatives alike
            options = {"negatives": 5, "dim": 4} if name == "crd" else {}
            loss = build(name, tokens=tokens, **options)
            loss.setup(info)
            loss.double()
            student = features[0].clone().requires_grad_(True)
            value = loss([student], [features[1]], FeatureBatch(torch.arange(6) % 4, torch.arange(6)))
            value.backward()
            values.append(value.detach())
            gradients.append(student.grad)
        torch.testing.assert_close(values[0], values[1])
        check_chain(s, pooled, flat, gradients)


def vec(f: Tensor, pooled: Any, flat: bool) -> Tensor:
    """Tokens pooled, a map flattened or average-pooled: one vector per sample."""
    return (f.flatten(1) if flat else f.mean((2, 3))) if f.dim() == 4 else pooled(f)


def check_chain(s: Tensor, pooled: Any, flat: bool, gradients: list[Tensor]) -> None:
    """The gradient on the student's features is the pooled vector's, spread back by the pooling."""
    x = s.detach().clone().requires_grad_(True)
    v = vec(x, pooled, flat)
    v.backward(gradients[1])
    torch.testing.assert_close(gradients[0], x.grad)


def test_fitnet_compares_tokens_one_by_one_through_one_linear_map() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 17, 48, generator=g), torch.randn(4, 17, 64, generator=g)
    loss = build("fitnet")
    loss.setup(FeatureSetup(((17, 48),), ((17, 64),), 8, 2, student_tokens=Tokens(1, True, "cls"),
                            teacher_tokens=Tokens(1, True, "cls")))
    (r,) = loss.regressors
    assert isinstance(r, nn.Linear) and (r.in_features, r.out_features) == (48, 64)
    expected = ((s @ r.weight.t() + r.bias - t) ** 2).mean()
    torch.testing.assert_close(loss([s], [t], FeatureBatch(torch.zeros(4))), expected)


@pytest.mark.parametrize(("student", "teacher", "loss", "line"), [
    (vit(), vit(embed_dim=64, num_heads=4), {"name": "at", "points": ["blocks.0"]},
     "at needs [C, H, W] feature maps, got [17, 48]: the student's features are a transformer's tokens "
     "[N, C]: no H x W grid of positions to sum channels over (and class, distillation or register "
     "tokens that are no position); distil tokens with fitnet, sp, pkt, rkd or crd @ " + PATH),
    (vit(patch_size=16), vit(), {"name": "fitnet", "points": ["blocks.1"]},
     "fitnet compares tokens one by one, but the student has 5 tokens and the teacher 17 (another patch "
     "grid or other class, distillation or register tokens): set tokens = 'head', 'cls' or 'mean' to "
     f"compare pooled tokens @ {PATH}.tokens"),
    (vit(class_token=False, global_pool="avg"), CNN,
     {"name": "rkd", "student_points": ["blocks.1"], "teacher_points": ["layer4"], "tokens": "cls"},
     "tokens = 'cls' pools the class token, but the student's tokens [16, 48] have none: set tokens = "
     f"'mean' (the mean of the patch tokens) @ {PATH}.tokens"),
    (vit(), CNN, {"name": "pkt", "student_points": ["blocks.1"], "teacher_points": ["layer4"],
                  "tokens": "first"},
     f"tokens must be one of 'head', 'cls', 'mean', got 'first' @ {PATH}.tokens"),
], ids=["at-on-tokens", "token-counts", "no-class-token", "bad-option"])
def test_what_cannot_join_tokens_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    student: dict[str, Any], teacher: dict[str, Any],
                                                    loss: dict[str, Any], line: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[data]\ndataset = "synthetic"\noptions = { num_classes = 5, image_size = 32 }\n'
                    + recipe(student, teacher, loss))
    assert main(["validate", str(path)]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert len(errors) == 1 and errors[0].endswith(line), errors


def test_a_vit_trains_from_a_cnn_teacher_with_token_losses_end_to_end(tmp_path: Path) -> None:
    """``kdreg run``'s engine: a CNN teacher trained, then a ViT taught by it through fitnet on
    its pooled class token and CRD on its patch mean; the connector, embeddings and memory are
    saved with the student's ``last.pt``, its ``best.pt`` holds the ViT alone."""
    path = tmp_path / "vit.toml"
    path.write_text(
        '[data]\ndataset = "synthetic"\nbatch_size = 16\nval_split = 16\n'
        "options = { train_size = 48, test_size = 16, num_classes = 5, image_size = 32 }\n"
        "[train]\nepochs = 1\noptimizer = { lr = 0.01 }\nloggers = []\n"
        + recipe(vit(), CNN, {"name": "fitnet", "student_points": ["blocks.1"], "teacher_points": ["layer4"],
                             "tokens": "cls"}, lam=0.5).replace(
            "feature_losses = [", 'feature_losses = [{ name = "crd", student_points = ["blocks.1"], '
                                  'teacher_points = ["layer4"], tokens = "mean", negatives = 8, dim = 16 }, '))
    results = Run.start(path, tmp_path / "run", progress=False).execute()
    student = next(s for s in results["stages"] if s["name"] == "student")
    assert student["feature_losses"] == ["crd", "fitnet"]
    ckpt = tmp_path / "run" / "checkpoints" / "student"
    crd, fit = checkpoint.load(ckpt / "last.pt")["feature_losses"]
    assert crd["embed_s.linear.weight"].shape == (16, 48) and crd["memory_s"].shape == (32, 16)   # 48 - 16 held out
    assert fit["regressors.0.weight"].shape == (96, 48)            # 48 token channels -> 96
    plain = build_timm(num_classes=C, in_chans=3, input_size=SIZE, model="vit_tiny_patch16_224",
                       model_options=VIT).state_dict()
    assert set(checkpoint.load(ckpt / "best.pt")["model"]) == set(plain)


# ------------------------------------------------------------------------------ inplace, between widths
SLIM_VIT = {"name": "slimmable", "trunk": vit(embed_dim=64, num_heads=4), "widths": [0.25, 0.5, 0.75, 1.0]}


def test_inplace_token_distillation_between_the_widths_of_a_slimmable_vit() -> None:
    """IPKD over a slimmable ViT: every width learns the largest width's logits, its tokens one
    by one through a linear connector ``C_w -> 64`` (fitnet) and the relations of its patch
    tokens' means (pkt), value and every gradient against the rule written out."""
    text = (f'[[stages]]\nname = "s"\nbackbone = {toml(SLIM_VIT)}\ngraph = "ipkd"\nlam = 0.5\ntau = 2.0\n'
            'feature_losses = [{ name = "fitnet", points = ["blocks.1"], weight = 2.0 }, '
            '{ name = "pkt", points = ["blocks.0"], tokens = "mean", weight = 100.0 }]\n')
    (plan,) = assemble(parse_recipe(text), DataShape(C, input_size=SIZE), seed=0)
    model = plan.model.train()
    n = model.num_submodels
    fit = {e.student: e.loss.regressors[0] for e in plan.features if e.entry == 0}
    assert sorted((e.student, e.teacher, e.entry) for e in plan.features) == sorted(
        (i, n - 1, k) for i in range(n - 1) for k in (0, 1))
    assert [(fit[i].in_features, fit[i].out_features) for i in range(n - 1)] == [(16, 64), (32, 64), (48, 64)]
    x, y = batch(6)
    out = stage_backward(model, x, y, plan.loss)
    connectors = [fit[i] for i in range(n - 1)]
    ours = grads(model, *connectors)

    feats, logits = {}, {}
    for i in reversed(range(n)):
        feats[i], logits[i] = model.forward_features(x, i, ["blocks.0", "blocks.1"])
    (b0, b1), big = [f.detach() for f in feats[n - 1]], logits[n - 1].detach()
    total = F.cross_entropy(logits[n - 1], y)
    for i in range(n - 1):
        f0, f1 = feats[i]
        kd = 4.0 * F.kl_div(F.log_softmax(logits[i] / 2, -1), F.log_softmax(big / 2, -1),
                            reduction="batchmean", log_target=True)
        hint = ((connectors[i](f1) - b1) ** 2).mean()
        total = total + 0.5 * F.cross_entropy(logits[i], y) + 0.5 * kd + 2.0 * hint + 100.0 * pkt(f0[:, 1:].mean(1), b0[:, 1:].mean(1))
    total.backward()
    theirs = grads(model, *connectors)
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-5)
    assert ours.keys() == theirs.keys() and len(ours) > len(list(model.parameters()))
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-6, msg=k)


def pkt(s: Tensor, t: Tensor) -> Tensor:
    """Passalis & Tefas: KL between the teacher's and the student's cosine-kernel conditional
    probabilities, averaged over the B^2 entries (eps 1e-7, the authors' code)."""
    def p(f: Tensor) -> Tensor:
        f = f / (f.norm(dim=1, keepdim=True) + 1e-7)
        k = (f @ f.t() + 1.0) / 2.0
        return k / k.sum(1, keepdim=True)

    ps, pt = p(s), p(t)
    return (pt * torch.log((pt + 1e-7) / (ps + 1e-7))).mean()
