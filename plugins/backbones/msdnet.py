"""MSDNet for CIFAR (Huang et al., ICLR 2018), the anytime configuration of kalviny/MSDNet-PyTorch.

A multi-scale dense network: three scales with 1x, 2x and 4x channels at 32x32, 16x16 and 8x8
(for a 32x32 input). Every layer adds ``growth_rate * factor`` new channels to each scale it keeps:
at scale ``s`` a strided conv of scale ``s - 1`` and a regular conv of scale ``s`` (half each),
concatenated after the scale's input (dense connectivity); the finest kept scale, having no finer
neighbour, gets all its new channels from the regular conv. Each conv is an optional 1x1
bottleneck (to ``min(c_in, factor * c_new)`` channels) then a 3x3 conv, each with BN-ReLU.

Depth: block 1 has ``base`` layers, every later block ``step`` (``step_mode = "even"``) or
``step * i + 1`` (``"linear"``). Scales are pruned "max"-style: with ``L`` layers in all and
``interval = ceil(L / 3)``, layer ``l`` (1-based) reads ``3 - floor(max(0, l - 2) / interval)``
scales and writes ``3 - floor((l - 1) / interval)``; where it drops the finest scale a transition
(per-scale 1x1 ConvBNReLU) compresses the channels by ``reduction``. Exit ``i`` follows block
``i`` and reads the coarsest scale: ConvBNReLU(3x3, s2, 128), ConvBNReLU(3x3, s2, 128), average
pool, Linear(128, C). (The reference's AvgPool2d(2) sees a 2x2 map at 32x32; a global average
pool is identical there and also fits other input sizes.)

Defaults reproduce the reference's parameter count exactly: 3,067,960 on CIFAR-100 (cumulative
per exit: blocks 1..i plus heads 1..i) and 2,986,690 on CIFAR-10. MACs per exit are counted the
reference's way too, cumulative over blocks and heads 1..i (an anytime prediction that reaches exit
i has evaluated every earlier exit): 15.0, 25.3, 36.8, 46.0, 56.9, 66.5, 75.5 M on CIFAR-100,
convolutions and matrix products only; the reference's 15.1 .. 75.9 add ReLU, pooling and bias ops.

Split points ``block1``..``blockN`` hold a block's output: a list of tensors, finest scale first
(3, 3, 2, 2, 2, 1, 1 scales for the default configuration).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdreg.backbone import FlexibleBackbone, segment_range
from kdreg.errors import OptionError
from kdreg.measure import count_macs
from kdreg.pruning import truncated_copy

#: Channel multiplier per scale (the reference's grFactor) and bottleneck width factor (bnFactor).
SCALE_FACTORS = (1, 2, 4)
BOTTLENECK_FACTORS = (1, 2, 4)
SCALES = len(SCALE_FACTORS)
HEAD_CHANNELS = 128
STEP_MODES = ("even", "linear")

Features = list[Tensor]


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) - BN - ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def dense_conv(c_in: int, c_out: int, stride: int, width: int | None) -> nn.Sequential:
    """Optional 1x1 bottleneck to ``min(c_in, width * c_out)`` channels, then a 3x3 conv."""
    layers: list[nn.Module] = []
    inner = c_in
    if width is not None:
        inner = min(c_in, width * c_out)
        layers.append(conv_bn_relu(c_in, inner, 1))
    layers.append(conv_bn_relu(inner, c_out, 3, stride))
    return nn.Sequential(*layers)


class ScaleUnit(nn.Module):
    """New features of one scale, appended to that scale's input.

    With a finer neighbour: ``cat[x, down(finer), regular(x)]``, half the new channels each;
    without: ``cat[x, regular(x)]``.
    """

    def __init__(self, c_same: int, c_finer: int | None, c_new: int,
                 w_same: int | None, w_finer: int | None):
        super().__init__()
        self.down = None if c_finer is None else dense_conv(c_finer, c_new // 2, 2, w_finer)
        self.regular = dense_conv(c_same, c_new if c_finer is None else c_new // 2, 1, w_same)

    def forward(self, same: Tensor, finer: Tensor | None = None) -> Tensor:
        if self.down is None:
            return torch.cat([same, self.regular(same)], 1)
        if finer is None:
            raise ValueError("this scale unit needs the finer scale's features")
        return torch.cat([same, self.down(finer), self.regular(same)], 1)


class FirstLayer(nn.Module):
    """The CIFAR first layer: a 3x3 conv at full resolution, then one strided 3x3 conv per scale."""

    def __init__(self, in_chans: int, channels: int):
        super().__init__()
        convs, c_in = [], in_chans
        for s, factor in enumerate(SCALE_FACTORS):
            convs.append(conv_bn_relu(c_in, channels * factor, 3, 1 if s == 0 else 2))
            c_in = channels * factor
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> Features:
        out = []
        for conv in self.convs:
            x = conv(x)
            out.append(x)
        return out


class MSDLayer(nn.Module):
    """One multi-scale dense layer: ``in_scales`` coarsest scales in, ``out_scales`` out."""

    def __init__(self, channels: int, growth: int, in_scales: int, out_scales: int, bottleneck: bool):
        super().__init__()
        self.first_in = SCALES - in_scales  # scale index of the first input tensor
        self.first_out = SCALES - out_scales
        units = []
        for s in range(self.first_out, SCALES):
            finer = s > self.first_in  # the finer scale s - 1 is among the inputs
            units.append(ScaleUnit(
                channels * SCALE_FACTORS[s],
                channels * SCALE_FACTORS[s - 1] if finer else None,
                growth * SCALE_FACTORS[s],
                BOTTLENECK_FACTORS[s] if bottleneck else None,
                BOTTLENECK_FACTORS[s - 1] if bottleneck and finer else None,
            ))
        self.units = nn.ModuleList(units)

    def forward(self, xs: Features) -> Features:
        out = []
        for unit, s in zip(self.units, range(self.first_out, SCALES)):
            j = s - self.first_in
            out.append(unit(xs[j], xs[j - 1] if unit.down is not None else None))
        return out


class Transition(nn.Module):
    """Per-scale 1x1 ConvBNReLU from ``c_in * factor`` to ``c_out * factor`` channels."""

    def __init__(self, c_in: int, c_out: int, scales: int):
        super().__init__()
        self.convs = nn.ModuleList(
            conv_bn_relu(c_in * f, c_out * f, 1) for f in SCALE_FACTORS[SCALES - scales:]
        )

    def forward(self, xs: Features) -> Features:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class ExitHead(nn.Sequential):
    """Classifier on the coarsest scale: two strided 3x3 ConvBNReLU, average pool, linear."""

    def __init__(self, c_in: int, num_classes: int):
        super().__init__(
            conv_bn_relu(c_in, HEAD_CHANNELS, 3, 2),
            conv_bn_relu(HEAD_CHANNELS, HEAD_CHANNELS, 3, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(HEAD_CHANNELS, num_classes),
        )

    def forward(self, xs: Features) -> Tensor:  # type: ignore[override]
        return super().forward(xs[-1])


def block_steps(blocks: int, base: int, step: int, step_mode: str) -> list[int]:
    """Layers per block: ``base`` then ``step`` (even) or ``step * i + 1`` (linear) for block i."""
    return [base] + [step if step_mode == "even" else step * i + 1 for i in range(1, blocks)]


def scale_schedule(total_layers: int) -> list[tuple[int, int]]:
    """``(in_scales, out_scales)`` of each layer under "max" pruning."""
    interval = math.ceil(total_layers / SCALES)
    return [
        (SCALES - max(0, n - 2) // interval, SCALES - (n - 1) // interval)
        for n in range(1, total_layers + 1)
    ]


class MSDNet(FlexibleBackbone):
    """MSDNet with one exit per block; one forward pass yields every exit, exit 1 first."""

    single_pass = True

    def __init__(
        self,
        num_classes: int,
        *,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
        blocks: int = 7,
        step: int = 2,
        base: int = 4,
        channels: int = 16,
        growth_rate: int = 6,
        reduction: float = 0.5,
        bottleneck: bool = True,
        step_mode: str = "even",
    ):
        super().__init__()
        self.in_chans = in_chans
        self.input_size = tuple(input_size)  # type: ignore[assignment]
        self.steps = block_steps(blocks, base, step, step_mode)
        schedule = iter(scale_schedule(sum(self.steps)))
        self.blocks = nn.ModuleList()
        self.heads = nn.ModuleList()
        c = channels
        for i, n_layers in enumerate(self.steps):
            layers: list[nn.Module] = [FirstLayer(in_chans, c)] if i == 0 else []
            for _ in range(n_layers):
                in_scales, out_scales = next(schedule)
                layers.append(MSDLayer(c, growth_rate, in_scales, out_scales, bottleneck))
                c += growth_rate
                if in_scales > out_scales and reduction > 0:
                    layers.append(Transition(c, math.floor(reduction * c), out_scales))
                    c = math.floor(reduction * c)
            self.blocks.append(nn.Sequential(*layers))
            self.heads.append(ExitHead(c * SCALE_FACTORS[-1], num_classes))
        self.submodel_labels = tuple(f"exit{i + 1}" for i in range(blocks))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (fan-out) normal convs, unit BN, zero linear biases (as the reference)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        return self.forward_exits(x, len(self.blocks))

    def forward_exits(self, x: Tensor, n: int) -> list[Tensor]:
        """Logits of exits 1..n (what an anytime prediction up to exit ``n`` computes)."""
        logits, h = [], x
        for block, head in zip(self.blocks[:n], self.heads[:n]):
            h = block(h)
            logits.append(head(h))
        return logits

    def forward_submodel(self, x: Tensor, index: int) -> Tensor:
        """Logits of exit ``index + 1``, running only blocks 1..index + 1."""
        index = self.check_index(index)
        h = x
        for block in self.blocks[: index + 1]:
            h = block(h)
        return self.heads[index](h)

    # ----------------------------------------------------------------- split points
    def split_points(self) -> tuple[str, ...]:
        return tuple(f"block{i + 1}" for i in range(len(self.blocks)))

    def forward_segment(  # type: ignore[override]
        self, h: Tensor | Features, start: str | None, end: str | None
    ) -> Tensor | Features:
        """Blocks after ``start`` (None: from the image) up to ``end`` (None: the last exit's logits)."""
        first, last = segment_range(self.split_points(), start, end)
        for block in self.blocks[first:last]:
            h = block(h)
        return self.heads[-1](h) if end is None else h

    def feature_shapes(self, input_size: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
        """Shape ``(C, H, W)`` of the coarsest scale (the one an exit head reads) at each block."""
        return {p: shapes[-1] for p, shapes in self.scale_shapes(input_size).items()}

    def scale_shapes(self, input_size: Sequence[int] | None = None) -> dict[str, list[tuple[int, ...]]]:
        """Shapes ``(C, H, W)`` of every scale (finest first) at each block."""
        feats = self.probe(lambda x: self.forward_stages(x)[0], input_size, batch=2)
        return {p: [tuple(t.shape[1:]) for t in f] for p, f in zip(self.split_points(), feats)}

    # ----------------------------------------------------------------- counting
    def count_params(self) -> list[int]:
        """Cumulative parameters per exit: blocks 1..i plus heads 1..i (the reference's count)."""
        total, out = 0, []
        for block, head in zip(self.blocks, self.heads):
            total += sum(p.numel() for p in block.parameters())
            total += sum(p.numel() for p in head.parameters())
            out.append(total)
        return out

    def count_macs(self, input_size: Sequence[int] | None = None) -> list[int]:
        """Cumulative MACs per exit of one image: blocks 1..i plus heads 1..i.

        As the reference counts them: an anytime prediction that reaches exit ``i`` has evaluated
        every earlier exit. (Exit ``i`` alone, without heads 1..i-1: :meth:`count_exit_macs`.)
        """
        blocks, heads = self._mac_table(input_size)
        return list(itertools.accumulate(b + h for b, h in zip(blocks, heads)))

    def count_exit_macs(self, input_size: Sequence[int] | None = None) -> list[int]:
        """MACs of :meth:`forward_submodel` per exit: blocks 1..i and head i only."""
        blocks, heads = self._mac_table(input_size)
        return [b + h for b, h in zip(itertools.accumulate(blocks), heads)]

    def _mac_table(self, input_size: Sequence[int] | None) -> tuple[list[int], list[int]]:
        """MACs of each block and of each head, from one forward pass of one image."""

        def measure(x: Tensor) -> tuple[list[int], list[int]]:
            block_macs, head_macs, h = [], [], x
            for block, head in zip(self.blocks, self.heads):
                h, macs = _counted(block, h)
                block_macs.append(macs)
                head_macs.append(_counted(head, h)[1])
            return block_macs, head_macs

        return self.probe(measure, input_size)

    def export_submodel(self, index: int) -> nn.Module:
        """Exit ``index + 1`` truncated at it: blocks and heads 1..index + 1 (what
        :meth:`count_params` counts); its forward runs only the exit's own head."""
        index = self.check_index(index)
        return truncated_copy(self, index, lambda _m, x: self.forward_exits(x, index + 1))


def _counted(module: nn.Module, h: Tensor | Features) -> tuple[Tensor | Features, int]:
    """``module(h)`` and the MACs it took."""
    out: list[Tensor | Features] = []
    macs = count_macs(lambda: out.append(module(h)))
    return out[0], macs


def build_msdnet(
    *,
    num_classes: int,
    in_chans: int = 3,
    input_size: tuple[int, int] = (32, 32),
    blocks: int = 7,
    step: int = 2,
    base: int = 4,
    channels: int = 16,
    growth_rate: int = 6,
    reduction: float = 0.5,
    bottleneck: bool = True,
    step_mode: str = "even",
) -> MSDNet:
    """MSDNet for CIFAR, one exit per block (defaults: the 7-exit anytime model, 3.07 M params)."""
    _check_positive(num_classes=num_classes, in_chans=in_chans, blocks=blocks, step=step,
                    base=base, channels=channels, growth_rate=growth_rate)
    if not 0.0 <= reduction <= 1.0:
        raise OptionError(f"reduction must be in [0, 1], got {reduction}", key="reduction")
    if step_mode not in STEP_MODES:
        raise OptionError(
            f"step_mode must be one of {', '.join(STEP_MODES)}, got {step_mode!r}", key="step_mode"
        )
    if reduction > 0:
        _check_transitions(blocks, base, step, step_mode, channels, growth_rate, reduction)
    return MSDNet(num_classes, in_chans=in_chans, input_size=input_size, blocks=blocks, step=step,
                  base=base, channels=channels, growth_rate=growth_rate, reduction=reduction,
                  bottleneck=bottleneck, step_mode=step_mode)


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"{key} must be a positive integer, got {value!r}", key=key)


def _check_transitions(blocks: int, base: int, step: int, step_mode: str, channels: int,
                       growth: int, reduction: float) -> None:
    """Every transition must keep at least one channel."""
    c = channels
    for in_scales, out_scales in scale_schedule(sum(block_steps(blocks, base, step, step_mode))):
        c += growth
        if in_scales > out_scales:
            if math.floor(reduction * c) < 1:
                raise OptionError(
                    f"reduction {reduction} leaves no channels at a transition ({c} channels in)",
                    key="reduction",
                )
            c = math.floor(reduction * c)


def register(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "msdnet",
        build_msdnet,
        "MSDNet for CIFAR, 7-exit anytime model (3 scales, growth 6); 3.07 M params, "
        "75.9 M MACs at the last exit on CIFAR-100",
    )
