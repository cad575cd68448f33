"""``exits``: any backbone with classifier heads at chosen split points, as an early-exit model.

``backbone = { name = "exits", trunk = { name = "timm", model = "resnet18" }, points = [1, 2] }``
or, on a network trained in an earlier stage, ``trunk = "teacher", freeze_trunk = true`` (the EKD
heads of ekd-thesis ch. 4). Sub-models are ``exit1 .. exitK`` (one per point, input side first)
then ``final``, the trunk's own logits. One forward pass of the trunk yields every exit.

Heads (``head``): ``linear`` pools the features (average over space, or over tokens) into a
Linear; ``flatten_linear`` is a Linear on the flattened features (the EKD thesis's heads);
``msdnet_conv`` is MSDNet's exit, ConvBNReLU(3x3, 128) twice, average pool, Linear(128, C), with
stride 2 while the map is at least 4 pixels on its shorter side and stride 1 below that.

Counts follow MSDNet's anytime convention: exit i costs the trunk up to its point plus heads
1..i (the earlier exits were evaluated on the way); ``final`` costs the whole trunk plus every head.
The trunk's parameters up to a point are those the features there depend on (read from the
autograd graph of one forward pass).

A trunk given as an instance (a stage of the recipe) is shared, not copied; ``freeze_trunk`` sets
its parameters' ``requires_grad`` to False and keeps it in eval mode. The model expects its trunk's
input statistics (``input_mean``, ``input_std``): a pretrained timm trunk's, else the data set's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdreg.backbone import FlexibleBackbone
from kdreg.errors import OptionError, UserError
from kdreg.measure import count_macs, params_depended_on
from kdreg.options import StageRef

HeadKind = Literal["linear", "flatten_linear", "msdnet_conv"]
MSDNET_CHANNELS = 128


def register(register: Any) -> None:
    register(
        "exits",
        build_exits,
        description="early exits (classifier heads) on any backbone's split points",
    )


def build_exits(
    *,
    num_classes: int,
    in_chans: int,
    input_size: tuple[int, int],
    trunk: StageRef | dict | FlexibleBackbone,
    points: list[str] | list[int] | None = None,
    head: HeadKind = "linear",
    freeze_trunk: bool = False,
    include_final: bool = True,
) -> ExitsBackbone:
    """Attach ``head`` classifiers at ``points`` of ``trunk`` (default: every split point but the
    last; names or indices into ``trunk.split_points()``)."""
    net, name = _trunk(trunk, num_classes=num_classes, in_chans=in_chans, input_size=input_size)
    chosen = resolve_points(net, points, name)
    return ExitsBackbone(
        net, chosen, num_classes=num_classes, head=head, freeze_trunk=freeze_trunk,
        include_final=include_final, input_size=input_size, in_chans=in_chans,
    )


def resolve_points(trunk: FlexibleBackbone, points: Sequence[str | int] | None, name: str) -> list[str]:
    """Split point names for ``points`` (names or indices), checked and in network order."""
    order = list(trunk.split_points())
    if not order:
        raise OptionError(f"trunk {name} names no split points to attach exits to", key="trunk")
    if points is None:
        if len(order) < 2:
            raise OptionError(
                f"trunk {name} has a single split point ({order[0]}); list it in points to "
                "attach an exit there",
                key="points",
            )
        return order[:-1]
    if not points:
        raise OptionError("points is empty: give at least one split point", key="points")
    chosen = []
    for p in points:
        if isinstance(p, bool) or not isinstance(p, int | str):
            raise OptionError(f"point {p!r} is neither a split point name nor an index", key="points")
        if isinstance(p, int):
            if not 0 <= p < len(order):
                raise OptionError(
                    f"stage index {p} out of range 0..{len(order) - 1} for trunk {name} "
                    f"(split points: {', '.join(order)})",
                    key="points",
                )
            p = order[p]
        elif p not in order:
            raise OptionError(
                f"unknown split point {p!r} for trunk {name}; known: {', '.join(order)}",
                key="points",
            )
        chosen.append(p)
    if len(set(chosen)) != len(chosen):
        raise OptionError(f"points {list(points)} name a split point twice", key="points")
    if [order.index(p) for p in chosen] != sorted(order.index(p) for p in chosen):
        raise OptionError(
            f"points {list(points)} are not in network order ({', '.join(order)})", key="points"
        )
    return chosen


def _trunk(
    trunk: Any, *, num_classes: int, in_chans: int, input_size: tuple[int, int]
) -> tuple[FlexibleBackbone, str]:
    if isinstance(trunk, FlexibleBackbone):
        return trunk, _name_of(trunk)
    if isinstance(trunk, str):
        raise OptionError(
            f"trunk {trunk!r} names a recipe stage, which only a recipe run can resolve; "
            "from Python pass a backbone instance or a table such as {name = 'resnet20'}",
            key="trunk",
        )
    if not isinstance(trunk, Mapping) or not isinstance(trunk.get("name"), str):
        raise OptionError(
            "trunk must be a stage name, a backbone table with a 'name' key, or a backbone",
            key="trunk",
        )
    from kdreg.api import build_backbone

    options = {k: v for k, v in trunk.items() if k != "name"}
    try:
        net = build_backbone(
            trunk["name"], num_classes=num_classes, in_chans=in_chans,
            input_size=(input_size[0], input_size[1]), **options,
        )
    except UserError as exc:
        lines = [line.replace(" @ backbone", " @ trunk") for line in exc.problems]
        raise OptionError("; ".join(lines), key="trunk") from None
    if trunk["name"] == "timm" and "model" in options:
        return net, f"timm {options['model']}"
    return net, trunk["name"]


def _name_of(trunk: FlexibleBackbone) -> str:
    model = getattr(trunk, "model_name", None)
    return f"timm {model}" if model else type(trunk).__name__


# ----------------------------------------------------------------------------- heads
class PooledLinear(nn.Module):
    """Global average pool (over space, or over tokens) then Linear."""

    def __init__(self, shape: Sequence[int], num_classes: int):
        super().__init__()
        channels = shape[0] if len(shape) == 3 else shape[-1]
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        if h.dim() == 4:
            h = h.mean(dim=(2, 3))
        elif h.dim() == 3:
            h = h.mean(dim=1)
        return self.fc(h)


class FlattenLinear(nn.Module):
    """Linear on the flattened features (the EKD thesis's intermediate classifiers)."""

    def __init__(self, shape: Sequence[int], num_classes: int):
        super().__init__()
        self.fc = nn.Linear(math.prod(shape), num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(h.flatten(1))


class MSDNetConvHead(nn.Module):
    """MSDNet's exit: ConvBNReLU(3x3, 128) x2, average pool, Linear(128, C)."""

    def __init__(self, shape: Sequence[int], num_classes: int):
        super().__init__()
        channels, size = shape[0], min(shape[1:])
        layers: list[nn.Module] = []
        for _ in range(2):
            stride = 2 if size >= 4 else 1
            layers += [
                nn.Conv2d(channels, MSDNET_CHANNELS, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(MSDNET_CHANNELS),
                nn.ReLU(inplace=True),
            ]
            channels, size = MSDNET_CHANNELS, (size - 1) // stride + 1
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(MSDNET_CHANNELS, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(self.features(h).mean(dim=(2, 3)))


HEADS: dict[str, type[nn.Module]] = {
    "linear": PooledLinear,
    "flatten_linear": FlattenLinear,
    "msdnet_conv": MSDNetConvHead,
}


def make_head(kind: str, shape: Sequence[int], num_classes: int, point: str) -> nn.Module:
    """A head of ``kind`` for features of ``shape`` (``(C, H, W)`` or ``(tokens, C)``)."""
    if kind not in HEADS:
        raise OptionError(f"unknown head {kind!r}; known: {', '.join(HEADS)}", key="head")
    if kind == "msdnet_conv" and len(shape) != 3:
        raise OptionError(
            f"head 'msdnet_conv' needs (C, H, W) features; split point {point!r} gives "
            f"{tuple(shape)} (use 'linear' or 'flatten_linear')",
            key="head",
        )
    return HEADS[kind](shape, num_classes)


# ----------------------------------------------------------------------------- the wrapper
class ExitsBackbone(FlexibleBackbone):
    """A trunk with classifier heads at some of its split points (single pass)."""

    single_pass = True

    def __init__(
        self,
        trunk: FlexibleBackbone,
        points: Sequence[str],
        *,
        num_classes: int,
        head: str = "linear",
        freeze_trunk: bool = False,
        include_final: bool = True,
        input_size: tuple[int, int] = (32, 32),
        in_chans: int = 3,
    ):
        super().__init__()
        self.trunk = trunk
        # the trunk sees the input first: its weights' statistics are the model's (its
        # ``pretrained`` is not: the heads are new)
        self.input_mean, self.input_std = trunk.input_mean, trunk.input_std
        self.points = tuple(points)
        self.freeze_trunk = freeze_trunk
        self.include_final = include_final
        self.in_chans = in_chans
        self.input_size = tuple(input_size)  # type: ignore[assignment]
        shapes = trunk.feature_shapes(self.input_size)
        self.heads = nn.ModuleList(
            make_head(head, shapes[p], num_classes, p) for p in self.points
        )
        self.heads.to(_device_of(trunk))
        labels = [f"exit{i + 1}" for i in range(len(self.points))]
        self.submodel_labels = (*labels, "final") if include_final else tuple(labels)
        if freeze_trunk:
            trunk.requires_grad_(False)
            trunk.eval()

    def train(self, mode: bool = True) -> ExitsBackbone:
        super().train(mode)
        if self.freeze_trunk:
            self.trunk.eval()
        return self

    def split_points(self) -> tuple[str, ...]:
        return self.trunk.split_points()

    def forward_segment(self, h: Tensor, start: str | None, end: str | None) -> Tensor:
        return self.trunk.forward_segment(h, start, end)

    def forward_stages(self, x: Tensor, points: Sequence[str] | None = None) -> tuple[list[Tensor], Tensor]:
        return self.trunk.forward_stages(x, points)

    # ------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> list[Tensor]:
        with torch.no_grad() if self.freeze_trunk else nullcontext():
            if self.include_final:
                feats, logits = self.trunk.forward_stages(x, self.points)
            else:
                feats, h, start = [], x, None
                for p in self.points:
                    h = self.trunk.forward_segment(h, start, p)
                    feats.append(h)
                    start = p
        outs = [head(f) for head, f in zip(self.heads, feats)]
        return [*outs, logits] if self.include_final else outs

    def forward_submodel(self, x: Tensor, index: int) -> Tensor:
        index = self.check_index(index)
        with torch.no_grad() if self.freeze_trunk else nullcontext():
            if index == len(self.points):
                return self.trunk.forward_submodel(x, self.trunk.num_submodels - 1)
            h = self.trunk.forward_front(x, self.points[index])
        return self.heads[index](h)

    # ------------------------------------------------------------------- counting
    def count_params(self) -> list[int]:
        trunk_params = trunk_params_up_to(self.trunk, self.points)
        heads = [sum(p.numel() for p in h.parameters()) for h in self.heads]
        counts = [t + sum(heads[: i + 1]) for i, t in enumerate(trunk_params)]
        if self.include_final:
            counts.append(self.trunk.count_params()[-1] + sum(heads))
        return counts

    def count_macs(self, input_size: Sequence[int] | None = None) -> list[int]:
        def measure(x: Tensor) -> list[int]:
            fronts, heads = [], []
            for p, head in zip(self.points, self.heads):
                fronts.append(count_macs(lambda p=p: self.trunk.forward_front(x, p)))
                f = self.trunk.forward_front(x, p)
                heads.append(count_macs(lambda head=head, f=f: head(f)))
            counts = [m + sum(heads[: i + 1]) for i, m in enumerate(fronts)]
            if self.include_final:
                last = self.trunk.num_submodels - 1
                full = count_macs(lambda: self.trunk.forward_submodel(x, last))
                counts.append(full + sum(heads))
            return counts

        return self.probe(measure, input_size)

    def export_submodel(self, index: int) -> nn.Module:
        """Exit ``index`` truncated at it, as :meth:`count_params` counts it: the trunk's front
        up to its point (the trunk's ``export_front``) and copies of heads 1..index, of which
        only the last runs; ``final``: the trunk's own full model and copies of every head,
        none of which runs."""
        index = self.check_index(index)
        final = index == len(self.points)
        if final:
            front = self.trunk.export_submodel(self.trunk.num_submodels - 1)
        else:
            front = self.trunk.export_front(self.points[index])
        heads = copy.deepcopy(self.heads if final else self.heads[: index + 1])
        return ExitNetwork(front, heads, final=final).eval()


class ExitNetwork(nn.Module):
    """One exit as a standalone network: ``heads[-1](front(x))``; with ``final``, ``front(x)``
    (the trunk's own logits). The other heads are held, not run: the earlier exits' heads an
    anytime prediction up to this exit evaluates, which its parameter count includes."""

    def __init__(self, front: nn.Module, heads: nn.ModuleList, *, final: bool = False):
        super().__init__()
        self.front = front
        self.heads = heads
        self.final = final

    def forward(self, x: Tensor) -> Tensor:
        h = self.front(x)
        return h if self.final else self.heads[-1](h)


def trunk_params_up_to(trunk: FlexibleBackbone, points: Sequence[str]) -> list[int]:
    """Parameters the trunk's features at each of ``points`` depend on (cumulative)."""
    return params_depended_on(trunk, lambda x: trunk.forward_stages(x, points)[0])


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
