"""Measuring instruments of ``benchmarks/run.py``: side-by-side step timing, bytes saved for
backward, host reads of tensor data, a loader that runs other steps between a trainer's steps,
and the peak resident memory of a command, compared across sizes over repeated runs.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
import traceback
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(steps: dict[str, Callable[[], Any]], *, rounds: int, warmup: int,
              device: torch.device) -> dict[str, list[float]]:
    """Seconds of each step over ``rounds`` rounds that run every step once, in turn, after
    ``warmup`` such rounds (side by side: the machine's load hits every step alike). Each round
    starts one step later than the one before, so no step always follows the same other one."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(warmup + rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = steps[name]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


class Interleaved:
    """Batches for a trainer's ``train_epoch`` that, between two of its steps, run and time
    ``others`` (in turn), so the trainer's own step (what its loop does per batch) and the others
    alternate in one process. Delegates anything else to ``loader``.

    ``trainer_times`` holds the seconds from handing out a batch to the next request, that is
    one step of the trainer; the first ``warmup`` steps of every kind are dropped.
    """

    def __init__(self, loader: Any, batch: tuple[torch.Tensor, torch.Tensor], steps: int,
                 others: dict[str, Callable[[], Any]], *, warmup: int, device: torch.device):
        self.loader, self.batch, self.steps = loader, batch, steps
        self.others, self.warmup, self.device = others, warmup, device
        self.trainer_times: list[float] = []
        self.other_times: dict[str, list[float]] = {name: [] for name in others}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(self.steps):
            for name, fn in self.others.items():
                sync(self.device)
                t0 = time.perf_counter()
                fn()
                sync(self.device)
                if step >= self.warmup:
                    self.other_times[name].append(time.perf_counter() - t0)
            sync(self.device)
            t0 = time.perf_counter()
            yield self.batch
            sync(self.device)
            elapsed = time.perf_counter() - t0
            if step >= self.warmup:
                self.trainer_times.append(elapsed)


class FirstSteps:
    """``loader``'s first ``steps`` batches (its other attributes are the loader's)."""

    def __init__(self, loader: Any, steps: int):
        self.loader, self.steps = loader, steps

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return self.steps


class TimedLoader(FirstSteps):
    """``loader``'s first ``steps`` batches, with the seconds each took to produce."""

    def __init__(self, loader: Any, steps: int, device: torch.device):
        super().__init__(loader, steps)
        self.device = device
        self.data_times: list[float] = []

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        for _ in range(self.steps):
            sync(self.device)
            t0 = time.perf_counter()
            item = next(it)
            sync(self.device)
            self.data_times.append(time.perf_counter() - t0)
            yield item


class WithinStep(FirstSteps):
    """``loader``'s first ``steps`` batches; step ``step`` (producing its batch, then the loop's
    work on it until the next batch is asked for) runs inside ``context``."""

    def __init__(self, loader: Any, steps: int, step: int, context: Any):
        super().__init__(loader, steps)
        self.step, self.context = step, context

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        for step in range(self.steps):
            if step != self.step:
                yield next(it)
                continue
            with self.context:
                yield next(it)


class SavedBytes:
    """Bytes of the tensors autograd saves for backward that are alive, and their peak, from
    ``saved_tensors_hooks``: a storage counts once however many saved tensors share it, from
    its first pack until the last of them is freed (weakref finalizers). Storages in ``exclude``
    (the parameters, alive anyway) do not count."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.users: Counter[int] = Counter()
        self.size: dict[int, int] = {}
        self.alive = 0
        self.peak = 0
        self.packed = 0  # bytes ever packed (with repeats)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    class _Held:
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor: torch.Tensor):
            self.tensor = tensor

    def _pack(self, tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        held = SavedBytes._Held(tensor)
        if key in self.exclude or storage.nbytes() == 0:
            return held
        self.packed += storage.nbytes()
        if self.users[key] == 0:
            self.size[key] = storage.nbytes()
            self.alive += storage.nbytes()
            self.peak = max(self.peak, self.alive)
        self.users[key] += 1
        weakref.finalize(held, self._release, key)
        return held

    def _release(self, key: int) -> None:
        self.users[key] -= 1
        if self.users[key] == 0:
            self.alive -= self.size.pop(key)
            del self.users[key]

    @staticmethod
    def _unpack(held: SavedBytes._Held) -> torch.Tensor:
        return held.tensor

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


#: Tensor methods that read a tensor's values on the host (a device-to-host copy and a wait for
#: the device on an accelerator).
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy",
              "nonzero")


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor data (:data:`HOST_READS`, and ``cpu()`` / ``to(cpu)`` of a
    tensor on another device), each with the first call site in this repository."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS or (name in ("cpu", "to") and _leaves_device(name, args, kwargs)):
            self.sites[f"{name} at {_call_site()}"] += 1
        return func(*args, **kwargs)


def _leaves_device(name: str, args: Any, kwargs: Any) -> bool:
    source = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if source is None or source.device.type == "cpu":
        return False
    if name == "cpu":
        return True
    target = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            target = a
    return target is not None and torch.device(target).type == "cpu"


def _call_site() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):  # not this function nor the mode
        path = Path(frame.filename)
        if REPO in path.parents and path.parent.name != "benchmarks":
            return f"{path.relative_to(REPO)}:{frame.lineno}"
    return "outside the repository"


# ------------------------------------------------------------------------------ kernel classes
KERNEL_CLASSES = ("pointwise conv", "depthwise conv", "other conv", "batch norm + relu", "the rest")
_NORM_RELU = ("batch_norm", "threshold_backward", "relu", "clamp_min")


def conv_class(weight_shape: list[int] | tuple[int, ...]) -> str:
    """``pointwise conv`` (1x1), ``depthwise conv`` (one input channel per group, k > 1) or
    ``other conv``, from a conv's weight shape (out, in / groups, kh, kw)."""
    if list(weight_shape[2:]) == [1, 1]:
        return "pointwise conv"
    return "depthwise conv" if weight_shape[1] == 1 else "other conv"


def kernel_class(name: str, input_shapes: list[Any]) -> str:
    """The class of a CPU op (its name and input shapes): convolutions by their weight
    (forward ops take it second, ``convolution_backward`` third), then batch norm and ReLU
    (forward and backward), then everything else."""
    if "convolution" in name:
        weight = input_shapes[2] if "backward" in name else input_shapes[1]
        if len(weight) == 4:
            return conv_class(weight)
    if any(part in name for part in _NORM_RELU):
        return "batch norm + relu"
    return "the rest"


class KernelTimes(TorchDispatchMode):
    """Seconds spent inside the CPU's aten ops while active, by :data:`KERNEL_CLASSES` (each op
    timed around its own call: forward and the backward the autograd engine runs in this thread;
    no profiler, whose buffers would grow the heap while it measures)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = dict.fromkeys(KERNEL_CLASSES, 0.0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - t0
        shapes = [list(a.shape) if isinstance(a, torch.Tensor) else [] for a in args]
        self.seconds[kernel_class(func.__name__, shapes)] += elapsed
        return out


def kernel_seconds(fn: Callable[[], Any], rounds: int) -> dict[str, float]:
    """Seconds per call of ``fn`` inside each class of CPU ops (:class:`KernelTimes`), over
    ``rounds`` calls after one untimed call."""
    fn()
    with KernelTimes() as times:
        for _ in range(rounds):
            fn()
    return {cls: t / rounds for cls, t in times.seconds.items()}


def conv_macs(model: torch.nn.Module, run: Callable[[], Any]) -> dict[str, int]:
    """Multiply-accumulates of every ``Conv2d`` in ``model`` during ``run()``, by conv class
    (one sample: output elements x input channels per group x kernel area)."""
    macs: dict[str, int] = {}

    def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        depthwise = module.groups > 1 and module.groups == module.in_channels  # (a slimmable one too)
        per_group = 1 if depthwise else args[0].shape[1] // module.groups
        kh, kw = module.kernel_size
        cls = conv_class((out.shape[1], per_group, kh, kw))
        macs[cls] = macs.get(cls, 0) + out[0].numel() * per_group * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return macs


# ------------------------------------------------------------------------------ memory
def tree_pss(pid: int) -> int:
    """Resident bytes of process ``pid`` and all its descendants (Linux ``/proc``): the sum of
    their proportional set sizes (a page shared by k processes counts 1/k in each), so memory the
    loader workers share with the training process after ``fork`` is counted once."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def peak_pss(command: list[str], env: dict[str, str] | None = None, every: float = 0.02) -> tuple[int, float]:
    """Peak of :func:`tree_pss` while ``command`` runs, and its seconds; its exit must be 0."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_pss(proc.pid))
        time.sleep(every)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: {err.strip()[-500:]}")
    return peak, time.perf_counter() - t0


def median_ratio(measure: Callable[[int], float], sizes: tuple[int, int],
                 repeats: int) -> tuple[float, dict[int, list[float]]]:
    """``median(measure(large)) / median(measure(small))`` for ``sizes = (small, large)``, and
    every reading of each size in the order taken. Each size is measured ``repeats`` times, the
    sizes taking turns (small first in even rounds, large first in odd ones) so the machine's load
    hits both alike, and one low or high reading does not decide the ratio."""
    readings: dict[int, list[float]] = {n: [] for n in sizes}
    for r in range(repeats):
        for n in sizes if r % 2 == 0 else sizes[::-1]:
            readings[n].append(measure(n))
    small, large = sizes
    return median(readings[large]) / median(readings[small]), readings
