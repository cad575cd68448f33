"""One training step over every sub-model of a flexible backbone."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import attrs
import torch
from torch import Tensor

from kdreg.backbone import FlexibleBackbone
from kdreg.bridge import Bridge, BridgeBatch
from kdreg.divergence import Divergence
from kdreg.engine.device import autocast
from kdreg.engine.runner import Runner, as_runner
from kdreg.graph import TeacherGraph
from kdreg.losses import as_divergence, distillation_loss, submodel_loss
from kdreg.normalise import normalise


@attrs.frozen
class LossSettings:
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

    def backward(self, value: Tensor) -> None:
        (self.scaler.scale(value) if self.scaler is not None else value).backward()


@attrs.frozen
class StepOutput:
    """Detached results of a step, left on the device: the summed loss and correct counts."""

    loss: Tensor
    correct: Tensor  # [n] correct predictions per sub-model


def hard_labels(y: Tensor) -> Tensor:
    """Class indices ``[B]``: ``y`` itself, or the largest share of mixed targets ``[B, C]`` (the
    training accuracy under mixup / CutMix counts the dominant class)."""
    return y if y.dim() == 1 else y.argmax(-1)


def multi_pass_backward(
    model: FlexibleBackbone | Runner,
    x: Tensor,
    y: Tensor,
    loss: LossSettings,
    external: Mapping[str, Tensor] | None = None,
) -> StepOutput:
    """Sub-models largest first; each loss is backpropagated as soon as it exists, so at most
    one sub-model's activations are alive. Teachers' detached logits are kept only while a
    smaller student still needs them. Gradients accumulate: the caller zeroes and steps. Under
    DDP every backward but the last runs under ``no_sync``: one all-reduce per step."""
    run = as_runner(model)
    n, g = run.num_submodels, loss.graph
    needed_until = {t: g.last_student_of(t) for t in g.internal_teachers()}
    teachers: dict[int | str, Tensor] = {}
    teachers.update(external or {})
    total = torch.zeros((), device=x.device)
    correct = torch.zeros(n, dtype=torch.long, device=x.device)
    hard = hard_labels(y)
    for i in reversed(range(n)):
        with run.no_sync() if i > 0 else contextlib.nullcontext():
            with autocast(x.device, loss.dtype):
                logits = run.forward_submodel(x, i)
            li = submodel_loss(i, logits, y, g, teachers, lam=loss.lam, tau=loss.tau,
                               divergence=loss.divergence, epoch=loss.epoch)
            loss.backward(li)
        total += li.detach()
        correct[i] = (logits.detach().argmax(-1) == hard).sum()
        if i in needed_until:
            teachers[i] = logits.detach()
        for t, last in list(needed_until.items()):
            if last == i:
                teachers.pop(t, None)
    return StepOutput(total, correct)


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


def backward(model: FlexibleBackbone | Runner, x: Tensor, y: Tensor, loss: LossSettings,
             external: Mapping[str, Tensor] | None = None) -> StepOutput:
    """The step's forward and backward passes, chosen by ``model.single_pass``."""
    fn = single_pass_backward if model.single_pass else multi_pass_backward
    return fn(model, x, y, loss, external)


@attrs.frozen(eq=False)
class Teachers:
    """The frozen earlier stages a stage learns from and which of their outputs it needs."""

    models: Mapping[str, FlexibleBackbone]
    #: external graph node -> (stage, sub-model index)
    nodes: Mapping[str, tuple[str, int]]
    #: the stage whose full logits a bridge compares with (None: no bridge)
    bridge_stage: str | None = None
    #: that output as (stage, sub-model index); derived
    bridge_output: tuple[str, int] | None = attrs.field(init=False)
    #: stage -> the sub-models whose outputs are needed; derived once, not per step
    wanted: dict[str, set[int]] = attrs.field(init=False)

    @bridge_output.default
    def _bridge_output(self) -> tuple[str, int] | None:
        if self.bridge_stage is None:
            return None
        return self.bridge_stage, self.models[self.bridge_stage].num_submodels - 1

    @wanted.default
    def _wanted(self) -> dict[str, set[int]]:
        want: dict[str, set[int]] = {}
        for stage, index in [*self.nodes.values(), *filter(None, [self.bridge_output])]:
            want.setdefault(stage, set()).add(index)
        return want

    @torch.no_grad()
    def outputs(self, x: Tensor, dtype: torch.dtype | None) -> dict[tuple[str, int], Tensor]:
        """fp32 logits of every wanted output, from one pass of each frozen model (eval mode)."""
        out: dict[tuple[str, int], Tensor] = {}
        for stage, indices in self.wanted.items():
            model = self.models[stage]
            xs = normalise(model, x)     # each frozen model with its own statistics
            with autocast(x.device, dtype):
                if model.single_pass and len(indices) > 1:
                    every = model(xs)
                    logits = {i: every[i] for i in indices}
                else:
                    logits = {i: model.forward_submodel(xs, i) for i in indices}
            out.update({(stage, i): a.float() for i, a in logits.items()})
        return out


def bridge_backward(
    model: FlexibleBackbone | Runner,
    bridge: Bridge,
    x: Tensor,
    y: Tensor,
    loss: LossSettings,
    external: Mapping[str, Tensor],
    teacher_logits: Tensor,
) -> StepOutput:
    """One forward of a one-sub-model student that also yields its features at the bridge's split;
    ``alpha * L_bridge + (1 - alpha) * L_graph``, one backward."""
    with autocast(x.device, loss.dtype):
        logits, term = as_runner(model, bridge).forward_bridge(x, BridgeBatch(y, teacher_logits, loss.tau))
    graph_loss = distillation_loss([logits], y, loss.graph, lam=loss.lam, tau=loss.tau,
                                   divergence=loss.divergence, external=external, epoch=loss.epoch)
    total = bridge.alpha * term + (1.0 - bridge.alpha) * graph_loss
    loss.backward(total)
    correct = (logits.detach().argmax(-1) == hard_labels(y)).sum().reshape(1)
    return StepOutput(total.detach(), correct)


def stage_backward(
    model: FlexibleBackbone | Runner,
    x: Tensor,
    y: Tensor,
    loss: LossSettings,
    teachers: Teachers | None = None,
    bridge: Bridge | None = None,
) -> StepOutput:
    """A stage's forward and backward: frozen teachers' outputs first (once, on this batch),
    then the student, through the bridge when there is one."""
    if teachers is None:
        return backward(model, x, y, loss)
    outs = teachers.outputs(x, loss.dtype)
    external = {node: outs[key] for node, key in teachers.nodes.items()}
    if bridge is None:
        return backward(model, x, y, loss, external)
    assert teachers.bridge_output is not None
    return bridge_backward(model, bridge, x, y, loss, external, outs[teachers.bridge_output])
