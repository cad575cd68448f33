"""The data figures of ``benchmarks/run.py``: what share of a training epoch waits for batches,
in memory and streamed, and what the streamed path costs against torchvision's.

* ``loader_fraction``: time in ``BatchLoader`` iteration / total time of a training epoch on
  CIFAR-10-sized data (50,000 uint8 32x32 images; synthetic, or ``--data`` for an image folder or
  archive) with the trainer's own loop, measured over ``--loader-steps`` steps and extrapolated to
  the whole epoch (the epoch's set-up once, the per-batch times ``len(loader)`` times).

The streamed data path (``benchmarks/streaming.py``):

* ``stream_loader_ratio``: images per second of kdreg's streaming loader / torchvision's
  ``ImageFolder`` + ``DataLoader`` with its reference preset (RandomResizedCrop to 128 px + flip,
  float tensors out), the same workers (``--workers``) and batch, on a folder of 2,000 JPEGs of
  300-500 px a side built from the packaged sample; whole epochs, alternating.
* ``stream_memory_ratio``: peak resident memory (process and loader workers, proportional set
  sizes summed) of ``kdreg run`` training one streamed epoch over 8,000 images / over 2,000
  images: the ratio of the medians of three runs of each size (``--quick``: one), the sizes
  alternating; every reading goes to the details.
* ``loader_fraction_streamed`` (reported): ``loader_fraction`` with the packaged sample's 32x32
  JPEGs streamed through worker processes (``data.in_memory = false``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import streaming
from common import (
    Family,
    Figure,
    Job,
    Settings,
    ipkd_ta_m,
    mobilenet,
    run_epoch,
    synthetic_splits,
    trainer,
)
from probes import TimedLoader, median

from kdreg.data import Splits, TensorSet


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


def stream_loader(s: Settings, workdir: Path) -> Figure:
    out = streaming.loader_ratio(workdir, images=s.stream_images, workers=s.workers, batch=s.batch,
                                 rounds=s.stream_rounds)
    return Figure(out.pop("ratio"), details=out)


def stream_memory(s: Settings, workdir: Path) -> Figure:
    small, large = s.memory_images
    out = streaming.memory_ratio(workdir, small=small, large=large, workers=s.workers,
                                 batch=min(s.batch, 64), repeats=s.memory_repeats)
    return Figure(out.pop("ratio"), details=out)


FAMILY = Family(
    jobs=(Job(("loader_fraction",), loader_fraction),
          Job(("stream_loader_ratio",), stream_loader),
          Job(("stream_memory_ratio",), stream_memory),
          Job(("loader_fraction_streamed",), lambda s, work: loader_fraction(s, work, streamed=True))),
    targets={"loader_fraction": ("<=", 0.05), "stream_loader_ratio": (">=", 1.2),
             "stream_memory_ratio": ("<=", 1.10)},
)
