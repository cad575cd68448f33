"""The width figures of ``benchmarks/run.py``: what training every width of a slimmable model
costs against its full width, against plain networks of the widths' shapes and against the same
widths without distillation.

Figures (4-width slimmable MobileNet-V1 on 32x32 inputs, CIFAR-10 classes, batch 128):

* ``width_cost_ratio`` (the raw ratio): a 4-width IPKD-TA-M step / a full-width-only step (CE)
  of the same model; judged against ``width_cost_limit``: at most 1.02 times it.
* ``width_cost_limit`` (reported): four plain MobileNet-V1 networks (``nn.Conv2d`` /
  ``nn.BatchNorm2d`` / ``nn.Linear`` only, :class:`PlainMobileNetV1`), one per width, each
  taking one CE step, summed / the plain x1.0 network's CE step: what four separate networks of
  the widths' shapes cost on this machine, the bound of any slimmable implementation.
* ``slimmable_overhead_ratio``: the 4-width IPKD-TA-M step / the four plain networks' CE steps
  summed (the same batch, timed in the same alternation as the slimmable steps).
* ``width_cost_ratio_resnet18``, ``width_cost_limit_resnet18``,
  ``slimmable_overhead_ratio_resnet18`` (reported): the same three for a slimmable timm ResNet-18
  derived from the trunk (``slimmable`` with ``trunk = { name = "timm", model = "resnet18" }``),
  64x64 inputs, batch at most 64, its plain networks the derived model's ``export_submodel(i)``;
  the layout is the trainer's (``--channels-last``, channels-last by default).
* ``distill_cost_ratio``: a 4-width IPKD-TA-M step / a 4-width step without distillation.

``width_cost_ratio``'s details also hold where the width cost goes, by kernel class
(:func:`width_breakdown`, on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from common import (
    IPKD_LAM,
    IPKD_TAU,
    NUM_CLASSES,
    Family,
    Figure,
    Job,
    Settings,
    batch,
    ipkd_ta_m,
    mobilenet,
    sgd,
)
from probes import KERNEL_CLASSES, alternate, conv_macs, kernel_seconds, median

import kdreg
from kdreg.engine.step import LossSettings, multi_pass_backward
from kdreg.pointwise import guard_convs

#: the derived slimmable ResNet-18 of the ``*_resnet18`` figures, its input size and its largest
#: batch (64 keeps its alternation to about 40 s on 2 cores)
RESNET18 = {"trunk": {"name": "timm", "model": "resnet18"}, "widths": [0.25, 0.5, 0.75, 1.0]}
RESNET18_SIZE = 64
RESNET18_BATCH = 64

#: CIFAR MobileNet-V1 (kdreg_plugins.backbones.mobilenet_v1, written out again here so the plain
#: networks share none of its code): the stem's channels, then (output channels, stride) of each
#: depthwise-separable block
PLAIN_STEM = 32
PLAIN_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *((512, 1),) * 5,
                (1024, 2), (1024, 1))


def plain_channels(channels: int, width: float) -> int:
    """The slimmable MobileNet-V1's channel rule: ``int(channels * width)``, at least 1 (the
    epsilon keeps exact products from rounding down through floating-point error)."""
    return max(1, int(channels * width + 1e-9))


class PlainMobileNetV1(torch.nn.Module):
    """One width of the slimmable MobileNet-V1 as an ordinary network of ``nn.Conv2d`` /
    ``nn.BatchNorm2d`` / ``nn.ReLU`` / ``nn.Linear``: a 3x3 stem conv (no bias) - BN - ReLU, per
    block a depthwise 3x3 conv (no bias) - BN - ReLU and a pointwise 1x1 conv (with bias) - BN -
    ReLU, global average pooling, a linear classifier. Like the slimmable model it runs
    channels-last on the CPU (its input is made so; the weights keep PyTorch's layout)."""

    def __init__(self, width: float, num_classes: int = NUM_CLASSES, in_chans: int = 3):
        super().__init__()
        nn = torch.nn

        def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                         bias: bool = False) -> list[torch.nn.Module]:
            return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias),
                    nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        cin = plain_channels(PLAIN_STEM, width)
        layers = conv_bn_relu(in_chans, cin, 3)
        for out, stride in PLAIN_BLOCKS:
            cout = plain_channels(out, width)
            layers += conv_bn_relu(cin, cin, 3, stride, groups=cin) + conv_bn_relu(cin, cout, 1, bias=True)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():   # the slimmable model's init: He (fan-out), N(0, 0.01), zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def plain_mobilenets(model: kdreg.FlexibleBackbone, device: torch.device) -> list[torch.nn.Module]:
    """A :class:`PlainMobileNetV1` per width of the slimmable ``model``, in training mode; each
    holds exactly the parameters its width uses (``count_params()``), or AssertionError."""
    torch.manual_seed(0)
    nets = [PlainMobileNetV1(w).to(device).train() for w in model.widths]
    check_params(nets, model)
    return nets


def check_params(nets: list[torch.nn.Module], model: kdreg.FlexibleBackbone) -> None:
    counts = [sum(p.numel() for p in net.parameters()) for net in nets]
    assert counts == model.count_params(), (
        f"the plain networks hold {counts} parameters, the widths use {model.count_params()}")


def ce_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
            forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[], None]:
    """One CE training step (zero_grad, forward, backward, optimizer step)."""
    run = forward or model

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(run(x), y).backward()
        opt.step()

    return step


def width_and_distill(s: Settings) -> tuple[Figure, Figure, Figure, Figure]:
    """``width_cost_ratio``, ``distill_cost_ratio``, ``width_cost_limit`` and
    ``slimmable_overhead_ratio``: the slimmable steps and the plain networks' in one alternation."""
    model = mobilenet(s)
    x, y = batch(s)
    opt = sgd(model)
    n = model.num_submodels
    graphs = {"ipkd-ta-m": ipkd_ta_m(n),
              "none": LossSettings(kdreg.get_teacher_graph("none", n), IPKD_LAM, IPKD_TAU)}

    def four_widths(loss: LossSettings) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            multi_pass_backward(model, x, y, loss)
            opt.step()
        return step

    steps = {"ipkd-ta-m": four_widths(graphs["ipkd-ta-m"]), "none": four_widths(graphs["none"]),
             "full": ce_step(model, opt, x, y, lambda h: model.forward_submodel(h, n - 1))}
    steps.update(plain_steps(model, plain_mobilenets(model, s.device), x, y))
    t = alternate(steps, rounds=s.steps, warmup=s.warmup, device=s.device)
    m = {k: median(v) for k, v in t.items()}
    width, limit, slim = width_figures(m, model.submodel_labels)
    details = width.details
    details["none_step_s"] = m["none"]
    details["images_per_second"] = {k: s.batch / v for k, v in m.items()}
    macs = model.count_macs((s.size, s.size))
    details["mac_ratio"] = sum(macs) / macs[-1]
    if s.device.type == "cpu":
        details["breakdown"] = width_breakdown(model, x, y, rounds=max(2, s.steps // 4))
    distill = Figure(m["ipkd-ta-m"] / m["none"], details={k: details[k] for k in
                                                            ("ipkd-ta-m_step_s", "none_step_s")})
    return width, distill, limit, slim


def plain_steps(model: kdreg.FlexibleBackbone, nets: list[torch.nn.Module], x: torch.Tensor,
                y: torch.Tensor) -> dict[str, Callable[[], None]]:
    """``{"plain x0.25": a CE step of that width's plain network (its own SGD), ...}``."""
    return {f"plain {label}": ce_step(net, sgd(net), x, y)
            for label, net in zip(model.submodel_labels, nets)}


def width_figures(m: dict[str, float], labels: tuple[str, ...]) -> tuple[Figure, Figure, Figure]:
    """The raw width cost (the 4-width IPKD-TA-M step / the slimmable model's full-width step),
    its limit (the plain networks' steps summed / the plain full width's) and the slimmable
    overhead (the 4-width step / the plain networks' steps summed), from the steps' median
    seconds ``m`` (keys ``ipkd-ta-m``, ``full``, ``plain <label>``)."""
    plain = [m[f"plain {label}"] for label in labels]
    plain_s = {f"{label}_step_s": t for label, t in zip(labels, plain)}
    width = Figure(m["ipkd-ta-m"] / m["full"],
                   details={"ipkd-ta-m_step_s": m["ipkd-ta-m"], "full_step_s": m["full"]})
    limit = Figure(sum(plain) / plain[-1], details={"plain_step_s": plain_s, "plain_sum_s": sum(plain)})
    slim = Figure(m["ipkd-ta-m"] / sum(plain),
                  details={"ipkd-ta-m_step_s": m["ipkd-ta-m"], "plain_sum_s": sum(plain),
                           "full_over_plain_full": m["full"] / plain[-1]})
    return width, limit, slim


def resnet18_widths(s: Settings) -> tuple[Figure, Figure, Figure]:
    """The three width figures of a slimmable timm ResNet-18 derived from the trunk (64x64, batch
    at most 64), against its widths exported as plain networks (``export_submodel``), in the
    trainer's layout."""
    from kdreg_plugins.backbones.slimmable_derived import DerivedSlimmable

    s = attrs.evolve(s, batch=min(s.batch, RESNET18_BATCH))
    torch.manual_seed(0)
    size = (RESNET18_SIZE, RESNET18_SIZE)
    model = kdreg.build_backbone("slimmable", num_classes=NUM_CLASSES, input_size=size, **RESNET18)
    assert isinstance(model, DerivedSlimmable), type(model)
    model = model.to(s.device).train()
    nets = [model.export_submodel(i).to(s.device).train() for i in range(model.num_submodels)]
    check_params(nets, model)
    x, y = batch(s, size=RESNET18_SIZE)
    channels_last = s.channels_last is not False   # the recipe default: true
    for net in (model, *nets):
        if s.device.type == "cpu":
            guard_convs(net)   # as a CPU training stage does (its own layers decide for themselves)
        if channels_last:
            net.to(memory_format=torch.channels_last)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = sgd(model)
    n = model.num_submodels
    loss = ipkd_ta_m(n)

    def four_widths() -> None:
        opt.zero_grad(set_to_none=True)
        multi_pass_backward(model, x, y, loss)
        opt.step()

    steps = {"ipkd-ta-m": four_widths,
             "full": ce_step(model, opt, x, y, lambda h: model.forward_submodel(h, n - 1)),
             **plain_steps(model, nets, x, y)}
    t = alternate(steps, rounds=s.steps, warmup=s.warmup, device=s.device)
    m = {k: median(v) for k, v in t.items()}
    width, limit, slim = width_figures(m, model.submodel_labels)
    width.details.update(input_size=list(size), batch=s.batch, channels_last=channels_last,
                         params=model.count_params())
    return width, limit, slim


def width_breakdown(model: kdreg.FlexibleBackbone, x: torch.Tensor, y: torch.Tensor,
                    rounds: int) -> dict[str, dict[str, Any]]:
    """Where the width cost goes (CPU): each width's forward and backward (CE) timed op by op
    (:class:`probes.KernelTimes`), the time of each kernel class per width (smallest first), the class's time summed over the widths
    / its time at full width, and the same ratio of its MACs (convolutions)."""
    n = model.num_submodels
    seconds, macs = [], []
    for i in range(n):
        def width(i: int = i) -> None:
            F.cross_entropy(model.forward_submodel(x, i), y).backward()
        seconds.append(kernel_seconds(width, rounds))
        macs.append(conv_macs(model, lambda i=i: model.forward_submodel(x, i)))
    model.zero_grad(set_to_none=True)
    out: dict[str, dict[str, Any]] = {}
    for cls in [*KERNEL_CLASSES, "all"]:
        per_width = [sum(t.values()) if cls == "all" else t[cls] for t in seconds]
        row: dict[str, Any] = {"ms_per_width": [round(1e3 * t, 2) for t in per_width],
                               "time_ratio": sum(per_width) / per_width[-1] if per_width[-1] else None}
        if macs[-1].get(cls):
            row["mac_ratio"] = sum(m.get(cls, 0) for m in macs) / macs[-1][cls]
        out[cls] = row
    return out



FAMILY = Family(
    jobs=(Job(("width_cost_ratio", "distill_cost_ratio", "width_cost_limit", "slimmable_overhead_ratio"),
              lambda s, work: width_and_distill(s)),
          Job(("width_cost_ratio_resnet18", "width_cost_limit_resnet18",
               "slimmable_overhead_ratio_resnet18"), lambda s, work: resnet18_widths(s))),
    targets={"width_cost_ratio": ("<=", 1.02),      # x width_cost_limit: RELATIVE
             "slimmable_overhead_ratio": ("<=", 1.02),
             "distill_cost_ratio": ("<=", 1.03)},
    relative={"width_cost_ratio": "width_cost_limit"},
)
