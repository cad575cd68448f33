"""The transformer figures of ``benchmarks/run.py``: what a slimmable ViT's widths cost against
plain ViTs of their shapes, and what DeiT's distillation token costs against the plain DeiT.

The ViT is a DeiT-Ti shape small enough for 2 cores: 64x64 inputs, patches of 8 (64 patches and
the class token), 12 blocks, embedding 192, MLP ratio 4, CIFAR-10 classes, batch at most 64
(``--quick``, a smoke test: 2 blocks).

* ``vit_slimmable_overhead_ratio``: a 4-width IPKD-TA-M step of the slimmable ViT (``slimmable``
  over ``deit_tiny_patch16_224``, widths 0.25, 0.5, 0.75, 1.0) / the CE steps of four plain timm
  ViTs of the widths' shapes (embedding 48, 96, 144, 192, the same parameter counts as the
  widths), summed; the same batch, timed in one alternation, as ``width.py``'s
  ``slimmable_overhead_ratio`` for the CNNs. Its heads are 4 of 48 channels rather than DeiT-Ti's
  3 of 64, so that every width keeps whole heads (1, 2, 3, 4); the attention's cost is the same.
* ``deit_token_kd_ratio`` (reported): a training step of the distilled DeiT-Ti shape
  (``deit_tiny_distilled_patch16_224``, ``distilled = true``: the class and distillation heads)
  taught through its distillation token by a frozen plain DeiT-Ti of the same shape (graph
  ``deit``, divergence ``hard``, lam 1: DeiT's hard distillation), the teacher's forward included
  / the CE step of the plain DeiT-Ti (3 heads).

Each step is SGD's ``zero_grad``, the engine's step (:func:`kdreg.engine.step.stage_backward` or
:func:`~kdreg.engine.step.multi_pass_backward`; a plain network's CE backward) and ``step``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import timm
import torch
from common import NUM_CLASSES, Family, Figure, Job, Settings, batch, ipkd_ta_m, sgd
from probes import alternate, median
from width import ce_step, check_params, plain_steps

import kdreg
from kdreg.engine.assemble import DataShape, assemble
from kdreg.engine.step import multi_pass_backward, stage_backward
from kdreg.recipe import parse_recipe
from kdreg.stages import freeze

#: input size and largest batch of the transformer figures (the batch keeps the alternation to
#: about a minute on 2 cores)
SIZE = 64
BATCH = 64
WIDTHS = (0.25, 0.5, 0.75, 1.0)
#: a DeiT-Ti shape at 64 px: patches of 8, 12 blocks, embedding 192, MLP ratio 4 (timm's
#: deit_tiny_patch16_224 with this patch size)
PATCH = 8
#: the slimmable ViT's heads: 4 of 48 channels, whole at every width of WIDTHS
SLIM_HEADS = 4
EMBED = 192

DEIT_RECIPE = """
[[stages]]
name = "teacher"
backbone = {{ name = "timm", model = "deit_tiny_patch16_224", model_options = {{ patch_size = {patch}, depth = {depth} }} }}
[[stages]]
name = "student"
backbone = {{ name = "timm", model = "{student}", {options}model_options = {{ patch_size = {patch}, depth = {depth} }} }}
{graph}
"""


def slimmable_vit(s: Settings) -> kdreg.FlexibleBackbone:
    torch.manual_seed(0)
    model = kdreg.build_backbone(
        "slimmable", num_classes=NUM_CLASSES, input_size=(SIZE, SIZE), widths=list(WIDTHS),
        trunk={"name": "timm", "model": "deit_tiny_patch16_224",
               "model_options": {"patch_size": PATCH, "depth": s.vit_depth, "num_heads": SLIM_HEADS}})
    return model.to(s.device).train()


def plain_vits(model: kdreg.FlexibleBackbone, s: Settings) -> list[torch.nn.Module]:
    """A plain timm ViT per width of ``model`` (embedding and heads scaled by the width), in
    training mode; each holds exactly the parameters its width uses, or AssertionError."""
    torch.manual_seed(0)
    nets = [timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
                              img_size=SIZE, patch_size=PATCH, depth=s.vit_depth, embed_dim=int(EMBED * w),
                              num_heads=int(SLIM_HEADS * w)).to(s.device).train() for w in WIDTHS]
    check_params(nets, model)
    return nets


def vit_widths(s: Settings) -> Figure:
    """``vit_slimmable_overhead_ratio``: the 4-width IPKD-TA-M step / the four plain ViTs' CE
    steps summed, in one alternation."""
    s = attrs.evolve(s, batch=min(s.batch, BATCH))
    model = slimmable_vit(s)
    nets = plain_vits(model, s)
    x, y = batch(s, size=SIZE)
    opt = sgd(model)
    loss = ipkd_ta_m(model.num_submodels)

    def four_widths() -> None:
        opt.zero_grad(set_to_none=True)
        multi_pass_backward(model, x, y, loss)
        opt.step()

    steps = {"ipkd-ta-m": four_widths, **plain_steps(model, nets, x, y)}
    t = alternate(steps, rounds=s.steps, warmup=s.warmup, device=s.device)
    m = {k: median(v) for k, v in t.items()}
    plain = {label: m[f"plain {label}"] for label in model.submodel_labels}
    return Figure(m["ipkd-ta-m"] / sum(plain.values()),
                  details={"ipkd-ta-m_step_s": m["ipkd-ta-m"], "plain_step_s": plain,
                           "plain_sum_s": sum(plain.values()), "batch": s.batch,
                           "input_size": [SIZE, SIZE], "blocks": s.vit_depth,
                           "params": model.count_params()})


def deit_steps(s: Settings) -> dict[str, Callable[[], Any]]:
    """The distilled DeiT-Ti's token-KD step and the plain DeiT-Ti's CE step, each assembled from
    its recipe as ``kdreg run`` assembles it, on the same batch."""
    shape = DataShape(NUM_CLASSES, input_size=(SIZE, SIZE))
    x, y = batch(s, size=SIZE)
    token = DEIT_RECIPE.format(student="deit_tiny_distilled_patch16_224", options="distilled = true, ",
                               patch=PATCH, depth=s.vit_depth,
                               graph='graph = { name = "deit", teacher = "teacher" }\nlam = 1.0\n'
                                     'divergence = "hard"')
    teacher_plan, plan = assemble(parse_recipe(token), shape, seed=0)
    freeze(teacher_plan.model.to(s.device))
    student = plan.to(s.device).model.train()
    opt = sgd(student)
    loss, teachers = plan.loss, plan.frozen

    def token_kd() -> None:
        opt.zero_grad(set_to_none=True)
        stage_backward(student, x, y, loss, teachers)
        opt.step()

    torch.manual_seed(0)
    plain = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
                              img_size=SIZE, patch_size=PATCH, depth=s.vit_depth).to(s.device).train()
    return {"token_kd": token_kd, "plain": ce_step(plain, sgd(plain), x, y)}


def deit_token(s: Settings) -> Figure:
    """``deit_token_kd_ratio``: the distilled DeiT-Ti's token-KD step / the plain DeiT-Ti's step."""
    s = attrs.evolve(s, batch=min(s.batch, BATCH))
    t = alternate(deit_steps(s), rounds=s.steps, warmup=s.warmup, device=s.device)
    m = {k: median(v) for k, v in t.items()}
    return Figure(m["token_kd"] / m["plain"],
                  details={"token_kd_step_s": m["token_kd"], "plain_step_s": m["plain"],
                           "batch": s.batch, "input_size": [SIZE, SIZE], "blocks": s.vit_depth,
                           "setting": "deit_tiny_distilled (patch 8) taught by a frozen deit_tiny of "
                                      "the same shape, graph deit, hard, lam 1; teacher forward included"})


FAMILY = Family(
    jobs=(Job(("vit_slimmable_overhead_ratio",), lambda s, work: vit_widths(s)),
          Job(("deit_token_kd_ratio",), lambda s, work: deit_token(s))),
    targets={"vit_slimmable_overhead_ratio": ("<=", 1.05)},
)
