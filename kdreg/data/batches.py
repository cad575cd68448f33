"""Batches on the training device: the in-memory path (no loader processes, no per-image Python).

:class:`BatchLoader` moves a set's uint8 images to the device once and batches, augments
(reflect-pad random crop, horizontal flip) and scales them with tensor operations there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from kdreg.streams import stream_seed


def _reflect_table(size: int, pad: int) -> Tensor:
    """``table[o, i]``: source index of output ``i`` of a crop at offset ``o`` of the padded axis."""
    pos = torch.arange(2 * pad + 1)[:, None] + torch.arange(size)[None, :] - pad
    pos = pos.abs()  # reflect at 0 (no edge repeat)
    return torch.where(pos > size - 1, 2 * (size - 1) - pos, pos)


class EpochBatches:
    """The epoch bookkeeping both loaders share (:class:`BatchLoader` in memory,
    :class:`kdreg.data.streaming.StreamLoader` streamed): ``len()`` in batches of this process's
    shard, :meth:`set_epoch`, and an iteration that starts the announced epoch, or the one after
    the last when none was announced."""

    batch_size: int
    train: bool
    #: yield ``(x, y, indices)``: each training image's index in its set, int64 ``[B]`` on the
    #: device (for feature losses that keep a memory of every sample, as CRD does)
    with_indices: bool = False

    def _init_epochs(self, shard: int, drop_last: bool | None) -> None:
        """``shard`` images are this process's; ``drop_last`` defaults to True when training (if
        at least one full batch exists), else False."""
        self._shard = shard
        self.drop_last = (self.train and shard >= self.batch_size) if drop_last is None else drop_last
        self.epoch = 0
        self._announced, self._iterated = True, False
        self._skip = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self._shard // self.batch_size
        return math.ceil(self._shard / self.batch_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the permutation and augmentation of ``epoch`` (reproducible); the next iteration
        starts after its first ``skip`` batches (a run resumed mid-epoch: the batches it yields
        are those the whole epoch yields from there, the same images and augmentations)."""
        if not 0 <= skip <= len(self):
            raise ValueError(f"skip must be in [0, {len(self)}], got {skip}")
        self.epoch = int(epoch)
        self._announced = True
        self._skip = int(skip)

    def _start_epoch(self) -> int:
        """The epoch an iteration beginning now trains (see the class docstring)."""
        if self._iterated and not self._announced:
            self.epoch += 1
            self._skip = 0
        self._iterated, self._announced = True, False
        return self.epoch

    def _take_skip(self) -> int:
        """The batches the iteration beginning now skips (once: the next one starts at 0)."""
        skip, self._skip = self._skip, 0
        return skip


class BatchLoader(EpochBatches):
    """Batches of one set, scaled (and augmented when training) on ``device``.

    The uint8 images move to ``device`` once. Each iteration yields ``(x, y)``: x float32
    ``[B, C, H, W]`` in [0, 1] (the engine's batches: each model normalises its own input), or
    normalised with ``mean``/``std`` when given; y int64 ``[B]``. With ``train=True`` each
    epoch has its own permutation and augmentation (``padding``-pixel reflect-pad random crop,
    horizontal flip with p = 0.5), all drawn from a CPU generator seeded with
    ``kdreg.streams.stream_seed(seed, epoch)`` (no epoch of one seed is an epoch of another);
    call :meth:`set_epoch` before each epoch (an epoch not announced follows the previous one).
    ``drop_last`` defaults to True when training (if at least one full batch exists), else False.
    ``rank``/``world_size`` shard the batches for data-parallel training: every rank sees the
    same number of training batches.
    """

    def __init__(self, images: Tensor, labels: Tensor, *, batch_size: int,
                 device: torch.device | str, train: bool, seed: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 drop_last: bool | None = None, padding: int = 4,
                 rank: int = 0, world_size: int = 1):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{list(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        chans, height, width = images.shape[1:]
        mean = (0.0,) * chans if mean is None else mean
        std = (1.0,) * chans if std is None else std
        if len(mean) != chans or len(std) != chans:
            raise ValueError(f"mean and std need {chans} values, got {len(mean)} and {len(std)}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        shard = len(self.images) // world_size if self.train else self._eval_index().numel()
        self._init_epochs(shard, drop_last)
        self._shift = torch.tensor([255.0 * m for m in mean]).view(1, -1, 1, 1).to(self.device)
        self._scale = torch.tensor([255.0 * s for s in std]).view(1, -1, 1, 1).to(self.device)
        self.padding = max(0, min(int(padding), height - 1, width - 1))
        self._rows = _reflect_table(height, self.padding).to(self.device)
        self._cols = _reflect_table(width, self.padding).to(self.device)

    def _eval_index(self) -> Tensor:
        return torch.arange(len(self.labels))[self.rank::self.world_size]

    def draws(self, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        """The epoch's (permutation, crop offsets ``[N, 2]`` (row, col), flips ``[N]``), on CPU."""
        gen = torch.Generator().manual_seed(stream_seed(self.seed, int(epoch)))
        n = len(self.labels)
        perm = torch.randperm(n, generator=gen)
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        return perm, offsets, flips

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        if not self.train:
            yield from self._iter_eval()
            return
        perm, offsets, flips = self.draws(self._start_epoch())
        usable = len(perm) - len(perm) % self.world_size
        perm, offsets, flips = (t[:usable][self.rank::self.world_size]
                                for t in (perm, offsets, flips))
        perm, offsets, flips = (t.to(self.device, non_blocking=True)
                                for t in (perm, offsets, flips))
        first = self._take_skip() * self.batch_size
        for start in range(first, len(self) * self.batch_size, self.batch_size):
            sl = slice(start, start + self.batch_size)
            x, y = self._augment(perm[sl], offsets[sl], flips[sl]), self.labels[perm[sl]]
            yield (x, y, perm[sl]) if self.with_indices else (x, y)

    def _iter_eval(self) -> Iterator[tuple[Tensor, Tensor]]:
        index = None if self.world_size == 1 else self._eval_index().to(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            if index is None:
                images = self.images[start:start + self.batch_size]
                labels = self.labels[start:start + self.batch_size]
            else:
                sel = index[start:start + self.batch_size]
                images, labels = self.images[sel], self.labels[sel]
            yield self._normalise(images), labels

    def _augment(self, index: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
        """Reflect-padded random crops and flips of ``images[index]`` as one gather (uint8)."""
        rows = self._rows[offsets[:, 0]]                       # [B, H]
        cols = self._cols[offsets[:, 1]]                       # [B, W]
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        chans = torch.arange(self.images.shape[1], device=self.device)
        out = self.images[index[:, None, None, None], chans[None, :, None, None],
                          rows[:, None, :, None], cols[:, None, None, :]]
        return self._normalise(out)

    def _normalise(self, images: Tensor) -> Tensor:
        return images.float().sub_(self._shift).div_(self._scale)
