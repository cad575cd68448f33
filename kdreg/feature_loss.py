"""What is distilled between features at split points: the :class:`FeatureLoss` interface.

A stage's ``feature_losses`` name methods (FitNet, AT, SP, PKT, RKD, CRD, or a plugin's) and the
split points they read. Each feature loss follows the stage's teacher-graph edges whose two ends
expose features there (a frozen teacher stage's full model, or another width of a multi-pass
student), and adds its term to the student's loss::

    L_i = (1 - lam) CE(a_i, y) + lam * sum_{(t, w) in T_i} w * D(a_i, sg(a_t))
                               + sum_f weight_f * sum_{(t, w) in T_i with features} w * F_f(phi_i, sg(phi_t))

One :class:`FeatureLoss` object is built per (recipe entry, graph edge), so that the parameters a
method owns (FitNet's regressor, CRD's embeddings and memory bank) belong to one student/teacher
pair. They train with the student (the stage's optimizer), are saved in and resumed from its
``last.pt`` and are never exported.

Transformer features are tokens ``[B, N, C]``: the prefix tokens (class, distillation and register
tokens) first, then the patches. :class:`Tokens` says how a model's sequence begins (read from
timm's ``num_prefix_tokens``, ``cls_token`` and ``global_pool`` by :func:`tokens_of`), so that a
loss can pool them to ``[B, C]``: the class token, or the mean of the patch tokens.

Feature losses are registered through the ``kdreg_register_feature_losses`` hook (the built-in
ones by ``kdreg_plugins.feature_losses``) and built, like every other kind, by
:func:`kdreg.create.create`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import attrs
import torch
from torch import Tensor, nn

from kdreg.divergence import loss_value_problems

#: how tokens are pooled to one vector per sample: the class token, the mean of the patch tokens
TOKEN_POOLS = ("cls", "mean")


@attrs.frozen
class Tokens:
    """How a transformer's token sequence ``[B, N, C]`` begins at its split points: ``prefix``
    tokens that are not patches (in timm's order: the class token, then a distilled DeiT's
    distillation token or the register tokens), ``class_token``: whether the first of them is a
    class token, ``head``: what the model's own classifier pools (``"cls"``: the class token,
    ``"mean"``: the mean of the patch tokens). A model kdreg knows no tokens of has none of
    these: no prefix, no class token, the mean."""

    prefix: int = 0
    class_token: bool = False
    head: str = "mean"

    def pool(self, f: Tensor, how: str) -> Tensor:
        """``[B, C]`` from tokens ``f [B, N, C]``: the class token (``how = "cls"``) or the mean
        of the patch tokens, every prefix token left out (``"mean"``, timm's ``global_pool =
        "avg"``)."""
        if how == "cls":
            if not self.class_token:
                raise ValueError("these tokens have no class token to pool")
            return f[:, 0]
        return f[:, self.prefix:].mean(1)


def tokens_of(model: nn.Module) -> Tokens:
    """The token layout of ``model``'s features: its ``token_layout`` attribute when it declares
    one (a network derived from a timm transformer keeps the timm model's), else that of the
    first submodule that is a timm transformer (``num_prefix_tokens`` and ``patch_embed``:
    VisionTransformer, DeiT, EVA ...); its head pools the class token when it has one and its
    ``global_pool`` is not an average or maximum over the patches, else the patch tokens' mean.
    :class:`Tokens` ``()`` for any other model."""
    declared = getattr(model, "token_layout", None)
    if isinstance(declared, Tokens):
        return declared
    for m in model.modules():
        prefix = getattr(m, "num_prefix_tokens", None)
        if isinstance(prefix, int) and hasattr(m, "patch_embed"):
            cls = getattr(m, "cls_token", None) is not None
            pool = getattr(m, "global_pool", "token")
            head = "cls" if cls and pool not in ("avg", "avgmax", "max") else "mean"
            return Tokens(prefix, cls, head)
    return Tokens()


@attrs.frozen
class FeatureSetup:
    """What a feature loss learns about its edge before training (:meth:`FeatureLoss.setup`).

    ``student`` and ``teacher`` are the feature shapes (without the batch dimension: ``(C, H, W)``
    for a convolutional network, ``(tokens, C)`` for a transformer) at the entry's points, paired
    in order; ``student_tokens`` and ``teacher_tokens`` how each side's tokens begin (its class,
    distillation and register tokens, :class:`Tokens`). ``num_samples`` is the size of the training set (sample indices lie in
    ``[0, num_samples)``); ``train_labels`` its labels ``[num_samples]`` (None when unknown);
    ``num_classes`` the class count.
    """

    student: tuple[tuple[int, ...], ...]
    teacher: tuple[tuple[int, ...], ...]
    num_samples: int
    num_classes: int
    train_labels: Tensor | None = None
    student_tokens: Tokens = Tokens()
    teacher_tokens: Tokens = Tokens()


@attrs.frozen(eq=False)
class FeatureBatch:
    """What a feature loss gets besides the features, for one training batch.

    ``labels``: class indices ``[B]`` or soft targets ``[B, C]`` (mixup / CutMix); ``indices``:
    each sample's index in the training set ``[B]`` (int64, on the batch's device) when the loss
    declares :attr:`FeatureLoss.needs_indices`, else None; ``epoch``: the 1-based epoch being
    trained (None outside training).
    """

    labels: Tensor
    indices: Tensor | None = None
    epoch: int | None = None


class FeatureLoss(nn.Module):
    """The loss between a student's and a teacher's features at split points.

    Subclass it, implement :meth:`forward` and, when the method owns parameters or needs the
    shapes, :meth:`setup`. Options come from the recipe entry (``{ name = "at", points = [...],
    weight = 1000.0, p = 2 }``: every key but ``name``, ``points``, ``student_points``,
    ``teacher_points`` and ``weight`` is an option of the factory).
    """

    #: the weight a recipe entry gets when it gives none (the paper's, or the reference code's)
    default_weight: float = 1.0
    #: True when :meth:`forward` needs each sample's training-set index (``batch.indices``)
    needs_indices: bool = False

    def setup(self, info: FeatureSetup) -> None:
        """Called once per edge before training, with the feature shapes: build the parameters
        the method owns here (a connector from the student's channels to the teacher's).
        Raise :class:`kdreg.errors.OptionError` for shapes the method cannot join (reported as
        ``what @ recipe.stages.<stage>.feature_losses[k]``). The default accepts any shapes."""

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor],
                batch: FeatureBatch) -> Tensor:
        """The edge's loss, a scalar (without the entry's weight).

        ``student`` and ``teacher`` hold ``[B, ...]`` features at the paired points, the
        teacher's detached; autocast is off and both are fp32.
        """
        raise TypeError(f"{type(self).__name__} must implement forward(student, teacher, batch)")


def feature_loss_problems(loss: FeatureLoss) -> list[str]:
    """What breaks the feature-loss contract, found by one call on a small probe batch (features
    ``[4, 8, 4, 4]`` on both sides at one point): it must return a finite scalar tensor that
    depends on the student's features."""
    gen = torch.Generator().manual_seed(0)
    shape = (8, 4, 4)
    try:
        probe = copy.deepcopy(loss)   # setup may build parameters: the probe's are thrown away
        probe.setup(FeatureSetup((shape,), (shape,), num_samples=16, num_classes=4,
                                 train_labels=torch.arange(16) % 4))
        student = torch.randn(4, *shape, generator=gen, requires_grad=True)
        teacher = torch.randn(4, *shape, generator=gen)
        batch = FeatureBatch(torch.tensor([0, 1, 2, 3]),
                             torch.tensor([0, 5, 10, 15]) if loss.needs_indices else None, epoch=1)
        value = probe([student], [teacher], batch)
    except Exception as exc:  # noqa: BLE001 - reported as the plugin's broken contract
        return [f"calling it on features [4, 8, 4, 4] raised {type(exc).__name__}: {exc}"]
    return loss_value_problems(value, "a scalar", "the student's features")
