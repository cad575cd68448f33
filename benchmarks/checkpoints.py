"""The checkpoint figure of ``benchmarks/run.py``: what mid-epoch checkpoints cost.

``checkpoint_cost_ratio``: a training epoch of the 4-width slimmable MobileNet-V1 (IPKD-TA-M,
batch ``--batch``, CIFAR-sized inputs) through the trainer's own loop (:meth:`StageTrainer.train_epoch`
and the epoch's ``last.pt``), with a step checkpoint every ``steps / 2`` steps
(``train.checkpoint_every``; 50 in a full run, where an epoch here is 100 steps) / the same epoch
without. The epoch with checkpoints writes ``last.pt`` twice (the mid-epoch one and the epoch's
own), the other once: the ratio is one checkpoint per 50 steps. Each checkpoint is written for
real (serialised, written beside its target, flushed to the disk, renamed) into the work folder.
The two kinds of epoch alternate (with, without, without, with), on the same model and batches.
"""

from __future__ import annotations

import time
from pathlib import Path

from common import Family, Figure, Job, Settings, ipkd_ta_m, mobilenet, synthetic_splits, trainer
from probes import median, sync

from kdreg.engine.preempt import CheckpointClock


def checkpoint_cost(s: Settings, workdir: Path) -> Figure:
    steps = 5 * s.steps                       # 100 in a full run, 15 with --quick
    every = steps // 2
    model = mobilenet(s)
    tr = trainer(s, model, ipkd_ta_m(model.num_submodels), workdir,
                 splits=synthetic_splits(steps * s.batch, s.size))
    assert len(tr.train_loader) == steps
    tr.train_epoch(0, 1)                      # warm-up: the kernels, the allocator, the loader
    times: dict[str, list[float]] = {"with": [], "without": []}
    for kind in ("with", "without", "without", "with"):
        tr.clock = CheckpointClock(steps=every if kind == "with" else 0)
        tr.state.step = 0
        sync(s.device)
        t0 = time.perf_counter()
        tr.train_epoch(0, 1)
        tr.save_last()                        # the epoch's own checkpoint, in both
        sync(s.device)
        times[kind].append(time.perf_counter() - t0)
    size = (tr.checkpoint_dir / "last.pt").stat().st_size
    with_t, without_t = median(times["with"]), median(times["without"])
    return Figure(with_t / without_t, details={
        "epoch_steps": steps, "checkpoint_every": every, "epoch_with_s": times["with"],
        "epoch_without_s": times["without"], "checkpoint_bytes": size})


FAMILY = Family(
    jobs=(Job(("checkpoint_cost_ratio",), checkpoint_cost),),
    targets={"checkpoint_cost_ratio": ("<=", 1.03)},
)
