"""The step figures of ``benchmarks/run.py``: what kdreg's own step costs against a hand-written
one and a peer's, the bytes it saves for backward, and the host reads it makes.

Figures (4-width slimmable MobileNet-V1 on 32x32 inputs, CIFAR-10 classes, batch 128):

* ``overhead_ratio``: the step of ``StageTrainer.train_epoch`` (set_lr, zero_grad,
  ``stage_backward``, the optimizer step, metric accumulation: its own loop, run for real, with
  the hand-written step run between two of its steps) / a minimal hand-written PyTorch step with
  the same IPKD-TA-M arithmetic (widths largest first, each backward as it comes).
* ``activation_memory_ratio``: peak bytes saved for backward (``saved_tensors_hooks``; a storage
  counts from its first pack until its last saved tensor is freed; parameters excluded) of
  ``multi_pass_backward`` / one forward of every width, the graph loss summed, one backward.
* ``teacher_saved_bytes``: bytes saved for backward while a frozen ResNet-56 teacher gives its
  logits in a KD step (``Teachers.outputs``).
* ``host_syncs_per_step``: host reads of tensor data (``item``, ``tolist``, ``__bool__``,
  ``numpy``, ``nonzero``, ``cpu()`` / ``to("cpu")`` off the device, ...; a ``TorchFunctionMode``)
  during a normal (not logging) step of the trainer (its batch from ``BatchLoader``, then the
  trainer's work on it); their call sites go to ``details``. On CUDA
  ``torch.cuda.set_sync_debug_mode`` counts the synchronisations too.
* ``peer_ratio``: kdreg's KD step (the trainer's step; frozen ``resnet56`` teacher, ``resnet20``
  student, graph ``kd``, lam 0.9, tau 4) / torchdistill's: its ``KDLoss`` module (alpha 0.1,
  T 4, given the logits as its io dicts) in the equivalent step on copies of the same models
  (same weights) and the same batch.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    run_epoch,
    sgd,
    synthetic_splits,
    trainer,
)
from probes import HostReads, Interleaved, SavedBytes, WithinStep, median

import kdreg
from kdreg.engine.step import LossSettings, Teachers, multi_pass_backward
from kdreg.losses import distillation_loss
from kdreg.stages import freeze

LAM, TAU = 0.9, 4.0            # the KD step (the peer's alpha = 1 - LAM)


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


FAMILY = Family(
    jobs=(Job(("overhead_ratio",), overhead),
          Job(("activation_memory_ratio",), lambda s, work: activation_memory(s)),
          Job(("teacher_saved_bytes",), lambda s, work: teacher_saved(s)),
          Job(("host_syncs_per_step",), host_syncs),
          Job(("peer_ratio",), peer)),
    targets={"overhead_ratio": ("<=", 1.05), "activation_memory_ratio": ("<=", 0.45),
             "teacher_saved_bytes": ("==", 0), "host_syncs_per_step": ("==", 0),
             "peer_ratio": ("<=", 0.85)},
)
