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

**How segments run.** Through :class:`kdreg.module_splits.ModuleSplits` on the ``feature_info``
modules: hooks on the timm model itself stop a front at its split point and skip a back's front
(see that module for the cost). A stage boundary is kept as a split point only where the cut is
exact, as the build checks on a random batch. Boundaries that a later layer bypasses (it reads an
activation from before the boundary) fail that check; stages whose output is not one tensor
(HRNet's and TNT's lists and pairs) and feature_info names that match no module (Twins, MViTv2)
are not split points either; all are listed with the reason in ``rejected_points``.

``forward_stages`` takes every stage's features and the logits from one ordinary forward pass with
capturing hooks: the same tensors ``forward_front`` returns, which ``forward_intermediates`` would
not give (it reshapes tokens to maps and drops prefix tokens). Segments assume the input size the
model was built for.

**Distilled models.** ``distilled = true`` takes a timm model with a distillation head (DeiT's
``deit_*_distilled_*``, and any model with ``set_distilled_training``: LeViT, PiT's distilled,
EfficientFormer, ...) as three sub-models, ``cls`` (the class head), ``dist`` (the distillation
head) and ``avg`` (their average, the prediction timm deploys): the two heads are trained
(``train_labels``), all three evaluated; the ``deit`` graph sends the teacher to ``dist``. Such a
model names no split points (feature losses and bridges take a model of one output). A model
without a distillation head is refused, naming it.
"""

from __future__ import annotations

import copy
import difflib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from kdreg.backbone import FlexibleBackbone
from kdreg.downloads import downloads_allowed, weights_from_checkpoints
from kdreg.errors import ExportError, OptionError
from kdreg.module_splits import ModuleSplits, to_standard
from kdreg.process import is_main

#: Options that kdreg sets itself and a recipe may not pass through ``model_options``.
RESERVED = ("pretrained", "num_classes", "in_chans", "features_only")
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
    distilled: bool = False,
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
    if distilled:
        check_distilled(net, model, in_chans, size)
    cls = TimmDistilledBackbone if distilled else TimmBackbone
    backbone = cls(net, model_name=model, in_chans=in_chans, input_size=size)
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
        #: Stage boundaries that are not exact cuts, with the reason.
        self.rejected_points: dict[str, str] = {}
        self.splits = self._find_points()

    @property
    def layouts(self) -> dict[str, str]:
        """Channel layout of each split point's module output: NCHW, NHWC or NLC (tokens)."""
        return self.splits.layouts

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.net(x)]

    def split_points(self) -> tuple[str, ...]:
        return self.splits.points

    # ------------------------------------------------------------------- segments
    def forward_segment(self, h: Tensor, start: str | None, end: str | None) -> Tensor:
        for p in (start, end):
            if p is not None:
                self.check_split(p)
        return self.splits.forward_segment(h, start, end)

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
        return self.splits.forward_stages(x, self.ordered_points(points))

    # ------------------------------------------------------------------- build-time analysis
    def _find_points(self) -> ModuleSplits:
        """The splits at the modules of timm's ``feature_info`` (:mod:`kdreg.module_splits`)."""
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
        splits = ModuleSplits(self.net, candidates, in_chans=self.in_chans,
                              input_size=self.input_size,
                              output_fmt=str(getattr(self.net, "output_fmt", "NCHW")),
                              name=f"timm model {self.model_name}")
        self.rejected_points.update(splits.rejected)
        return splits


def check_distilled(net: nn.Module, model: str, in_chans: int, size: tuple[int, int]) -> None:
    """Raise an :class:`OptionError` naming ``model`` unless it has a distillation head: timm's
    ``set_distilled_training``, and its head then giving two outputs (checked on a zero batch)."""
    if not callable(getattr(net, "set_distilled_training", None)):
        raise OptionError(f"timm model {model!r} has no distillation head (no set_distilled_training): "
                          "distilled = true takes a model such as deit_tiny_distilled_patch16_224",
                          key="distilled")
    net.set_distilled_training(True)
    was = net.training
    net.eval()                            # no BatchNorm statistics from the zero batch
    try:
        with torch.no_grad():
            out = _both_heads(net, torch.zeros(_CHECK_BATCH, in_chans, *size))
    except Exception as exc:  # noqa: BLE001 - reported as the model's missing head
        out = exc
    finally:
        net.train(was)
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(o, Tensor) for o in out)):
        net.set_distilled_training(False)
        raise OptionError(f"timm model {model!r} has no distillation head (its head gives one output "
                          "in distilled training): distilled = true takes a model such as "
                          "deit_tiny_distilled_patch16_224", key="distilled")


def _both_heads(net: nn.Module, x: Tensor) -> Any:
    """The class and distillation heads' logits of ``net`` (distilled training set) in either mode:
    timm's ``forward_head`` gives both when the model's own ``training`` flag is set and their
    average otherwise, so the top module's flag alone is set for the head (its layers, dropout
    and drop path keep their mode)."""
    features = net.forward_features(x)
    was = net.training
    net.training = True
    try:
        return net.forward_head(features)
    finally:
        net.training = was


class TimmDistilledBackbone(TimmBackbone):
    """A timm model with a distillation head (``distilled = true``): sub-models ``cls`` (the class
    head), ``dist`` (the distillation head) and ``avg`` (their average, what timm predicts in eval
    mode), from one pass. A training step trains ``cls`` and ``dist`` (:attr:`train_labels`); all
    three are evaluated."""

    submodel_labels = ("cls", "dist", "avg")
    train_labels = ("cls", "dist")
    single_pass = True

    def forward(self, x: Tensor) -> list[Tensor]:
        cls, dist = _both_heads(self.net, x)
        return [cls, dist] if self.training else [cls, dist, (cls + dist) / 2]

    def _find_points(self) -> ModuleSplits:
        self.rejected_points["*"] = ("a distilled model gives two heads' logits: feature losses and "
                                     "bridges take a model of one output")
        return ModuleSplits(self.net, {}, in_chans=self.in_chans, input_size=self.input_size,
                            name=f"timm model {self.model_name}")


class TimmFront(nn.Module):
    """A timm model's front as traced by fx, returning the split point's features channels first."""

    def __init__(self, graph: nn.Module, layout: str):
        super().__init__()
        self.graph = graph
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        return to_standard(self.graph(x)["features"], self.layout)
