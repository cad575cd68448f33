"""Split points named by modules: any network cut at the outputs of its submodules, with hooks.

A backbone whose network is an ``nn.Module`` with its stages as submodules (torchvision's ResNet:
``layer1 .. layer4``; a timm model: its ``feature_info`` modules; a plugin's own network) gets its
split points by naming those modules: :class:`ModuleSplits` takes the network and the names, and
its :meth:`~ModuleSplits.forward_segment` and :meth:`~ModuleSplits.forward_stages` are the
backbone's (the timm adapter, ``kdreg_plugins.backbones.timm_adapter``, is built this way; see
also docs/plugins.md)::

    class Torchvision(FlexibleBackbone):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net
            self.splits = ModuleSplits(net, ["layer1", "layer2", "layer3", "layer4"],
                                       in_chans=3, input_size=(32, 32))

        def forward(self, x): return [self.net(x)]
        def split_points(self): return self.splits.points
        def forward_segment(self, h, start, end): return self.splits.forward_segment(h, start, end)
        def forward_stages(self, x, points=None):
            return self.splits.forward_stages(x, self.ordered_points(points))

**How segments run.** At build time one traced forward pass records the order in which every
module runs and the shape of its output. ``forward_segment(h, start, end)`` then calls the network
itself: a forward hook at ``end`` stops the pass there (nothing after ``end`` runs); at ``start``
the module's output is replaced by ``h``, and every module that runs entirely before ``start`` is
skipped, returning zeros of its recorded shape. So a back segment costs the back's own compute
plus the small non-module glue before ``start`` (adding a position embedding, concatenating a
class token) applied to those zeros; a front segment costs exactly the front. A named module is
kept as a split point only where this is exact: the build checks, on a random batch, that the back
computed from the front's features reproduces the network's output (about k/2 + 2 forward passes
for k names). A module that runs more than once per pass, whose output is not one batched tensor,
or that a later layer bypasses (it reads an activation from before the module's output) is not a
split point; each is listed with the reason in :attr:`ModuleSplits.rejected`. ``forward_stages``
takes every point's features and the output from one ordinary forward pass with capturing hooks.
Channels-last outputs (``NHWC``) are given channels first; token sequences as ``(tokens, C)``.
Segments assume the input size the network was traced at.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from kdreg.backbone import segment_range
from kdreg.errors import OptionError

_TRACE_BATCH = 3  # odd, so that a batch dimension is not confused with a size of 2
_CHECK_BATCH = 2


class _Stop(Exception):
    """Raised by the hook at a segment's end to stop the forward pass there."""

    def __init__(self, value: Any):
        self.value = value


class ModuleSplits:
    """Split points of ``net`` at the outputs of the modules ``modules`` names (dotted names of
    ``net.named_modules()``, input side first), kept where the cut is exact.

    ``modules`` may map each name to the channel count of its output, which tells a channels-last
    output (``NHWC``, as ``output_fmt`` says) apart from a channels-first one; ``name`` names the
    network in errors. ``net`` is traced and checked at ``input_size`` here, in eval mode and
    without gradients. It is held, not owned: the backbone registers it as its own submodule.
    """

    def __init__(self, net: nn.Module, modules: Sequence[str] | Mapping[str, int], *,
                 in_chans: int, input_size: tuple[int, int], output_fmt: str = "NCHW",
                 name: str | None = None):
        self.net = net
        self.in_chans = in_chans
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.name = name or type(net).__name__
        #: The split points: the exact cuts among the named modules, in the order named.
        self.points: tuple[str, ...] = ()
        #: Channel layout of each split point's module output: NCHW, NHWC or NLC (tokens).
        self.layouts: dict[str, str] = {}
        #: Named modules that are not exact cuts, with the reason.
        self.rejected: dict[str, str] = {}
        self._skips: dict[str, list[tuple[str, list[Any]]]] = {}
        candidates = dict(modules) if isinstance(modules, Mapping) else dict.fromkeys(modules, 0)
        known = dict(net.named_modules())
        missing = [m for m in candidates if m not in known]
        if missing:
            raise OptionError(f"{self.name} has no module {', '.join(map(repr, missing))}")
        if not candidates:
            return
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                calls, outputs = _trace(net, in_chans, self.input_size)
                self._plan(candidates, calls, outputs, output_fmt)
                self._verify()
        finally:
            net.train(was_training)

    # ------------------------------------------------------------------- segments
    def forward_segment(self, h: Tensor, start: str | None, end: str | None) -> Tensor:
        """Run ``net`` from split point ``start`` (None: the input) to ``end`` (None: the output)."""
        segment_range(self.points, start, end)  # both known, start before end
        with ExitStack() as stack:
            x = h
            if start is not None:
                batch = h.shape[0]
                x = torch.zeros(batch, self.in_chans, *self.input_size, dtype=h.dtype,
                                device=h.device)
                for name, specs in self._skips[start]:
                    stack.enter_context(_replaced(self.net.get_submodule(name),
                                                  _placeholder(specs, batch, h)))
                native = _to_native(h, self.layouts[start])
                stack.enter_context(_replaced(self.net.get_submodule(start), lambda: native))
            if end is not None:
                layout = self.layouts[end]

                def stop(_m: nn.Module, _i: Any, out: Tensor) -> None:
                    raise _Stop(to_standard(out, layout))

                stack.callback(self.net.get_submodule(end).register_forward_hook(stop).remove)
            try:
                out = self.net(x)
            except _Stop as s:
                return s.value
        if end is not None:
            raise RuntimeError(f"split point {end!r} of {self.name} never ran")
        return out

    def forward_stages(self, x: Tensor, points: Sequence[str] | None = None) -> tuple[list[Tensor], Tensor]:
        """Features at each of ``points`` (default: every split point) and ``net``'s output, from
        one ordinary forward pass with capturing hooks."""
        wanted = list(self.points if points is None else points)
        for p in wanted:
            segment_range(self.points, p, None)  # a known split point
        with self._capturing(wanted) as feats:
            logits = self.net(x)
        return [feats[p] for p in wanted], logits

    @contextmanager
    def _capturing(self, points: Sequence[str]) -> Iterator[dict[str, Tensor]]:
        feats: dict[str, Tensor] = {}
        handles = []
        for p in dict.fromkeys(points):
            def keep(_m: nn.Module, _i: Any, out: Tensor, p: str = p) -> None:
                feats[p] = to_standard(out, self.layouts.get(p, "NCHW"))

            handles.append(self.net.get_submodule(p).register_forward_hook(keep))
        try:
            yield feats
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------- build-time analysis
    def _plan(self, candidates: dict[str, int], calls: dict[str, list[tuple[int, int]]],
              outputs: dict[str, list[Any]], fmt: str) -> None:
        points = []
        for p, chans in candidates.items():
            if len(calls.get(p, [])) != 1:
                self.rejected[p] = f"runs {len(calls.get(p, []))} times per forward pass"
                continue
            out = outputs[p][0]
            if not isinstance(out, _Spec) or out.batched is False:
                self.rejected[p] = "its output is not a batched tensor"
                continue
            self.layouts[p] = _layout(out.shape, chans, fmt)
            begin = calls[p][0][0]
            done = {m for m, c in calls.items()
                    if m and m != p and all(end < begin for _, end in c)}
            top = [m for m in done if not any(a in done for a in _ancestors(m))]
            self._skips[p] = [(m, outputs[m]) for m in sorted(top, key=lambda m: calls[m][0])]
            points.append(p)
        self.points = tuple(points)

    def _verify(self) -> None:
        gen = torch.Generator().manual_seed(0)
        device = next(self.net.parameters()).device
        x = torch.randn(_CHECK_BATCH, self.in_chans, *self.input_size, generator=gen).to(device)
        full = self.net(x)
        feats, logits = self.forward_stages(x)
        tol = 1e-4 + 1e-3 * float(full.abs().max())
        kept = []
        for p, f in zip(self.points, feats):
            try:
                back = self.forward_segment(f, p, None)
            except Exception as exc:  # noqa: BLE001 - a failing cut is rejected, not fatal
                self.rejected[p] = f"the back segment fails: {type(exc).__name__}: {exc}"
                continue
            if back.shape == full.shape and float((back - full).abs().max()) <= tol:
                kept.append(p)
            else:
                self.rejected[p] = "later layers read activations from before it"
        self.points = tuple(kept)
        if not torch.allclose(logits, full, atol=tol):
            raise RuntimeError(f"{self.name}: capturing hooks changed the output")


class _Spec:
    """Shape and dtype of one recorded output tensor; ``batched``: dim 0 is the batch."""

    __slots__ = ("shape", "dtype", "batched")

    def __init__(self, t: Tensor):
        self.batched = t.dim() > 0 and t.shape[0] == _TRACE_BATCH
        self.shape = tuple(t.shape[1:]) if self.batched else tuple(t.shape)
        self.dtype = t.dtype


def _spec_of(value: Any) -> Any:
    if isinstance(value, Tensor):
        return _Spec(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_spec_of(v) for v in value)
    if isinstance(value, dict):
        return {k: _spec_of(v) for k, v in value.items()}
    return value


def _build(spec: Any, batch: int, like: Tensor) -> Any:
    if isinstance(spec, _Spec):
        shape = (batch, *spec.shape) if spec.batched else spec.shape
        dtype = like.dtype if spec.dtype.is_floating_point else spec.dtype
        return torch.zeros(shape, dtype=dtype, device=like.device)
    if isinstance(spec, (list, tuple)):
        return type(spec)(_build(s, batch, like) for s in spec)
    if isinstance(spec, dict):
        return {k: _build(s, batch, like) for k, s in spec.items()}
    return spec


def _placeholder(specs: list[Any], batch: int, like: Tensor) -> Callable[[], Any]:
    """Zeros shaped as the module's recorded outputs, one call after another."""
    counter = itertools.count()
    return lambda: _build(specs[min(next(counter), len(specs) - 1)], batch, like)


@contextmanager
def _replaced(module: nn.Module, result: Callable[[], Any]) -> Iterator[None]:
    """Within the block, ``module(...)`` returns ``result()`` without running its forward."""
    own = module.__dict__.get("forward")
    object.__setattr__(module, "forward", lambda *args, **kwargs: result())
    try:
        yield
    finally:
        if own is None:
            del module.__dict__["forward"]
        else:
            object.__setattr__(module, "forward", own)


def _trace(net: nn.Module, in_chans: int, size: tuple[int, int]
           ) -> tuple[dict[str, list[tuple[int, int]]], dict[str, list[Any]]]:
    """Run ``net`` once; per module name: (enter, exit) event numbers and output specs of each call."""
    clock = itertools.count()
    starts: dict[str, list[int]] = {}
    calls: dict[str, list[tuple[int, int]]] = {}
    outputs: dict[str, list[Any]] = {}
    handles = []
    for name, module in net.named_modules():
        def enter(_m: nn.Module, _i: Any, name: str = name) -> None:
            starts.setdefault(name, []).append(next(clock))

        def leave(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            calls.setdefault(name, []).append((starts[name].pop(), next(clock)))
            outputs.setdefault(name, []).append(_spec_of(out))

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    device = next(net.parameters()).device
    try:
        net(torch.zeros(_TRACE_BATCH, in_chans, *size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return calls, outputs


def _ancestors(name: str) -> Iterator[str]:
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


def _layout(shape: tuple[int, ...], chans: int, fmt: str) -> str:
    """NCHW, NHWC (channels last, as timm's ``output_fmt`` says) or NLC (tokens)."""
    if len(shape) == 3:
        if shape[2] == chans and (fmt == "NHWC" or shape[0] != chans):
            return "NHWC"
        return "NCHW"
    return "NLC" if len(shape) == 2 else "N"


def to_standard(t: Tensor, layout: str) -> Tensor:
    """A module output of layout ``layout`` as kdreg gives features: channels first for NHWC."""
    return t.permute(0, 3, 1, 2) if layout == "NHWC" else t


def _to_native(t: Tensor, layout: str) -> Tensor:
    return t.permute(0, 2, 3, 1) if layout == "NHWC" else t
