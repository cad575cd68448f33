"""Any timm model as a plain kdreg backbone (``backbone = { name = "timm", model = "resnet18" }``).

The model is built with ``pretrained=False`` (a local weights file may be given), with the number of
classes and input channels of the data; models that take an ``img_size`` (ViT, DeiT, Mixer, Swin,
...) are built for the data's input size. An input too small for the model's total stride is an
:class:`~kdreg.errors.OptionError` naming the smallest square input that works.

**Split points** are timm's own module names of the model's ``feature_info`` stages, so they read
as in timm's documentation: ``act1, layer1 .. layer4`` (ResNet), ``stages.0 .. stages.3``
(ConvNeXt, RepVGG, ...), ``blocks.0 ..`` (EfficientNet, MobileNetV3, ViT, Mixer), ``s1 .. s4``
(RegNet), ``features.denseblock1 ..`` (DenseNet). Channels-last stage outputs (Swin) are given as
``(C, H, W)``; token sequences as ``(tokens, C)``, prefix tokens included.

**How segments run.** At build time one traced forward pass records the order in which every
module runs and the shape of its output. ``forward_segment(h, start, end)`` then calls the timm
model itself: a forward hook at ``end`` stops the pass there (nothing after ``end`` runs); at
``start`` the module's output is replaced by ``h``, and every module that runs entirely before
``start`` is skipped, returning zeros of its recorded shape. So a back segment costs the back's own
compute plus the small non-module glue before ``start`` (adding a position embedding, concatenating
a class token) applied to those zeros; a front segment costs exactly the front. A stage boundary is
kept as a split point only where this is exact: the build checks, on a random batch, that the back
computed from the front's features reproduces the model's logits (about k/2 + 2 forward passes for
k stages). Boundaries that a later layer bypasses (it reads an activation from before the
boundary) fail that check; stages whose output is not one tensor (HRNet's and TNT's lists and
pairs) and feature_info names that match no module (Twins, MViTv2) are not split points either;
all are listed with the reason in ``rejected_points``.

``forward_stages`` takes every stage's features and the logits from one ordinary forward pass with
capturing hooks: the same tensors ``forward_front`` returns, which ``forward_intermediates`` would
not give (it reshapes tokens to maps and drops prefix tokens). Segments assume the input size the
model was built for.
"""

from __future__ import annotations

import copy
import difflib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdreg.backbone import FlexibleBackbone
from kdreg.errors import ExportError, OptionError

#: Options that kdreg sets itself and a recipe may not pass through ``model_options``.
RESERVED = ("pretrained", "num_classes", "in_chans", "features_only")
_TRACE_BATCH = 3  # odd, so that a batch dimension is not confused with a size of 2
_CHECK_BATCH = 2


def register(register: Any) -> None:
    register("timm", build_timm, description="any model of timm.list_models() (pretrained=False)")


def build_timm(
    *,
    num_classes: int,
    in_chans: int,
    input_size: tuple[int, int],
    model: str,
    pretrained_file: str | None = None,
    model_options: Mapping[str, Any] = {},
) -> TimmBackbone:
    """Build timm model ``model`` as a plain backbone (one sub-model, ``full``).

    ``pretrained_file`` is a local weights file (``.pth``/``.pt``/``.safetensors``), loaded strictly;
    ``model_options`` are extra keyword arguments for ``timm.create_model``.
    """
    check_model_name(model)
    bad = sorted(set(model_options) & set(RESERVED))
    if bad:
        raise OptionError(
            f"model_options may not set {', '.join(bad)}: kdreg sets them from the data "
            "(use pretrained_file for weights)",
            key="model_options",
        )
    size = (int(input_size[0]), int(input_size[1]))
    net = _create(model, num_classes, in_chans, size, dict(model_options))
    if pretrained_file is not None:
        load_weights(net, pretrained_file, model)
    return TimmBackbone(net, model_name=model, in_chans=in_chans, input_size=size)


def check_model_name(model: str) -> None:
    """Raise an :class:`OptionError` listing close matches when timm has no model ``model``."""
    import timm  # imported on use: it takes a second, and most runs need no timm model

    base = model.split(".", 1)[0]
    if timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise OptionError(f"unknown timm model {model!r}{hint} (see timm.list_models())", key="model")


# ----------------------------------------------------------------------------- building
def _create(
    name: str, num_classes: int, in_chans: int, size: tuple[int, int], options: dict[str, Any]
) -> nn.Module:
    kwargs = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans, **options}
    sized = "img_size" not in options
    try:
        net = _create_sized(name, kwargs, size if sized else None)
    except TypeError as exc:
        raise OptionError(f"timm model {name!r} rejects its options: {exc}", key="model_options") from None
    except Exception as exc:  # noqa: BLE001 - reported with the input size that caused it
        raise _build_error(name, kwargs, size, sized, exc) from None
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(_CHECK_BATCH, in_chans, *size))
        if not isinstance(out, Tensor) or tuple(out.shape) != (_CHECK_BATCH, num_classes):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise RuntimeError(f"output {got} is not [batch, {num_classes}]")
    except Exception as exc:  # noqa: BLE001 - reported with the input size that caused it
        raise _build_error(name, kwargs, size, sized, exc) from None
    net.train()
    return net


def _create_sized(name: str, kwargs: dict[str, Any], size: tuple[int, int] | None) -> nn.Module:
    """``timm.create_model``, passing ``img_size`` to the models that take one."""
    import timm

    if size is not None:
        try:
            return timm.create_model(name, img_size=size, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, **kwargs)


def _build_error(
    name: str, kwargs: dict[str, Any], size: tuple[int, int], sized: bool, exc: BaseException
) -> OptionError:
    """The model fails at ``size``: say so, with the smallest square input that works if any."""
    text = str(exc).strip()
    reason = (text.splitlines()[0] if text else type(exc).__name__)[:200]
    smallest = smallest_input(name, kwargs, min(size), sized)
    if smallest is None:
        key = "model_options" if set(kwargs) - {"pretrained", "num_classes", "in_chans"} else "model"
        return OptionError(f"timm model {name!r} cannot be built or run: {reason}", key=key)
    return OptionError(
        f"timm model {name!r} does not support input size {size[0]}x{size[1]} ({reason}); "
        f"the smallest square input it supports is {smallest}x{smallest}",
        key="model",
    )


def smallest_input(name: str, kwargs: dict[str, Any], above: int, sized: bool) -> int | None:
    """The smallest square input side larger than ``above`` that ``name`` runs on, or None.

    Sides are tried on the meta device (shapes only, no compute): multiples of 8 up to 512, then
    the sides just below the first that works.
    """

    def works(side: int) -> bool:
        try:
            with torch.device("meta"):
                net = _create_sized(name, kwargs, (side, side) if sized else None)
                net.eval()
                out = net(torch.zeros(1, kwargs["in_chans"], side, side))
            return isinstance(out, Tensor) and out.shape[-1] == kwargs["num_classes"]
        except Exception:  # noqa: BLE001 - any failure means this side does not work
            return False

    start = (above // 8 + 1) * 8
    for side in range(start, 513, 8):
        if works(side):
            for lower in range(max(above + 1, side - 7), side):
                if works(lower):
                    return lower
            return side
    return None


def load_weights(net: nn.Module, path: str, model: str) -> None:
    """Load the state dict in ``path`` into ``net`` strictly, naming the file on a mismatch."""
    from timm.models import load_state_dict

    file = Path(path).expanduser()
    if not file.is_file():
        raise OptionError(f"weights file {str(file)!r} not found", key="pretrained_file")
    try:
        state = load_state_dict(str(file), use_ema=False, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
        raise OptionError(
            f"cannot read weights file {str(file)!r}: {type(exc).__name__}: {exc}",
            key="pretrained_file",
        ) from None
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], Tensor) and state[k].shape != own[k].shape
    ]
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                       ("shape mismatches (file vs model)", shapes)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{what}: {', '.join(keys[:5])}{more}")
    if problems:
        raise OptionError(
            f"weights file {str(file)!r} does not fit timm model {model!r}: " + "; ".join(problems),
            key="pretrained_file",
        )
    net.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- the backbone
class _Stop(Exception):
    """Raised by the hook at a segment's end to stop the forward pass there."""

    def __init__(self, value: Any):
        self.value = value


class TimmBackbone(FlexibleBackbone):
    """A timm model as a plain backbone whose split points are its ``feature_info`` stages."""

    submodel_labels = ("full",)
    single_pass = True

    def __init__(self, net: nn.Module, *, model_name: str, in_chans: int,
                 input_size: tuple[int, int]):
        super().__init__()
        self.net = net
        self.model_name = model_name
        self.in_chans = in_chans
        self.input_size = tuple(input_size)  # type: ignore[assignment]
        #: Channel layout of each split point's module output: NCHW, NHWC or NLC (tokens).
        self.layouts: dict[str, str] = {}
        #: Stage boundaries that are not exact cuts, with the reason.
        self.rejected_points: dict[str, str] = {}
        self._skips: dict[str, list[tuple[str, list[Any]]]] = {}
        self._points: tuple[str, ...] = ()
        self._find_points()

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.net(x)]

    def split_points(self) -> tuple[str, ...]:
        return self._points

    # ------------------------------------------------------------------- segments
    def forward_segment(self, h: Tensor, start: str | None, end: str | None) -> Tensor:
        points = self.split_points()
        for p in (start, end):
            if p is not None:
                self.check_split(p)
        if start is not None and end is not None and points.index(start) >= points.index(end):
            raise OptionError(f"split point {start!r} does not come before {end!r}")
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
                    raise _Stop(_to_standard(out, layout))

                stack.callback(self.net.get_submodule(end).register_forward_hook(stop).remove)
            try:
                out = self.net(x)
            except _Stop as s:
                return s.value
        if end is not None:
            raise RuntimeError(f"split point {end!r} of timm model {self.model_name} never ran")
        return out

    def export_front(self, split: str) -> nn.Module:
        """The model up to ``split`` as a standalone module: timm's fx feature extractor on a copy
        of the model, which keeps only the modules and operations the features there use."""
        from timm.models import create_feature_extractor

        self.check_split(split)
        try:
            graph = create_feature_extractor(copy.deepcopy(self.net).eval(),
                                             return_nodes={split: "features"})
        except Exception as exc:  # noqa: BLE001 - a model fx cannot trace; reported with the reason
            raise ExportError(f"timm model {self.model_name} cannot be traced up to {split!r} for "
                              f"export: {type(exc).__name__}: {exc}") from None
        return TimmFront(graph, self.layouts[split]).eval()

    def forward_stages(self, x: Tensor, points: Sequence[str] | None = None) -> tuple[list[Tensor], Tensor]:
        wanted = self.ordered_points(points)
        with self._capturing(wanted) as feats:
            logits = self.net(x)
        return [feats[p] for p in wanted], logits

    @contextmanager
    def _capturing(self, points: Sequence[str]) -> Iterator[dict[str, Tensor]]:
        feats: dict[str, Tensor] = {}
        handles = []
        for p in dict.fromkeys(points):
            def keep(_m: nn.Module, _i: Any, out: Tensor, p: str = p) -> None:
                feats[p] = _to_standard(out, self.layouts.get(p, "NCHW"))

            handles.append(self.net.get_submodule(p).register_forward_hook(keep))
        try:
            yield feats
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------- build-time analysis
    def _find_points(self) -> None:
        info = getattr(self.net, "feature_info", None) or []
        modules = dict(self.net.named_modules())
        candidates: dict[str, int] = {}
        for item in info:
            name = item.get("module") if isinstance(item, Mapping) else None
            if not name or name in candidates:
                continue
            if name not in modules:
                self.rejected_points[name] = "timm's feature_info names a module the model lacks"
                continue
            candidates[name] = int(item.get("num_chs", 0))
        if not candidates:
            return
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                calls, outputs = _trace(self.net, self.in_chans, self.input_size)
                self._plan(candidates, calls, outputs)
                self._verify()
        finally:
            self.net.train(was_training)

    def _plan(self, candidates: dict[str, int], calls: dict[str, list[tuple[int, int]]],
              outputs: dict[str, list[Any]]) -> None:
        fmt = str(getattr(self.net, "output_fmt", "NCHW"))
        points = []
        for p, chans in candidates.items():
            if len(calls.get(p, [])) != 1:
                self.rejected_points[p] = f"runs {len(calls.get(p, []))} times per forward pass"
                continue
            out = outputs[p][0]
            if not isinstance(out, _Spec) or out.batched is False:
                self.rejected_points[p] = "its output is not a batched tensor"
                continue
            self.layouts[p] = _layout(out.shape, chans, fmt)
            begin = calls[p][0][0]
            done = {m for m, c in calls.items()
                    if m and m != p and all(end < begin for _, end in c)}
            top = [m for m in done if not any(a in done for a in _ancestors(m))]
            self._skips[p] = [(m, outputs[m]) for m in sorted(top, key=lambda m: calls[m][0])]
            points.append(p)
        self._points = tuple(points)

    def _verify(self) -> None:
        gen = torch.Generator().manual_seed(0)
        device = next(self.net.parameters()).device
        x = torch.randn(_CHECK_BATCH, self.in_chans, *self.input_size, generator=gen).to(device)
        full = self.net(x)
        feats, logits = self.forward_stages(x)
        tol = 1e-4 + 1e-3 * float(full.abs().max())
        kept = []
        for p, f in zip(self._points, feats):
            try:
                back = self.forward_segment(f, p, None)
            except Exception as exc:  # noqa: BLE001 - a failing cut is rejected, not fatal
                self.rejected_points[p] = f"the back segment fails: {type(exc).__name__}: {exc}"
                continue
            if back.shape == full.shape and float((back - full).abs().max()) <= tol:
                kept.append(p)
            else:
                self.rejected_points[p] = "later layers read activations from before it"
        self._points = tuple(kept)
        if not torch.allclose(logits, full, atol=tol):
            raise RuntimeError(f"timm model {self.model_name}: capturing hooks changed the output")


class TimmFront(nn.Module):
    """A timm model's front as traced by fx, returning the split point's features channels first."""

    def __init__(self, graph: nn.Module, layout: str):
        super().__init__()
        self.graph = graph
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        return _to_standard(self.graph(x)["features"], self.layout)


# ----------------------------------------------------------------------------- helpers
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


def _to_standard(t: Tensor, layout: str) -> Tensor:
    return t.permute(0, 3, 1, 2) if layout == "NHWC" else t


def _to_native(t: Tensor, layout: str) -> Tensor:
    return t.permute(0, 2, 3, 1) if layout == "NHWC" else t
