"""The streamed path: encoded images decoded and augmented by a DataLoader's worker processes.

:class:`StreamLoader` reads one set of a stream (:class:`StreamSet`) through
``torch.utils.data.DataLoader``: ``workers`` processes decode (PIL) and transform the images
(:mod:`kdreg.data.transforms`), pinned memory on CUDA, persistent workers (started once per
loader, not per epoch) and prefetching. Its :class:`ShardSampler` gives each process under
torchrun its own shard (no process opens another's images) and draws each epoch's order and every
image's augmentation seed from ``kdreg.streams.stream_seed(seed, epoch)``, so an epoch is the
same whatever the number of workers and the order they finish in: a run is reproducible and
resumes bit-identically at epoch boundaries. Batches reach the device unnormalised (float32 in [0, 1]).

Bad images: a file PIL cannot read stops the run naming the file; with ``skip_bad`` it is left out
of its batch and counted (:attr:`StreamLoader.skipped`). Setting ``KDREG_DATA_LOG`` to a folder
makes every process append each file it opens to ``<folder>/rank-<rank>.log`` (an audit of who
reads what).
"""

from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from kdreg.data.batches import EpochBatches
from kdreg.data.transforms import BatchMix, Transform, seeded
from kdreg.errors import DataError
from kdreg.streams import stream_seed

LOG_ENV = "KDREG_DATA_LOG"
_SEEDS = 2**62


def default_workers(world_size: int = 1) -> int:
    """Worker processes per training process when the recipe sets none: the cores this process
    may use, shared by the processes of the machine, at most 8 (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // max(world_size, 1)))


@attrs.define(eq=False)
class Counter:
    """The images skipped as unreadable (their messages, each naming its file), over every loader
    of a run (results.json's count)."""

    skipped: set[str] = attrs.field(factory=set)


@attrs.frozen(eq=False)
class Streaming:
    """How a streamed run reads its images: the transforms, the batch mix, the workers."""

    image_size: tuple[int, int]
    in_chans: int
    augment: str                             # cifar | imagenet
    train_transform: Transform
    eval_transform: Transform
    workers: int
    skip_bad: bool = False
    mix: Any = None                          # augment config for a BatchMix, when it mixes
    counter: Counter = attrs.field(factory=Counter)


@attrs.frozen(eq=False)
class StreamSet:
    """Images ``reader[index[k]]`` of a stream's reader, with their labels (int64 ``[N]``): one
    set of a streamed run (:func:`kdreg.data.splits.prepare_splits` draws them)."""

    reader: Any
    index: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


class ShardSampler(Sampler[tuple[int, int]]):
    """``(position, augmentation seed)`` of this process's images of an epoch.

    Training: the epoch's permutation of all ``n`` images (and a seed per image) drawn from
    ``stream_seed(seed, epoch)``; the first ``n - n % world_size`` are dealt out round-robin, so
    the processes' shards are disjoint and equal, as the in-memory path deals them. Evaluation:
    positions ``rank, rank + world_size, ...`` in order, seed 0.
    """

    def __init__(self, n: int, *, train: bool, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.n, self.train, self.seed = int(n), bool(train), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        #: positions of the shard to leave out at its start (a run resumed mid-epoch)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def draws(self, epoch: int) -> tuple[Tensor, Tensor]:
        """The epoch's permutation and per-position seeds, for every process."""
        gen = torch.Generator().manual_seed(stream_seed(self.seed, int(epoch)))
        return torch.randperm(self.n, generator=gen), torch.randint(0, _SEEDS, (self.n,), generator=gen)

    def shard(self) -> tuple[Tensor, Tensor]:
        if not self.train:
            positions = torch.arange(self.n)[self.rank::self.world_size]
            return positions, torch.zeros_like(positions)
        perm, seeds = self.draws(self.epoch)
        usable = self.n - self.n % self.world_size
        return perm[:usable][self.rank::self.world_size], seeds[:usable][self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        positions, seeds = self.shard()
        return iter(zip(positions[self.skip:].tolist(), seeds[self.skip:].tolist()))

    def __len__(self) -> int:
        if not self.train:
            return len(range(self.rank, self.n, self.world_size))
        return self.n // self.world_size - self.skip


def _name(reader: Any, index: int) -> str:
    filename = getattr(reader, "filename", None)
    if callable(filename):
        try:
            return str(filename(index, absolute=True))
        except TypeError:
            return str(filename(index))
    return f"image {index}"


def open_image(image: Any) -> Image.Image:
    """A reader's image (a path, a binary file, bytes or a PIL image) as a PIL image, opened
    lazily: the transform's first step decodes it (a JPEG perhaps at a reduced scale)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, bytes | bytearray):
        image = io.BytesIO(image)
    return Image.open(image)


class StreamDataset(Dataset[tuple[Tensor | None, int, str | None, int]]):
    """One set of a stream: item ``(position, seed)`` is its image decoded and transformed with
    the global RNGs seeded from ``seed``, with its label and position: ``(uint8 [C, H, W], label,
    None, position)``, or ``(None, label, why, position)`` for an image that cannot be read."""

    def __init__(self, data: StreamSet, transform: Transform, mode: str = "RGB"):
        self.reader, self.transform, self.mode = data.reader, transform, mode
        self.index = data.index.tolist()
        self.labels = data.labels.tolist()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor | None, int, str | None, int]:
        position = item[0]
        x, label, why = self._read(item)
        return x, label, why, position

    def _read(self, item: tuple[int, Any]) -> tuple[Tensor | None, int, str | None]:
        position, seed = item
        i = self.index[position]
        log = os.environ.get(LOG_ENV)
        try:
            image, _ = self.reader[i]
            if log:
                _log(Path(log), _name(self.reader, i))
            opened = None
            try:
                opened = open_image(image)
                x = self.apply(opened, seed)
            finally:
                for handle in (opened, image):
                    close = getattr(handle, "close", None)
                    if callable(close):
                        close()
        except DataError as exc:  # the reader's own check (an image too large), naming the file
            return None, self.labels[position], str(exc.problems[0])
        except Exception as exc:  # noqa: BLE001 - any decoding failure names the file
            why = str(exc).strip().splitlines()
            return None, self.labels[position], (f"cannot read {_name(self.reader, i)}: "
                                                 f"{type(exc).__name__}: {why[0] if why else ''}")
        return x, self.labels[position], None


    def apply(self, image: Any, seed: Any) -> Tensor:
        """The transform of an opened image, with the global RNGs seeded from its ``seed``."""
        with seeded(seed):
            return self.transform(image)


def _log(folder: Path, name: str) -> None:
    rank = os.environ.get("RANK", "0") or "0"
    with open(folder / f"rank-{rank}.log", "a") as out:
        out.write(name + "\n")


#: what a cluster sends a job before it stops it (kdreg run --checkpoint-signals chooses among them)
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")
                      if hasattr(signal, name))


def leave_signals_to_the_trainer(worker_id: int) -> None:
    """A loader worker ignores the signals a scheduler sends the whole job (and torchrun the whole
    process group) before stopping it: its training process saves a checkpoint at the next step,
    which needs the worker's batches until then. It stops with its loader, and on Linux is
    killed the moment its training process dies: a worker outliving a killed process would keep
    that process's sockets open (a fork holds them), and torchrun's restarted processes would
    connect to it."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent()


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the thread that started it ends (``PR_SET_PDEATHSIG``);
    elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)   # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:   # the parent died before the call: nothing would signal
        os._exit(0)


def collate(items: list[tuple[Tensor | None, int, str | None, int]]
            ) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """The readable images stacked, their labels and positions, and why the others could not be
    read."""
    good = [(x, y, i) for x, y, why, i in items if why is None and x is not None]
    problems = [why for _, _, why, _ in items if why is not None]
    if not good:
        empty = torch.zeros(0, dtype=torch.long)
        return torch.zeros(0, dtype=torch.uint8), empty, empty, problems
    return (torch.stack([x for x, _, _ in good]), torch.tensor([y for _, y, _ in good], dtype=torch.long),
            torch.tensor([i for _, _, i in good], dtype=torch.long), problems)


class StreamLoader(EpochBatches):
    """Batches of one streamed set on ``device``, float32 in [0, 1] (see the module docstring).

    The interface of :class:`kdreg.data.batches.BatchLoader`: ``set_epoch``, ``len``, iteration
    yielding ``(x, y)`` (``y`` soft targets ``[B, classes]`` under mixup / CutMix). ``drop_last``
    defaults to True when training (if this process has at least one full batch).
    """

    def __init__(self, data: StreamSet, streaming: Streaming, *, batch_size: int,
                 device: torch.device | str, train: bool, seed: int, num_classes: int,
                 rank: int = 0, world_size: int = 1, drop_last: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.train, self.seed = bool(train), int(seed)
        self.batch_size = int(batch_size)
        self.streaming = streaming
        self.sampler = self._sampler(len(data), train=train, seed=seed, rank=rank, world_size=world_size)
        self._init_epochs(len(self.sampler), drop_last)
        workers = streaming.workers
        transform = streaming.train_transform if train else streaming.eval_transform
        self.loader: DataLoader[Any] = DataLoader(
            self._dataset(data, transform, "RGB" if streaming.in_chans == 3 else "L"),
            batch_size=self.batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=collate, pin_memory=self.device.type == "cuda", drop_last=self.drop_last,
            persistent_workers=workers > 0,     # a loader's workers start once, not per epoch
            prefetch_factor=4 if workers > 0 else None,
            # its own generator: the loader's base seed is never drawn from the global RNG, whose
            # stream (dropout, drop path) must not depend on when a resumed run made its loader
            generator=torch.Generator().manual_seed(stream_seed(seed, "loader")),
            worker_init_fn=leave_signals_to_the_trainer)
        self.mix: BatchMix | None = None
        if train and streaming.mix is not None:
            self.mix = BatchMix(streaming.mix, num_classes, self.device)

    def _sampler(self, n: int, *, train: bool, seed: int, rank: int, world_size: int) -> ShardSampler:
        """The epochs' order and each image's draws (a teacher store's loader: its stored views)."""
        return ShardSampler(n, train=train, seed=seed, rank=rank, world_size=world_size)

    def _dataset(self, data: StreamSet, transform: Transform, mode: str) -> StreamDataset:
        """What the workers make of each sampled item."""
        return StreamDataset(data, transform, mode)

    @property
    def skipped(self) -> set[str]:
        return self.streaming.counter.skipped

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        if self.train:
            self._start_epoch()
        step = self._take_skip()     # the batches of the epoch already trained (resumed mid-epoch)
        self.sampler.set_epoch(self.epoch, skip=step * self.batch_size)
        batches = iter(self.loader)
        while True:
            try:
                x, y, positions, problems = next(batches)
            except StopIteration:
                return
            except RuntimeError as exc:
                if "DataLoader worker" not in str(exc):
                    raise
                raise DataError(f"a data loader worker process died ({str(exc).splitlines()[0]}); "
                                "too little memory for data.workers processes? lower it "
                                "@ recipe.data.workers") from None
            if problems:
                if not self.streaming.skip_bad:
                    first = problems[0]
                    raise DataError(first if " @ " in first else
                                    f"{first} (data.skip_bad_images = true skips unreadable "
                                    "images) @ recipe.data.root")
                self.streaming.counter.skipped.update(problems)
                if len(y) == 0:
                    raise DataError(f"every image of a batch is unreadable, e.g. {problems[0]} "
                                    "@ recipe.data.root")
            x = x.to(self.device, non_blocking=True).float().div_(255.0)
            y = y.to(self.device, non_blocking=True)
            if self.mix is not None:
                x, y = self.mix(x, y, stream_seed(self.seed, self.epoch, "batch", step))
            step += 1
            yield (x, y, positions.to(self.device, non_blocking=True)) if self.with_indices else (x, y)

