"""Any timm model as a plain kdreg backbone (``backbone = { name = "timm", model = "resnet18" }``).

The model is built with the number of classes and input channels of the data; models that take an
``img_size`` (ViT, DeiT, Mixer, Swin, ...) are built for the data's input size. An input too small
for the model's total stride is an :class:`~kdreg.errors.OptionError` naming the smallest square
input that works.

**Weights.** Without more the model is initialised at random. ``pretrained = true``, or a tagged
name (``model = "resnet50.a1_in1k"``; ``pretrained = false`` keeps such a model random), loads
timm's pretrained weights through timm's own loader, which reads them from the Hugging Face cache
(``HF_HOME``, ``HF_HUB_CACHE``) and downloads them there when they are missing; with
``HF_HUB_OFFLINE=1`` and a filled cache this needs no network. ``pretrained_file`` loads a local
weights file instead (``.pth``/``.pt``/``.safetensors``; every key must fit the model). Either way
timm's rules adapt the weights to the data: a classifier whose class count differs from the data's
is re-initialised at random, and a first convolution made for other input channels is adapted
(summed over its channels for one input channel, repeated for more); the console says so. A model
with pretrained weights records where they come from (``pretrained``, so that its stage may have
``epochs = 0``: evaluated and used as a teacher, not trained) and the input statistics they
expect, ``input_mean``/``input_std`` from the model's ``pretrained_cfg`` (for another channel
count: the mean over channels for one channel, repeated for more), with which the engine
normalises its input. ``kdreg validate`` never downloads: it checks the name, the tag and that the
weights exist (offline: that they are in the cache) and builds the model without them.

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
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from kdreg.backbone import FlexibleBackbone
from kdreg.downloads import downloads_allowed, weights_from_checkpoints
from kdreg.engine.distributed import is_main
from kdreg.errors import ExportError, OptionError

#: Options that kdreg sets itself and a recipe may not pass through ``model_options``.
RESERVED = ("pretrained", "num_classes", "in_chans", "features_only")
_TRACE_BATCH = 3  # odd, so that a batch dimension is not confused with a size of 2
_CHECK_BATCH = 2


def register(register: Any) -> None:
    register("timm", build_timm,
             description="any model of timm.list_models(), pretrained weights through timm's loader")


def build_timm(
    *,
    num_classes: int,
    in_chans: int,
    input_size: tuple[int, int],
    model: str,
    pretrained: bool | None = None,
    pretrained_file: str | None = None,
    model_options: Mapping[str, Any] = {},
) -> TimmBackbone:
    """Build timm model ``model`` as a plain backbone (one sub-model, ``full``).

    ``pretrained`` loads timm's pretrained weights of ``model`` (its tag's, else the default
    tag's) through timm's loader and the Hugging Face cache; unset, it is true for a tagged name
    (``resnet50.a1_in1k``) and false for a bare one. ``pretrained_file`` is a local weights file
    (``.pth``/``.pt``/``.safetensors``) instead. ``model_options`` are extra keyword arguments for
    ``timm.create_model``.
    """
    check_model_name(model)
    bad = sorted(set(model_options) & set(RESERVED))
    if bad:
        raise OptionError(
            f"model_options may not set {', '.join(bad)}: kdreg sets them from the data "
            "(use pretrained or pretrained_file for weights)",
            key="model_options",
        )
    if pretrained and pretrained_file is not None:
        raise OptionError("pretrained = true loads timm's weights and pretrained_file a local file: "
                          "give one of them", key="pretrained")
    cfg = pretrained_cfg_of(model)
    hub = pretrained if pretrained is not None else ("." in model and pretrained_file is None)
    key = "pretrained" if pretrained else "model"
    restored = weights_from_checkpoints()     # a run's checkpoint brings the weights
    load = hub and not restored and weights_reachable(model, cfg, key)
    size = (int(input_size[0]), int(input_size[1]))
    net = _create(model, num_classes, in_chans, size, dict(model_options), pretrained=load, key=key)
    source = None
    if hub:
        source = f"timm {_tagged(model, cfg)}"
        for note in [] if restored else hub_adaptations(model, cfg, num_classes, in_chans):
            say(note)
    elif pretrained_file is not None:
        for note in [] if restored else load_weights(net, pretrained_file, model, in_chans):
            say(note)
        source = str(Path(pretrained_file).expanduser())
    backbone = TimmBackbone(net, model_name=model, in_chans=in_chans, input_size=size)
    if source is not None:
        backbone.pretrained = source
        backbone.input_mean, backbone.input_std = pretrained_stats(net, in_chans)
    return backbone


def check_model_name(model: str) -> None:
    """Raise an :class:`OptionError` listing close matches when timm has no model ``model``."""
    import timm  # imported on use: it takes a second, and most runs need no timm model

    base = model.split(".", 1)[0]
    if timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise OptionError(f"unknown timm model {model!r}{hint} (see timm.list_models())", key="model")


def say(message: str) -> None:
    """A line on the console (stderr, the main process only), as the engine's other warnings."""
    if is_main():
        print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- pretrained weights
def pretrained_cfg_of(model: str) -> Any:
    """timm's pretrained configuration of ``model`` (its tag's, else the default tag's; None for a
    model without any); an unknown tag is an :class:`OptionError` listing the known ones."""
    import timm
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(model)
    except RuntimeError:
        arch, tag = model.split(".", 1)
        tags = [name.split(".", 1)[1] for name in timm.list_pretrained(f"{arch}.*")]
        known = f"; its tags with weights: {', '.join(tags)}" if tags else "; it has no pretrained weights"
        raise OptionError(f"timm model {arch!r} has no pretrained tag {tag!r}{known}",
                          key="model") from None


def _tagged(model: str, cfg: Any) -> str:
    return f"{cfg.architecture}.{cfg.tag}" if cfg is not None and cfg.tag else model


def weights_reachable(model: str, cfg: Any, key: str) -> bool:
    """Whether to load the pretrained weights of ``model`` now: when downloads are allowed, not
    during validation (which builds the model without them, cached or not). Raises an
    :class:`OptionError` when the model has no pretrained weights, and when the Hugging Face hub
    is offline (``HF_HUB_OFFLINE``) and the weights are not in its cache."""
    import timm
    from huggingface_hub import constants

    if cfg is None or not cfg.has_weights:
        arch = model.split(".", 1)[0]
        tagged = timm.list_pretrained(f"{arch}.*")
        others = f"; its tags with weights: {', '.join(tagged)}" if tagged else ""
        raise OptionError(f"timm model {model!r} has no pretrained weights{others} (for random "
                          "weights set pretrained = false, or give pretrained_file)", key=key)
    where, cached = weights_location(cfg)
    if not cached and cfg.hf_hub_id and not cfg.file and constants.is_offline_mode():
        raise OptionError(
            f"the pretrained weights of timm model {model!r} ({where}) are not in the Hugging Face "
            f"cache {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is set: fetch them once with the "
            "network (the same HF_HOME / HF_HUB_CACHE), or give pretrained_file", key=key)
    return downloads_allowed()


def weights_location(cfg: Any) -> tuple[str, bool]:
    """Where timm's loader reads ``cfg``'s weights (as timm resolves them: a file, the Hugging
    Face hub, a URL) and whether they are there without the network."""
    if cfg.file:
        return str(cfg.file), Path(cfg.file).expanduser().is_file()
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        name = cfg.hf_hub_filename or "pytorch_model.bin"
        names = [name] + ([name[:-4] + ".safetensors", "model.safetensors"] if name.endswith(".bin") else [])
        found = any(isinstance(try_to_load_from_cache(repo, n, revision=revision or None), str)
                    for n in names)
        return f"Hugging Face hub {cfg.hf_hub_id}", found
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
    return str(cfg.url), file.is_file()


def _names(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def hub_adaptations(model: str, cfg: Any, num_classes: int, in_chans: int) -> list[str]:
    """What timm's loader changes in ``model``'s pretrained weights for this data, a line each:
    the classifier re-initialised for another class count, the first convolution adapted."""
    notes = []
    classifier = _names(cfg.classifier)
    if classifier and cfg.num_classes != num_classes:
        had = f"predicts {cfg.num_classes} classes" if cfg.num_classes else "is not in the weights"
        notes.append(f"timm model {model!r}: the pretrained classifier ({', '.join(classifier)}) "
                     f"{had} and the data has {num_classes}: it is re-initialised at random, "
                     "the other layers keep their pretrained weights")
    base = int((cfg.input_size or (3,))[0])
    first = _names(cfg.first_conv)
    if first and in_chans != base:
        notes.append(f"timm model {model!r}: the pretrained first convolution ({', '.join(first)}) "
                     f"takes {base} input channels and the data has {in_chans}: timm adapts its "
                     f"weights ({'summed over channels' if in_chans == 1 else 'channels repeated'})")
    return notes


def pretrained_stats(net: nn.Module, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std that ``net``'s pretrained weights expect (timm's data config of its
    ``pretrained_cfg``), for ``in_chans`` channels: the mean over channels for one, the channels
    repeated for more (as timm adapts the first convolution)."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(net)
    return _per_channel(config["mean"], in_chans), _per_channel(config["std"], in_chans)


def _per_channel(values: Sequence[float], chans: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == chans:
        return values
    if chans == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(chans))


# ----------------------------------------------------------------------------- building
def _create(
    name: str, num_classes: int, in_chans: int, size: tuple[int, int], options: dict[str, Any], *,
    pretrained: bool = False, key: str = "model",
) -> nn.Module:
    kwargs = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans, **options}
    sized = "img_size" not in options
    net = None
    failed: BaseException | None = None
    if pretrained:
        try:
            net = _create_sized(name, {**kwargs, "pretrained": True}, size if sized else None)
        except Exception as exc:  # noqa: BLE001 - the build below tells the weights' fault apart
            failed = exc
    if net is None:
        try:
            net = _create_sized(name, kwargs, size if sized else None)
        except TypeError as exc:
            raise OptionError(f"timm model {name!r} rejects its options: {exc}", key="model_options") from None
        except Exception as exc:  # noqa: BLE001 - reported with the input size that caused it
            raise _build_error(name, kwargs, size, sized, exc) from None
    if failed is not None:  # the model builds without its weights: loading them failed
        raise OptionError(f"cannot load the pretrained weights of timm model {name!r}: "
                          f"{_reason(failed)}", key=key)
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
    reason = _reason(exc)
    smallest = smallest_input(name, kwargs, min(size), sized)
    if smallest is None:
        key = "model_options" if set(kwargs) - {"pretrained", "num_classes", "in_chans"} else "model"
        return OptionError(f"timm model {name!r} cannot be built or run: {reason}", key=key)
    return OptionError(
        f"timm model {name!r} does not support input size {size[0]}x{size[1]} ({reason}); "
        f"the smallest square input it supports is {smallest}x{smallest}",
        key="model",
    )


def _reason(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type when it has none), at most 200 characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


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


def load_weights(net: nn.Module, path: str, model: str, in_chans: int) -> list[str]:
    """Load the state dict in ``path`` into ``net``, adapted as timm adapts pretrained weights.

    A classifier (``pretrained_cfg['classifier']``) whose class count differs from ``net``'s is
    left at its random initialisation; a first convolution (``pretrained_cfg['first_conv']``) made
    for other input channels is adapted by timm's ``adapt_input_conv``. Any other missing,
    unexpected or misshapen key is an :class:`OptionError` naming the file. Returns a line per
    adaptation, for the console.
    """
    from timm.models import adapt_input_conv, load_state_dict

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
    cfg = getattr(net, "pretrained_cfg", None) or {}
    notes: list[str] = []

    def differs(k: str) -> bool:
        return k in own and isinstance(state.get(k), Tensor) and state[k].shape != own[k].shape

    kept: list[str] = []  # the model's own (random) weights where the file's do not fit
    for name in _names(cfg.get("classifier")):
        keys = [name + suffix for suffix in (".weight", ".bias")]
        if any(differs(k) for k in keys):
            classes = state[keys[0]].shape[0] if keys[0] in state else "?"
            for k in keys:
                if k in state and k in own:
                    del state[k]
                    kept.append(k)
            notes.append(f"timm model {model!r}: the classifier {name} in {str(file)!r} predicts "
                         f"{classes} classes and the data has {own[keys[0]].shape[0]}: it is "
                         "re-initialised at random, the other layers keep the file's weights")
    for name in _names(cfg.get("first_conv")):
        k = name + ".weight"
        if not differs(k) or state[k].dim() != 4 or state[k].shape[0] != own[k].shape[0]:
            continue
        # the file's input channels: its conv's, less a space-to-depth stem's factor
        base = int(state[k].shape[1]) * in_chans // int(own[k].shape[1])
        try:
            adapted = adapt_input_conv(in_chans, state[k], base_chans=base)
        except (NotImplementedError, ValueError, AssertionError, RuntimeError):
            continue  # reported below as a shape mismatch
        if adapted.shape == own[k].shape:
            state[k] = adapted.to(own[k].dtype)
            notes.append(f"timm model {model!r}: the first convolution {name} in {str(file)!r} takes "
                         f"{base} input channels and the data has {in_chans}: its weights are "
                         f"adapted as timm adapts pretrained ones "
                         f"({'summed over channels' if in_chans == 1 else 'channels repeated'})")
    missing = [k for k in own if k not in state and k not in kept]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if differs(k)]
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
    net.load_state_dict(state, strict=not kept)
    return notes


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
