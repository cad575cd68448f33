"""How a training step calls the model it trains: directly, through DistributedDataParallel, or
compiled with ``torch.compile``.

A :class:`Runner` offers the three calls a step makes (every sub-model, one sub-model, one
sub-model's pass with its features and the terms computed from them) and ``no_sync()``, the context in which a backward pass
only accumulates gradients. Under torchrun the calls go through one ``DistributedDataParallel``
module, so gradients are all-reduced by PyTorch's own reducer: once per step, in the last backward
of the step (a multi-pass model runs its other sub-models under ``no_sync``), every width's
BatchNorm parameters included. Frozen teachers are never wrapped.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from kdreg.backbone import FlexibleBackbone
from kdreg.bridge import Bridge, BridgeBatch
from kdreg.engine import distributed
from kdreg.errors import UserError
from kdreg.normalise import normalise


@attrs.frozen(eq=False)
class Pass:
    """One sub-model's pass that gives features: sub-model ``index``, the split ``points`` whose
    features it returns, the teacher features of each of its feature edges (in the order of the
    runner's edges whose student it is), the feature batch and the bridge's batch (None: no
    bridge term)."""

    index: int
    points: tuple[str, ...]
    teacher_features: Sequence[Mapping[str, Tensor]]
    batch: Any                       # kdreg.feature_loss.FeatureBatch
    bridge: BridgeBatch | None = None


class Runner:
    """The model as a training step calls it (see the module docstring)."""

    def __init__(self, model: FlexibleBackbone, call: Callable[..., Any],
                 no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
                 ddp: nn.Module | None = None, bridge: Bridge | None = None,
                 features: Sequence[Any] = ()):
        self.model = model
        self.bridge = bridge
        #: the stage's feature edges (:class:`kdreg.engine.step.FeatureEdge`)
        self.features = tuple(features)
        self._call = call                    # call(x, kind, arg) -> the model's output
        self._no_sync = no_sync
        #: the DistributedDataParallel module under torchrun (None in one process)
        self.ddp = ddp

    @classmethod
    def plain(cls, model: FlexibleBackbone, bridge: Bridge | None = None,
              features: Sequence[Any] = ()) -> Runner:
        return cls(model, _Entry(model, bridge, features), bridge=bridge, features=features)

    @property
    def num_submodels(self) -> int:
        """The sub-models a training step trains."""
        return self.model.num_train_submodels

    @property
    def single_pass(self) -> bool:
        return self.model.single_pass

    def __call__(self, x: Tensor) -> list[Tensor]:
        """Logits of every sub-model, smallest first."""
        out: list[Tensor] = self._call(x, "all", None)
        return out

    def forward_submodel(self, x: Tensor, index: int) -> Tensor:
        out: Tensor = self._call(x, "submodel", index)
        return out

    def forward_pass(self, x: Tensor, request: Pass
                     ) -> tuple[Tensor, dict[str, Tensor], Tensor | None, Tensor | None]:
        """Sub-model ``request.index``'s logits, its features at ``request.points`` (detached),
        the sum of its feature edges' weighted terms (None: none) and its bridge's term (None:
        none). The feature losses and the bridge run inside the same forward, so that under DDP
        their own parameters are reduced with the model's."""
        out: tuple[Tensor, dict[str, Tensor], Tensor | None, Tensor | None] = self._call(x, "pass", request)
        return out

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """Backward passes in this context accumulate gradients without all-reducing them."""
        return self._no_sync() if self._no_sync is not None else contextlib.nullcontext()


def as_runner(model: FlexibleBackbone | Runner, bridge: Bridge | None = None,
              features: Sequence[Any] = ()) -> Runner:
    """``model`` itself when it is a runner; else a plain runner of the model with ``bridge``
    and the feature edges ``features``."""
    if isinstance(model, Runner):
        return model
    return Runner.plain(model, bridge, features)


class _Entry(nn.Module):
    """One ``forward`` for the three calls, as DistributedDataParallel needs (its reducer is
    prepared in ``forward``). The bridge and the feature losses are held so that their own
    parameters are replicated too."""

    def __init__(self, model: FlexibleBackbone, bridge: Bridge | None = None, features: Sequence[Any] = ()):
        super().__init__()
        self.model = model
        self.bridge = bridge
        self.edges = tuple(features)
        self.feature_losses = nn.ModuleList(e.loss for e in self.edges)

    def forward(self, x: Tensor, kind: str, arg: Any) -> Any:  # noqa: D102
        x = normalise(self.model, x)
        if kind == "all":
            return self.model(x)
        if kind == "submodel":
            return self.model.forward_submodel(x, arg)
        from kdreg.engine.step import feature_term

        request: Pass = arg
        order = self.model.split_points()
        points = sorted(set(request.points), key=order.index)
        f, logits = self.model.forward_features(x, request.index, points)
        own = dict(zip(points, f))
        edges = [e for e in self.edges if e.student == request.index]
        term = feature_term(edges, own, request.teacher_features, request.batch)
        bridged = None
        if request.bridge is not None:
            if self.bridge is None:
                raise TypeError("a bridge term needs a runner built with the stage's bridge")
            bridged = self.bridge(own[self.bridge.student_split], request.bridge)
        return logits, {p: v.detach() for p, v in own.items()}, term, bridged


def build_runner(model: FlexibleBackbone, bridge: Bridge | None, device: torch.device, *,
                 features: Sequence[Any] = (), sync_bn: bool = False, compile: bool = False,
                 compile_backend: str = "inductor", say: Callable[[str], None] | None = None) -> Runner:
    """The runner of a stage: DDP under torchrun (with SyncBatchNorm when ``sync_bn``), compiled
    when ``compile`` (falling back to eager execution, with a message, when compilation fails)."""
    say = say or _say
    entry = _Entry(model, bridge, features)
    call: Callable[..., Any] = entry
    no_sync, ddp = None, None
    if distributed.active() and any(p.requires_grad for p in entry.parameters()):
        from torch.nn.parallel import DistributedDataParallel

        if sync_bn:
            if device.type != "cuda":
                raise UserError("sync_bn needs CUDA (SyncBatchNorm does not run on the CPU) "
                                "@ recipe.train.sync_bn")
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # find_unused_parameters: a slimmable width or an exit uses only some parameters, and
        # the other sub-models' gradients, accumulated under no_sync, are reduced with them.
        ddp = DistributedDataParallel(entry, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True, forward_sync_buffers=False)
        call, no_sync = ddp, ddp.no_sync
    if compile:
        call = _compiled(call, compile_backend, say)
    return Runner(model, call, no_sync, ddp, bridge, features)


def _compiled(fn: Callable[..., Any], backend: str, say: Callable[[str], None]) -> Callable[..., Any]:
    """``torch.compile(fn)``; the eager ``fn`` (and one message) if compiling fails."""
    try:
        compiled = torch.compile(fn, backend=backend)
    except Exception as exc:  # noqa: BLE001 - any failure falls back to eager execution
        say(f"torch.compile (backend {backend!r}) failed: {type(exc).__name__}: {exc}; training without it")
        return fn
    failed = False

    def call(*args: Any) -> Any:
        nonlocal failed
        if not failed:
            try:
                return compiled(*args)
            except Exception as exc:  # noqa: BLE001
                failed = True
                say(f"torch.compile (backend {backend!r}) failed: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}; training without it")
        return fn(*args)

    return call


def _say(message: str) -> None:
    if distributed.is_main():
        print(f"warning: {message}", file=sys.stderr, flush=True)
