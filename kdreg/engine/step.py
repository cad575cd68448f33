"""One training step: the frozen teachers' outputs, then every sub-model the step trains, each
loss backpropagated as soon as it exists.

One path serves every model. A single-pass model whose loss needs no features (a plain network,
an early-exit network) runs one forward of every sub-model and one backward of the summed graph
loss, vectorised over the graph's edges. Every other step runs sub-model by sub-model, largest
first (:func:`multi_pass_backward`): a slimmable width, or the one sub-model of a student whose
loss reads its features (feature losses, a collaboration bridge).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Protocol

import attrs
import torch
from torch import Tensor

from kdreg.backbone import FlexibleBackbone
from kdreg.bridge import Bridge, BridgeBatch
from kdreg.divergence import Divergence
from kdreg.engine.device import autocast
from kdreg.engine.runner import Pass, Runner, as_runner
from kdreg.feature_loss import FeatureBatch, FeatureLoss
from kdreg.graph import Node, TeacherGraph
from kdreg.losses import as_divergence, distillation_loss, fp32, submodel_loss
from kdreg.normalise import normalise


@attrs.frozen(eq=False)
class FeatureEdge:
    """One feature loss along one graph edge: ``weight * F(phi_student, sg(phi_teacher))`` added to
    the student's loss (``weight`` is the recipe entry's times the edge's)."""

    student: int                       # the student sub-model (a training sub-model's index)
    teacher: Node                      # an internal sub-model's index, or an external node's name
    weight: float
    loss: FeatureLoss
    student_points: tuple[str, ...]
    teacher_points: tuple[str, ...]
    #: the recipe entry it comes from (its index in ``feature_losses``)
    entry: int = 0


@attrs.frozen
class LossSettings:
    """Every part of a stage's loss: the graph and its divergence, the feature losses along its
    edges and the bridge, with the precision the step runs at."""

    graph: TeacherGraph
    lam: float
    tau: float
    #: the stage's divergence (a registered name is built with its defaults)
    divergence: Divergence = attrs.field(factory=lambda: as_divergence("kl"), converter=as_divergence)
    #: autocast dtype (None: fp32) and an optional fp16 gradient scaler
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    #: the 1-based epoch being trained (the trainer sets it each epoch), for warm-ups; None: none
    epoch: int | None = None
    #: feature losses along the graph's edges
    features: tuple[FeatureEdge, ...] = ()
    #: the collaboration bridge (a student with one sub-model), trained with it
    bridge: Bridge | None = None

    def backward(self, value: Tensor) -> None:
        (self.scaler.scale(value) if self.scaler is not None else value).backward()

    @property
    def needs_indices(self) -> bool:
        """Whether a feature loss reads each sample's training-set index."""
        return any(e.loss.needs_indices for e in self.features)

    def trained_modules(self) -> list[torch.nn.Module]:
        """What trains besides the model: the bridge and the feature losses' own parameters."""
        return [*([self.bridge] if self.bridge is not None else []), *(e.loss for e in self.features)]

    def student_points(self, index: int) -> tuple[str, ...]:
        """Split points whose features sub-model ``index`` must give in its pass: those its own
        feature edges read, those a smaller student reads from it, and the bridge's."""
        wanted = {p for e in self.features if e.student == index for p in e.student_points}
        wanted |= {p for e in self.features if e.teacher == index for p in e.teacher_points}
        if self.bridge is not None and index == 0:
            wanted.add(self.bridge.student_split)
        return tuple(sorted(wanted))


@attrs.frozen
class StepOutput:
    """Detached results of a step, left on the device: the summed loss and correct counts."""

    loss: Tensor
    correct: Tensor  # [n] correct predictions per sub-model


def hard_labels(y: Tensor) -> Tensor:
    """Class indices ``[B]``: ``y`` itself, or the largest share of mixed targets ``[B, C]`` (the
    training accuracy under mixup / CutMix counts the dominant class)."""
    return y if y.dim() == 1 else y.argmax(-1)


@attrs.frozen(eq=False)
class Teachers:
    """The frozen earlier stages a stage learns from and which of their outputs it needs."""

    models: Mapping[str, FlexibleBackbone]
    #: external graph node -> (stage, sub-model index)
    nodes: Mapping[str, tuple[str, int]]
    #: the stage whose full logits a bridge compares with (None: no bridge)
    bridge_stage: str | None = None
    #: external node -> the split points whose features feature losses read from it
    points: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    #: that output as (stage, sub-model index); derived
    bridge_output: tuple[str, int] | None = attrs.field(init=False)
    #: stage -> sub-model index -> the points wanted from it (empty: logits alone); derived
    wanted: dict[str, dict[int, tuple[str, ...]]] = attrs.field(init=False)

    @bridge_output.default
    def _bridge_output(self) -> tuple[str, int] | None:
        if self.bridge_stage is None:
            return None
        return self.bridge_stage, self.models[self.bridge_stage].num_submodels - 1

    @wanted.default
    def _wanted(self) -> dict[str, dict[int, tuple[str, ...]]]:
        want: dict[str, dict[int, set[str]]] = {}
        for node, (stage, index) in self.nodes.items():
            want.setdefault(stage, {}).setdefault(index, set()).update(self.points.get(node, ()))
        if self.bridge_output is not None:
            stage, index = self.bridge_output
            want.setdefault(stage, {}).setdefault(index, set())
        order = {stage: self.models[stage].split_points() for stage in want}
        return {stage: {i: tuple(sorted(p, key=order[stage].index)) for i, p in indices.items()}
                for stage, indices in want.items()}

    @torch.no_grad()
    def outputs(self, x: Tensor, dtype: torch.dtype | None
                ) -> tuple[dict[tuple[str, int], Tensor], dict[tuple[str, int], dict[str, Tensor]]]:
        """fp32 logits of every wanted output, and the features wanted from it by split point,
        from one pass of each frozen model (eval mode): features come from the same forward as
        the logits."""
        logits: dict[tuple[str, int], Tensor] = {}
        feats: dict[tuple[str, int], dict[str, Tensor]] = {}
        for stage, indices in self.wanted.items():
            model = self.models[stage]
            xs = normalise(model, x)     # each frozen model with its own statistics
            with autocast(x.device, dtype):
                plain = [i for i, p in indices.items() if not p]
                if model.single_pass and len(plain) > 1:
                    every = model(xs)
                    logits.update({(stage, i): every[i] for i in plain})
                else:
                    logits.update({(stage, i): model.forward_submodel(xs, i) for i in plain})
                for i, points in indices.items():
                    if points:
                        f, logits[(stage, i)] = model.forward_features(xs, i, points)
                        feats[(stage, i)] = dict(zip(points, f))
        return ({k: a.float() for k, a in logits.items()},
                {k: {p: f.float() for p, f in fs.items()} for k, fs in feats.items()})


def single_pass_backward(
    model: FlexibleBackbone | Runner,
    x: Tensor,
    y: Tensor,
    loss: LossSettings,
    external: Mapping[str, Tensor] | None = None,
) -> StepOutput:
    """One forward yields every sub-model; one backward of the summed graph loss."""
    with autocast(x.device, loss.dtype):
        logits = as_runner(model)(x)
    total = distillation_loss(logits, y, loss.graph, lam=loss.lam, tau=loss.tau,
                              divergence=loss.divergence, external=external, epoch=loss.epoch)
    loss.backward(total)
    hard = hard_labels(y)
    correct = torch.stack([(a.detach().argmax(-1) == hard).sum() for a in logits])
    return StepOutput(total.detach(), correct)


def multi_pass_backward(
    model: FlexibleBackbone | Runner,
    x: Tensor,
    y: Tensor,
    loss: LossSettings,
    external: Mapping[str, Tensor] | None = None,
    *,
    external_features: Mapping[str, Mapping[str, Tensor]] | None = None,
    bridge_logits: Tensor | None = None,
    indices: Tensor | None = None,
) -> StepOutput:
    """Sub-models largest first; each loss is backpropagated as soon as it exists, so at most
    one sub-model's activations are alive. Teachers' detached logits (and features) are kept only
    while a smaller student still needs them. Gradients accumulate: the caller zeroes and steps.
    Under DDP every backward but the last runs under ``no_sync``: one all-reduce per step.

    Sub-model ``i``'s loss is ``L_i`` of the graph plus its feature edges' terms; with a bridge
    (one sub-model), ``alpha * L_bridge + (1 - alpha) * (L_0 + features)``.
    """
    run = as_runner(model, loss.bridge, loss.features)
    n, g = run.num_submodels, loss.graph
    needed_until = {t: g.last_student_of(t) for t in g.internal_teachers()}
    teachers: dict[int | str, Tensor] = {}
    teachers.update(external or {})
    feats: dict[Node, Mapping[str, Tensor]] = {}
    feats.update(external_features or {})
    total = torch.zeros((), device=x.device)
    correct = torch.zeros(n, dtype=torch.long, device=x.device)
    hard = hard_labels(y)
    batch = FeatureBatch(y, indices, loss.epoch)
    for i in reversed(range(n)):
        points = loss.student_points(i)
        edges = [e for e in loss.features if e.student == i]
        with run.no_sync() if i > 0 else contextlib.nullcontext():
            with autocast(x.device, loss.dtype):
                if points:
                    request = Pass(i, points, [feats[e.teacher] for e in edges], batch,
                                   BridgeBatch(y, bridge_logits, loss.tau)
                                   if loss.bridge is not None and bridge_logits is not None else None)
                    logits, own, term, bridged = run.forward_pass(x, request)
                else:
                    logits, own, term, bridged = run.forward_submodel(x, i), {}, None, None
            li = submodel_loss(i, logits, y, g, teachers, lam=loss.lam, tau=loss.tau,
                               divergence=loss.divergence, epoch=loss.epoch)
            if term is not None:
                li = li + term
            if bridged is not None:
                assert loss.bridge is not None
                li = loss.bridge.alpha * bridged + (1.0 - loss.bridge.alpha) * li
            loss.backward(li)
        total += li.detach()
        correct[i] = (logits.detach().argmax(-1) == hard).sum()
        if i in needed_until:
            teachers[i] = logits.detach()
            if own:
                feats[i] = own
        for t, last in list(needed_until.items()):
            if last == i:
                teachers.pop(t, None)
                feats.pop(t, None)
    return StepOutput(total, correct)


def feature_term(edges: Sequence[FeatureEdge], own: Mapping[str, Tensor],
                 teacher_feats: Sequence[Mapping[str, Tensor]], batch: FeatureBatch) -> Tensor | None:
    """``sum_e weight_e * F_e(phi_s, sg(phi_t))`` over a sub-model's feature edges, in fp32."""
    if not edges:
        return None
    first = next(iter(own.values()))
    with fp32(first):
        total = first.new_zeros((), dtype=torch.float32)
        for e, theirs in zip(edges, teacher_feats):
            s = [own[p].float() for p in e.student_points]
            t = [theirs[p].detach().float() for p in e.teacher_points]
            total = total + e.weight * e.loss(s, t, batch)
    return total


class TeacherOutputs(Protocol):
    """What a step reads its teachers' outputs from: :class:`Teachers` (the frozen models) or a
    batch of a teacher store (:class:`kdreg.store.replay.StoredOutputs`)."""

    @property
    def nodes(self) -> Mapping[str, tuple[str, int]]: ...

    @property
    def bridge_output(self) -> tuple[str, int] | None: ...

    def outputs(self, x: Tensor, dtype: torch.dtype | None
                ) -> tuple[dict[tuple[str, int], Tensor], dict[tuple[str, int], dict[str, Tensor]]]: ...


def stage_backward(
    model: FlexibleBackbone | Runner,
    x: Tensor,
    y: Tensor,
    loss: LossSettings,
    teachers: TeacherOutputs | None = None,
    indices: Tensor | None = None,
) -> StepOutput:
    """A stage's forward and backward: frozen teachers' outputs first (once, on this batch, their
    features from the same forward), then the student. ``indices`` are the batch's training-set
    indices (for feature losses that read them)."""
    external: dict[str, Tensor] = {}
    external_features: dict[str, dict[str, Tensor]] = {}
    bridge_logits = None
    if teachers is not None:
        logits, feats = teachers.outputs(x, loss.dtype)
        external = {node: logits[key] for node, key in teachers.nodes.items()}
        external_features = {node: feats[key] for node, key in teachers.nodes.items() if key in feats}
        if teachers.bridge_output is not None:
            bridge_logits = logits[teachers.bridge_output]
    if _one_pass(model, loss):
        return single_pass_backward(model, x, y, loss, external)
    return multi_pass_backward(model, x, y, loss, external, external_features=external_features,
                               bridge_logits=bridge_logits, indices=indices)


def backward(model: FlexibleBackbone | Runner, x: Tensor, y: Tensor, loss: LossSettings,
             external: Mapping[str, Tensor] | None = None) -> StepOutput:
    """The student's forward and backward given the frozen teachers' logits ``external``."""
    if _one_pass(model, loss):
        return single_pass_backward(model, x, y, loss, external)
    return multi_pass_backward(model, x, y, loss, external)


def _one_pass(model: FlexibleBackbone | Runner, loss: LossSettings) -> bool:
    """Whether the step is one forward of every sub-model and one backward: a single-pass model
    whose loss reads no features (no feature losses, no bridge)."""
    return model.single_pass and not loss.features and loss.bridge is None
