"""kdreg's performance figures, every one measured side by side in one process.

    python benchmarks/run.py --json bench.json [--quick] [--data PATH] [--threads N] [--channels-last true|false]

Prints a table (figure, value, target, pass/fail) and writes the JSON
``{figure: value, ..., "targets": {...}, "passed": {...}, "notes": {...}, "details": {...},
"machine": {...}}``. A figure that cannot be measured is ``null`` with its reason in ``notes``
(``missing: ...``), never a made-up number. Every time is the median of ``--steps`` (at least
20; ``--quick``: 3, a smoke test) steps after warm-up, the steps compared alternating in turn, so
the load of a shared machine hits them alike.

Figures (4-width slimmable MobileNet-V1 on 32x32 inputs, CIFAR-10 classes, batch 128):

* ``overhead_ratio``: the step of ``StageTrainer.train_epoch`` (set_lr, zero_grad,
  ``stage_backward``, the optimizer step, metric accumulation: its own loop, run for real, with
  the hand-written step run between two of its steps) / a minimal hand-written PyTorch step with
  the same IPKD-TA-M arithmetic (widths largest first, each backward as it comes).
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
* ``activation_memory_ratio``: peak bytes saved for backward (``saved_tensors_hooks``; a storage
  counts from its first pack until its last saved tensor is freed; parameters excluded) of
  ``multi_pass_backward`` / one forward of every width, the graph loss summed, one backward.
* ``teacher_saved_bytes``: bytes saved for backward while a frozen ResNet-56 teacher gives its
  logits in a KD step (``Teachers.outputs``).
* ``loader_fraction``: time in ``BatchLoader`` iteration / total time of a training epoch on
  CIFAR-10-sized data (50,000 uint8 32x32 images; synthetic, or ``--data`` for an image folder or
  archive) with the trainer's own loop, measured over ``--loader-steps`` steps and extrapolated to
  the whole epoch (the epoch's set-up once, the per-batch times ``len(loader)`` times).
* ``host_syncs_per_step``: host reads of tensor data (``item``, ``tolist``, ``__bool__``,
  ``numpy``, ``nonzero``, ``cpu()`` / ``to("cpu")`` off the device, ...; a ``TorchFunctionMode``)
  during a normal (not logging) step of the trainer (its batch from ``BatchLoader``, then the
  trainer's work on it); their call sites go to ``details``. On CUDA
  ``torch.cuda.set_sync_debug_mode`` counts the synchronisations too.
* ``peer_ratio``: kdreg's KD step (the trainer's step; frozen ``resnet56`` teacher, ``resnet20``
  student, graph ``kd``, lam 0.9, tau 4) / torchdistill's: its ``KDLoss`` module (alpha 0.1,
  T 4, given the logits as its io dicts) in the equivalent step on copies of the same models
  (same weights) and the same batch.
* ``feature_loss_cost_ratio``: a KD + AT step (attention transfer at ``layer1``-``layer3``,
  weight 1000) / a KD step, ResNet-56 -> ResNet-20, batch 128, each a stage assembled from its
  recipe (``benchmarks/feature_cost.py``); ``crd_cost_ratio`` (reported): a KD + CRD step (pooled
  ``layer3``, 16,384 negatives, memory banks of 50,000 samples) / the KD step.

The streamed data path (``benchmarks/streaming.py``):

* ``stream_loader_ratio``: images per second of kdreg's streaming loader / torchvision's
  ``ImageFolder`` + ``DataLoader`` with its reference preset (RandomResizedCrop to 128 px + flip,
  float tensors out), the same workers (``--workers``) and batch, on a folder of 2,000 JPEGs of
  300-500 px a side built from the packaged sample; whole epochs, alternating.
* ``stream_memory_ratio``: peak resident memory (process and loader workers, proportional set sizes summed) of ``kdreg run``
  training one streamed epoch over 8,000 images / over 2,000 images.
* ``loader_fraction_streamed`` (reported): ``loader_fraction`` with the packaged sample's 32x32
  JPEGs streamed through worker processes (``data.in_memory = false``).

torchdistill comes with the ``bench`` extra (``pip install -e ".[bench]"``). Its declared
requirements (numpy, pyyaml, scipy, cython) may move the installed torch; where they would, install
it without them: ``pip install --no-deps "torchdistill>=1.0"``. Its loss modules import with torch,
torchvision, numpy, pyyaml and scipy alone (cython is only needed to build pycocotools).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import streaming  # noqa: E402  (a sibling module of this script)
from feature_cost import feature_cost  # noqa: E402  (a sibling module of this script)
from probes import (  # noqa: E402  (a sibling module of this script)
    KERNEL_CLASSES,
    HostReads,
    Interleaved,
    SavedBytes,
    TimedLoader,
    WithinStep,
    alternate,
    conv_macs,
    kernel_seconds,
    median,
)

import kdreg  # noqa: E402
from kdreg.data import Splits, TensorSet, channel_stats  # noqa: E402
from kdreg.engine.host_memory import keep_freed_memory  # noqa: E402
from kdreg.engine.pointwise import guard_convs  # noqa: E402
from kdreg.engine.step import LossSettings, Teachers, multi_pass_backward  # noqa: E402
from kdreg.engine.trainer import StageTrainer  # noqa: E402
from kdreg.errors import UserError  # noqa: E402
from kdreg.losses import distillation_loss  # noqa: E402
from kdreg.recipe import OptimizerConfig, ScheduleConfig, TrainConfig  # noqa: E402
from kdreg.stages import freeze  # noqa: E402

#: figure -> (comparison, bound)
TARGETS: dict[str, tuple[str, float]] = {
    "overhead_ratio": ("<=", 1.05),
    "width_cost_ratio": ("<=", 1.02),      # x width_cost_limit: RELATIVE
    "slimmable_overhead_ratio": ("<=", 1.02),
    "distill_cost_ratio": ("<=", 1.03),
    "activation_memory_ratio": ("<=", 0.45),
    "teacher_saved_bytes": ("==", 0),
    "loader_fraction": ("<=", 0.05),
    "host_syncs_per_step": ("==", 0),
    "peer_ratio": ("<=", 0.85),
    "stream_loader_ratio": (">=", 1.2),
    "stream_memory_ratio": ("<=", 1.10),
    "feature_loss_cost_ratio": ("<=", 1.05),
}
#: figure -> the figure its bound is a multiple of (the bound: TARGETS' number x that figure)
RELATIVE = {"width_cost_ratio": "width_cost_limit"}
#: figures reported beside the others, with no target
REPORTED = ("width_cost_limit", "loader_fraction_streamed", "width_cost_ratio_resnet18",
            "width_cost_limit_resnet18", "slimmable_overhead_ratio_resnet18", "crd_cost_ratio")
NUM_CLASSES = 10
LAM, TAU = 0.9, 4.0            # the KD step (the peer's alpha = 1 - LAM)
IPKD_LAM, IPKD_TAU = 0.5, 1.0  # the slimmable steps
LR = 0.1
#: the derived slimmable ResNet-18 of the ``*_resnet18`` figures, its input size and its largest
#: batch (64 keeps its alternation to about 40 s on 2 cores)
RESNET18 = {"trunk": {"name": "timm", "model": "resnet18"}, "widths": [0.25, 0.5, 0.75, 1.0]}
RESNET18_SIZE = 64
RESNET18_BATCH = 64


@attrs.frozen
class Settings:
    device: torch.device
    batch: int = 128
    steps: int = 20
    warmup: int = 3
    size: int = 32
    images: int = 50_000
    loader_steps: int = 40
    data: str | None = None
    workers: int = 2                   # loader worker processes of the streamed figures
    stream_images: int = 2_000         # stream_loader_ratio's folder
    memory_images: tuple[int, int] = (2_000, 8_000)
    stream_rounds: int = 5
    #: the trainer's ``train.channels_last`` (the trainer-based figures); None: the recipe default
    channels_last: bool | None = None


@attrs.define
class Figure:
    value: float | int | None
    note: str = ""
    details: dict[str, Any] = attrs.field(factory=dict)


# ------------------------------------------------------------------------------ building blocks
def mobilenet(s: Settings) -> kdreg.FlexibleBackbone:
    torch.manual_seed(0)
    model = kdreg.build_backbone("slimmable_mobilenet_v1", num_classes=NUM_CLASSES,
                                 input_size=(s.size, s.size))
    return model.to(s.device).train()


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


def batch(s: Settings, seed: int = 0, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = size or s.size
    x = torch.randn(s.batch, 3, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (s.batch,), generator=g)
    return x.to(s.device), y.to(s.device)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4, nesterov=True)


def train_config(s: Settings) -> TrainConfig:
    """A recipe's defaults but for one epoch, SGD at lr 0.1, cosine, fp32."""
    layout = {} if s.channels_last is None else {"channels_last": s.channels_last}
    return TrainConfig(epochs=1, optimizer=OptimizerConfig(lr=LR, momentum=0.9, weight_decay=5e-4),
                       schedule=ScheduleConfig(name="cosine"), device="auto", precision="fp32",
                       **layout)


def synthetic_splits(n: int, size: int, seed: int = 0) -> Splits:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    mean, std = channel_stats(images[:5000])
    empty = TensorSet(images[:0], labels[:0])
    return Splits(TensorSet(images, labels), empty, empty, classes=[str(k) for k in range(NUM_CLASSES)],
                  mean=mean, std=std)


def trainer(s: Settings, model: kdreg.FlexibleBackbone, loss: LossSettings, directory: Path,
            teachers: Teachers | None = None, splits: Splits | None = None) -> StageTrainer:
    """The engine's stage trainer, as a run builds it (no progress bar, no files written)."""
    splits = splits or synthetic_splits(2 * s.batch, s.size)
    return StageTrainer(name="bench", model=model, splits=splits, train_cfg=train_config(s), loss=loss,
                        device=s.device, seed=0, batch_size=s.batch, eval_batch_size=s.batch,
                        directory=directory, notify=lambda record: None, progress=False,
                        teachers=teachers)


def ipkd_ta_m(n: int) -> LossSettings:
    return LossSettings(kdreg.get_teacher_graph("ipkd-ta-m", n), IPKD_LAM, IPKD_TAU)


def hand_written_step(model: kdreg.FlexibleBackbone, opt: torch.optim.Optimizer,
                      x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """IPKD-TA-M in plain PyTorch: widths largest first, each backward as it comes; width i
    learns from every larger width's detached logits, weight 1 / (number of them)."""
    n = model.num_submodels

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        larger: list[torch.Tensor] = []
        for i in reversed(range(n)):
            logits = model.forward_submodel(x, i)
            loss = F.cross_entropy(logits, y)
            if larger:
                log_ps = F.log_softmax(logits / IPKD_TAU, dim=-1)
                kd = sum(F.kl_div(log_ps, F.log_softmax(t / IPKD_TAU, dim=-1), reduction="batchmean",
                                  log_target=True) for t in larger)
                loss = (1 - IPKD_LAM) * loss + IPKD_LAM * IPKD_TAU ** 2 * kd / len(larger)
            loss.backward()
            larger.append(logits.detach())
        opt.step()

    return step


def run_epoch(tr: StageTrainer, loader: Any) -> None:
    tr.train_loader = loader
    tr.train_epoch(0, 1)


# ------------------------------------------------------------------------------ figures
def overhead(s: Settings, workdir: Path) -> Figure:
    model = mobilenet(s)
    x, y = batch(s)
    tr = trainer(s, model, ipkd_ta_m(model.num_submodels), workdir)
    hand = hand_written_step(model, sgd(model), x, y)
    loader = Interleaved(tr.train_loader, (x, y), s.warmup + s.steps, {"hand": hand},
                         warmup=s.warmup, device=s.device)
    run_epoch(tr, loader)
    kd_t, hand_t = median(loader.trainer_times), median(loader.other_times["hand"])
    return Figure(kd_t / hand_t, details={"kdreg_step_s": kd_t, "hand_written_step_s": hand_t})


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


def activation_memory(s: Settings) -> Figure:
    model = mobilenet(s)
    x, y = batch(s)
    loss = ipkd_ta_m(model.num_submodels)
    params = list(model.parameters())
    with SavedBytes(exclude=params) as per_model:
        multi_pass_backward(model, x, y, loss)
    model.zero_grad(set_to_none=True)
    with SavedBytes(exclude=params) as summed:
        logits = [model.forward_submodel(x, i) for i in range(model.num_submodels)]
        distillation_loss(logits, y, loss.graph, lam=loss.lam, tau=loss.tau).backward()
        del logits
    model.zero_grad(set_to_none=True)
    return Figure(per_model.peak / summed.peak,
                  details={"multi_pass_peak_bytes": per_model.peak, "summed_peak_bytes": summed.peak})


def kd_models(s: Settings) -> tuple[kdreg.FlexibleBackbone, kdreg.FlexibleBackbone]:
    torch.manual_seed(0)
    teacher = kdreg.build_backbone("resnet56", num_classes=NUM_CLASSES, input_size=(s.size, s.size))
    student = kdreg.build_backbone("resnet20", num_classes=NUM_CLASSES, input_size=(s.size, s.size))
    return freeze(teacher.to(s.device)), student.to(s.device).train()


def kd_setup(s: Settings, teacher: kdreg.FlexibleBackbone) -> tuple[LossSettings, Teachers]:
    graph = kdreg.get_teacher_graph("kd", 1, teacher="teacher")
    teachers = Teachers({"teacher": teacher}, {node: ("teacher", 0) for node in graph.external})
    return LossSettings(graph, LAM, TAU), teachers


def teacher_saved(s: Settings) -> Figure:
    teacher, _ = kd_models(s)
    _, teachers = kd_setup(s, teacher)
    x, _ = batch(s)
    with SavedBytes() as saved:
        teachers.outputs(x, None)
    return Figure(saved.packed, details={"peak_bytes": saved.peak})


def loader_fraction(s: Settings, workdir: Path, streamed: bool = False) -> Figure:
    if streamed:
        from kdreg.data.loading import load_data
        from kdreg.recipe import AugmentConfig, DataConfig

        splits = load_data(DataConfig(dataset="imagefolder", root=str(streaming.SAMPLE), val_split=0,
                                      in_memory=False, image_size=s.size,
                                      augment=AugmentConfig(name="cifar"), workers=s.workers))
        source = (f"the packaged sample streamed ({len(splits.train)} JPEGs of {s.size}x{s.size}, "
                  f"{s.workers} loader workers)")
    elif s.data:
        from kdreg_plugins.datasets.folder import load_image_folder

        data = load_image_folder(Path(s.data))
        splits = Splits(TensorSet(data.train_images, data.train_labels),
                        TensorSet(data.test_images[:0], data.test_labels[:0]),
                        TensorSet(data.test_images[:0], data.test_labels[:0]),
                        classes=data.classes, mean=data.mean, std=data.std)
        source = f"{s.data} ({len(splits.train)} training images)"
    else:
        splits = synthetic_splits(s.images, s.size)
        source = f"synthetic: {s.images} uint8 images of 3x{s.size}x{s.size}"
    model = mobilenet(s)
    tr = trainer(s, model, ipkd_ta_m(model.num_submodels), workdir, splits=splits)
    real: Any = tr.train_loader
    steps = min(s.loader_steps, len(real))
    timed = TimedLoader(real, steps, s.device)
    t0 = time.perf_counter()
    run_epoch(tr, timed)
    total = time.perf_counter() - t0
    setup = timed.data_times[0]           # the epoch's draws and its first batch
    per_batch = median(timed.data_times[1:] or timed.data_times)
    per_step = (total - sum(timed.data_times)) / steps
    epoch_steps = len(real)
    data = setup + per_batch * (epoch_steps - 1)
    whole = data + per_step * epoch_steps
    return Figure(data / whole, details={
        "source": source, "measured_steps": steps, "epoch_steps": epoch_steps,
        "first_batch_s": setup, "batch_s": per_batch, "step_s_without_data": per_step,
        "measured_fraction": sum(timed.data_times) / total})


@contextlib.contextmanager
def counting(reads: HostReads, device: torch.device, cuda_syncs: list[Any]) -> Any:
    """Host reads counted; on CUDA also the synchronisations ``set_sync_debug_mode`` reports."""
    with reads:
        if device.type != "cuda":
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
                cuda_syncs.extend(str(w.message) for w in caught)


def host_syncs(s: Settings, workdir: Path) -> Figure:
    model = mobilenet(s)
    tr = trainer(s, model, ipkd_ta_m(model.num_submodels), workdir,
                 splits=synthetic_splits(8 * s.batch, s.size))
    counted = 2                             # a step in the middle: not the epoch's logging step
    reads, cuda_syncs = HostReads(), []
    loader = WithinStep(tr.train_loader, counted + 2, counted, counting(reads, s.device, cuda_syncs))
    run_epoch(tr, loader)
    details: dict[str, Any] = {"sites": dict(reads.sites),
                               "counted": f"step {counted + 1} of {counted + 2}: its batch from "
                                          "BatchLoader, then the trainer's work on it"}
    value = reads.count
    if s.device.type == "cuda":
        details["cuda_sync_warnings"] = cuda_syncs
        value = max(value, len(cuda_syncs))
    return Figure(value, details=details)


def peer(s: Settings, workdir: Path) -> Figure:
    try:
        import torchdistill
        from torchdistill.losses.mid_level import KDLoss
    except Exception as exc:  # any failure to import is the reason it is missing
        return Figure(None, f"missing: torchdistill cannot be imported ({type(exc).__name__}: {exc}); "
                            'pip install -e ".[bench]"')
    teacher, student = kd_models(s)
    # torchdistill's own copies (same weights): what the engine does to its models (memory
    # format, compilation) stays kdreg's
    their_teacher, their_student = copy.deepcopy(teacher), copy.deepcopy(student)
    loss, teachers = kd_setup(s, teacher)
    x, y = batch(s)
    tr = trainer(s, student, loss, workdir, teachers=teachers)
    kd_loss = KDLoss("fc", "output", "fc", "output", temperature=TAU, alpha=1 - LAM).to(s.device)
    opt = sgd(their_student)

    def theirs() -> None:
        with torch.no_grad():
            t_logits = their_teacher.forward_submodel(x, 0)
        s_logits = their_student.forward_submodel(x, 0)
        value = kd_loss({"fc": {"output": s_logits}}, {"fc": {"output": t_logits}}, y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    others = {"torchdistill": theirs, "teacher": lambda: teachers.outputs(x, None)}
    loader = Interleaved(tr.train_loader, (x, y), s.warmup + s.steps, others, warmup=s.warmup,
                         device=s.device)
    run_epoch(tr, loader)
    ours, other = median(loader.trainer_times), median(loader.other_times["torchdistill"])
    teacher_s = median(loader.other_times["teacher"])
    return Figure(ours / other, details={"kdreg_step_s": ours, "torchdistill_step_s": other,
                                         "teacher_outputs_s": teacher_s,
                                         "torchdistill_version": torchdistill.__version__})


# ------------------------------------------------------------------------------ report
def feature_losses(s: Settings) -> tuple[Figure, Figure]:
    """``feature_loss_cost_ratio`` (a KD + AT step / a KD step) and ``crd_cost_ratio`` (a KD +
    CRD step / a KD step): ResNet-56 -> ResNet-20 (``benchmarks/feature_cost.py``)."""
    at, crd, details = feature_cost(s.device, batch=s.batch, size=s.size, images=s.images,
                                    num_classes=NUM_CLASSES, rounds=s.steps, warmup=s.warmup,
                                    channels_last=s.channels_last is not False)
    return Figure(at, details=details), Figure(crd, details=details)


def measure(s: Settings) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    if s.device.type == "cpu":
        keep_freed_memory()  # as a CPU training stage does, for every figure alike
    with tempfile.TemporaryDirectory(prefix="kdreg-bench-") as tmp:
        work = Path(tmp)
        jobs: list[tuple[tuple[str, ...], Callable[[], Any]]] = [
            (("overhead_ratio",), lambda: overhead(s, work)),
            (("width_cost_ratio", "distill_cost_ratio", "width_cost_limit", "slimmable_overhead_ratio"),
             lambda: width_and_distill(s)),
            (("width_cost_ratio_resnet18", "width_cost_limit_resnet18",
              "slimmable_overhead_ratio_resnet18"), lambda: resnet18_widths(s)),
            (("activation_memory_ratio",), lambda: activation_memory(s)),
            (("teacher_saved_bytes",), lambda: teacher_saved(s)),
            (("loader_fraction",), lambda: loader_fraction(s, work)),
            (("host_syncs_per_step",), lambda: host_syncs(s, work)),
            (("peer_ratio",), lambda: peer(s, work)),
            (("stream_loader_ratio",), lambda: stream_loader(s, work)),
            (("stream_memory_ratio",), lambda: stream_memory(s, work)),
            (("loader_fraction_streamed",), lambda: loader_fraction(s, work, streamed=True)),
            (("feature_loss_cost_ratio", "crd_cost_ratio"), lambda: feature_losses(s)),
        ]
        for keys, job in jobs:
            print(f"measuring {', '.join(keys)} ...", file=sys.stderr, flush=True)
            try:
                out = job()
            except Exception as exc:  # one broken figure must not hide the others
                out = tuple(Figure(None, f"missing: the measurement failed ({type(exc).__name__}: {exc})")
                            for _ in keys)
            figures.update(zip(keys, out if isinstance(out, tuple) else (out,)))
    return figures


def stream_loader(s: Settings, workdir: Path) -> Figure:
    out = streaming.loader_ratio(workdir, images=s.stream_images, workers=s.workers, batch=s.batch,
                                 rounds=s.stream_rounds)
    return Figure(out.pop("ratio"), details=out)


def stream_memory(s: Settings, workdir: Path) -> Figure:
    small, large = s.memory_images
    out = streaming.memory_ratio(workdir, small=small, large=large, workers=s.workers,
                                 batch=min(s.batch, 64))
    return Figure(out.pop("ratio"), details=out)


def bound_of(key: str, result: dict[str, Any]) -> float | None:
    """The number ``key``'s value is compared with: TARGETS' bound, times the figure it is judged
    against for a RELATIVE one (None when that figure is missing)."""
    _, bound = TARGETS[key]
    if key not in RELATIVE:
        return bound
    limit = result.get(RELATIVE[key])
    return None if limit is None else bound * limit


def passed(key: str, value: float | None, bound: float | None) -> bool | None:
    if value is None or bound is None:
        return None
    op, _ = TARGETS[key]
    return {"<=": value <= bound, ">=": value >= bound}.get(op, value == bound)


def machine(s: Settings) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(s.device), "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in attrs.asdict(s).items()},
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = os.getloadavg()
    if s.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(s.device)
    else:
        info["host_memory_kept"] = keep_freed_memory()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def report(figures: dict[str, Figure], s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {k: _finite(f.value) for k, f in figures.items()}
    out["targets"] = {k: f"{op} {bound:g}" + (f" x {RELATIVE[k]}" if k in RELATIVE else "")
                      for k, (op, bound) in TARGETS.items()}
    bounds = {k: bound_of(k, out) for k in TARGETS}
    out["passed"] = {k: passed(k, out.get(k), bounds[k]) for k in TARGETS}
    out["notes"] = {k: f.note for k, f in figures.items() if f.note}
    out["details"] = {k: f.details for k, f in figures.items() if f.details}
    for k, against in RELATIVE.items():   # the judged bound, and the raw figure over its limit
        if out.get(k) is not None and bounds[k] is not None:
            out["details"].setdefault(k, {}).update(bound=bounds[k], over_limit=out[k] / out[against])
    out["machine"] = machine(s)
    return out


def _finite(value: float | int | None) -> float | int | None:
    if value is None or isinstance(value, int):
        return value
    return value if math.isfinite(value) else None


def table(result: dict[str, Any]) -> str:
    rows = [("figure", "value", "target", "result")]
    order = [k for t in TARGETS for k in (t, RELATIVE.get(t)) if k]   # a limit below its figure
    for key in (*order, *(k for k in REPORTED if k not in order)):
        value = result.get(key)
        shown = ("null" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
        if key in REPORTED:
            rows.append((key, shown, "-", "reported"))
            continue
        ok = result["passed"][key]
        target = result["targets"][key]
        if key in RELATIVE:   # the raw ratio, judged against its limit
            bound = result["details"].get(key, {}).get("bound")
            key = f"{key} (raw)"
            target += "" if bound is None else f" = {bound:.3f}"
        rows.append((key, shown, target, "missing" if ok is None else "pass" if ok else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"{k}: {v}" for k, v in result["notes"].items()]
    return "\n".join(lines)


def breakdown_table(result: dict[str, Any]) -> str:
    """The width cost by kernel class (empty when it was not measured)."""
    rows = result["details"].get("width_cost_ratio", {}).get("breakdown")
    if not rows:
        return ""
    span = 7 * len(next(iter(rows.values()))["ms_per_width"]) - 1
    lines = ["width_cost_ratio by kernel class (CPU ms per width, smallest first; summed / full width):",
             f"  {'class':18s} {'ms per width':>{span}s}  {'time':>5s}  {'MACs':>5s}"]
    for cls, row in rows.items():
        ms = " ".join(f"{t:6.1f}" for t in row["ms_per_width"])
        time_ratio = "-" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}"
        mac = f"{row['mac_ratio']:.2f}" if "mac_ratio" in row else "-"
        lines.append(f"  {cls:18s} {ms:>{span}s}  {time_ratio:>5s}  {mac:>5s}")
    return "\n".join(lines)


def settings_from(args: argparse.Namespace) -> Settings:
    """The run's settings, or :class:`UserError` (a line per bad flag)."""
    problems = []
    if args.data and not Path(args.data).expanduser().exists():
        problems.append(f"--data {args.data}: no such folder or archive")
    if args.steps is not None and args.steps < (1 if args.quick else 20):
        problems.append(f"--steps {args.steps}: every time is a median of at least 20 steps "
                        "(--quick for a smoke test of fewer)")
    for flag in ("batch", "threads", "loader_steps", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            problems.append(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        problems.append(f"--device {args.device}: auto, cpu or cuda[:N]")
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: CUDA is not available here")
    if problems:
        raise UserError(problems)
    layout = None if args.channels_last is None else args.channels_last == "true"
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        return Settings(device=device, batch=args.batch or 16, steps=args.steps or 3, warmup=1,
                        images=2_000, loader_steps=3, data=args.data,
                        channels_last=layout, workers=args.workers, stream_images=64,
                        memory_images=(32, 64), stream_rounds=1)
    return Settings(device=device, batch=args.batch or 128, steps=args.steps or 20,
                    loader_steps=args.loader_steps, data=args.data, channels_last=layout,
                    workers=args.workers)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True, help="where the results go (JSON)")
    p.add_argument("--quick", action="store_true", help="few steps on small batches: a smoke test")
    p.add_argument("--data", help="an image folder or archive instead of synthetic CIFAR-10-sized data")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch", type=int, help="batch size (default 128; --quick 16)")
    p.add_argument("--steps", type=int, help="timed steps per figure (at least 20; --quick 3)")
    p.add_argument("--loader-steps", type=int, default=40, help="steps of the epoch loader_fraction times")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes of the streamed figures")
    p.add_argument("--channels-last", choices=["true", "false"],
                   help="the trainer's train.channels_last (default: the recipe default, true)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        s = settings_from(args)
    except UserError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    result = report(measure(s), s)
    print(table(result))
    if breakdown := breakdown_table(result):
        print(breakdown)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
