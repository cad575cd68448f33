"""Data: what a dataset factory returns, the train/val/test split, and the on-device batch loader.

No concrete data set lives here (see ``kdreg_plugins.datasets``). A factory returns
:class:`ImageData` (decoded uint8 images); :func:`prepare_splits` holds out a class-balanced
validation set and draws the class-balanced subsets of ``train_limit`` / ``test_limit`` with a fixed
data seed; :class:`BatchLoader` batches, augments (reflect-pad random crop, horizontal flip) and
normalises with tensor operations on the training device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from kdreg.errors import DataError, UserError
from kdreg.streams import stream_seed

CACHE_ENV = "KDREG_CACHE"


def cache_dir() -> Path:
    """kdreg's cache folder: ``$KDREG_CACHE`` or ``~/.cache/kdreg``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/kdreg").expanduser()


def _str_tuple(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


def _floats(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


@attrs.frozen(eq=False)
class ImageData:
    """Decoded images as a dataset factory returns them.

    Images are uint8 ``[N, C, H, W]``, labels int64 ``[N]`` in ``range(len(classes))``; ``mean`` and
    ``std`` are per channel, in [0, 1] units (computed on the training images).
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: tuple[str, ...] = attrs.field(converter=_str_tuple)
    mean: tuple[float, ...] = attrs.field(converter=_floats)
    std: tuple[float, ...] = attrs.field(converter=_floats)


@attrs.frozen(eq=False)
class TensorSet:
    """Images (uint8 ``[N, C, H, W]``) and their labels (int64 ``[N]``)."""

    images: Tensor
    labels: Tensor

    def __attrs_post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@attrs.frozen(eq=False)
class Splits:
    """The three sets a run uses; ``val`` is empty when ``val_split = 0``."""

    train: TensorSet
    val: TensorSet
    test: TensorSet
    classes: tuple[str, ...] = attrs.field(converter=_str_tuple)
    mean: tuple[float, ...] = attrs.field(converter=_floats)
    std: tuple[float, ...] = attrs.field(converter=_floats)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``[N, C, H, W]`` images, in [0, 1] units."""
    chans = images.shape[1]
    total = torch.zeros(chans, dtype=torch.float64)
    squares = torch.zeros(chans, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = max(images.numel() // max(chans, 1), 1)
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return _floats(mean.tolist()), _floats(std.tolist())


# --------------------------------------------------------------------------------------------
# Splits


def _generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (``stream``) of the data seed, independent of the others."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stream)


def _balanced_counts(available: Tensor, total: int, gen: torch.Generator) -> Tensor:
    """How many of ``total`` to draw per class: as equal as possible, capped by ``available``.

    Classes that run short give their share to the others; the classes that get the remainder
    (one extra image each) are chosen at random.
    """
    if total > int(available.sum()):
        raise ValueError(f"cannot draw {total} from {int(available.sum())}")
    counts = torch.zeros_like(available)
    left = total
    while left > 0:
        open_ = (counts < available).nonzero().flatten()
        share, extra = divmod(left, len(open_))
        room = available[open_] - counts[open_]
        take = torch.minimum(room, torch.full_like(room, share))
        if extra and bool((room > take).any()):
            candidates = open_[room > take]
            pick = candidates[torch.randperm(len(candidates), generator=gen)[:extra]]
            counts[pick] += 1
            left -= len(pick)
        counts[open_] += take
        left -= int(take.sum())
    return counts


def _balanced_subset(labels: Tensor, total: int, num_classes: int, gen: torch.Generator,
                     reserve: int = 0) -> Tensor:
    """Sorted indices of a class-balanced random subset of ``total`` of ``labels``.

    ``reserve`` images of every class are never taken (they stay for the other split).
    """
    per_class = [(labels == k).nonzero().flatten() for k in range(num_classes)]
    available = torch.tensor([max(len(ix) - reserve, 0) for ix in per_class])
    counts = _balanced_counts(available, total, gen)
    chosen = [ix[torch.randperm(len(ix), generator=gen)[: int(n)]]
              for ix, n in zip(per_class, counts)]
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)


def _take(images: Tensor, labels: Tensor, index: Tensor | None) -> TensorSet:
    if index is None:
        return TensorSet(images, labels)
    return TensorSet(images[index], labels[index])


def prepare_splits(data: ImageData, *, val_split: int, train_limit: int, test_limit: int,
                   seed: int = 0) -> Splits:
    """Hold out ``val_split`` class-balanced training images and draw the limited subsets.

    ``train_limit`` / ``test_limit`` > 0 keep a class-balanced random subset of that many of the
    (remaining) training / the test images; 0 keeps all. Every draw uses a generator seeded with
    the data ``seed`` so that every run of a comparison sees the same images.
    """
    num_classes = len(data.classes)
    n_train, n_test = len(data.train_labels), len(data.test_labels)
    for name, value in (("val_split", val_split), ("train_limit", train_limit),
                        ("test_limit", test_limit)):
        if int(value) != value or value < 0:
            raise UserError(f"data.{name} must be an integer >= 0, got {value!r} @ recipe.data.{name}")
    present = int(torch.bincount(data.train_labels, minlength=num_classes).gt(0).sum())
    if val_split and val_split > n_train - present:
        raise DataError(
            f"data.val_split = {val_split} leaves no training image for some class: the data set "
            f"has {n_train} training images in {present} classes, so at most "
            f"{n_train - present} can be held out @ recipe.data.val_split")
    remaining = n_train - val_split
    if train_limit > remaining:
        raise DataError(
            f"data.train_limit = {train_limit} is more than the {remaining} training images "
            f"available ({n_train} minus data.val_split = {val_split}) @ recipe.data.train_limit")
    if test_limit > n_test:
        raise DataError(f"data.test_limit = {test_limit} is more than the {n_test} test images @ recipe.data.test_limit")

    train_index = torch.arange(n_train)
    val_index = torch.zeros(0, dtype=torch.long)
    if val_split:
        val_index = _balanced_subset(data.train_labels, val_split, num_classes,
                                     _generator(seed, 0), reserve=1)
        keep = torch.ones(n_train, dtype=torch.bool)
        keep[val_index] = False
        train_index = keep.nonzero().flatten()
    if train_limit:
        sub = _balanced_subset(data.train_labels[train_index], train_limit, num_classes,
                               _generator(seed, 1))
        train_index = train_index[sub]
    test_index = None
    if test_limit:
        test_index = _balanced_subset(data.test_labels, test_limit, num_classes,
                                      _generator(seed, 2))
    whole_train = not val_split and not train_limit
    return Splits(
        train=_take(data.train_images, data.train_labels, None if whole_train else train_index),
        val=_take(data.train_images, data.train_labels, val_index),
        test=_take(data.test_images, data.test_labels, test_index),
        classes=data.classes, mean=data.mean, std=data.std,
    )


# --------------------------------------------------------------------------------------------
# Loading through the dataset registry


def check_image_data(data: Any, name: str) -> ImageData:
    """Raise :class:`DataError` (one line per problem) unless ``data`` is well-formed."""
    if not isinstance(data, ImageData):
        raise DataError(f"dataset {name!r} returned {type(data).__name__}, not kdreg.data.ImageData")
    problems: list[str] = []
    num_classes = len(data.classes)
    if num_classes < 1:
        problems.append("it has no classes")
    shapes = []
    for split in ("train", "test"):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            problems.append(f"{split}_images must be a uint8 tensor [N, C, H, W], got "
                            f"{_describe(images)}")
            continue
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            problems.append(f"{split}_labels must be an int64 tensor [N], got {_describe(labels)}")
            continue
        if len(images) != len(labels):
            problems.append(f"{len(images)} {split} images but {len(labels)} labels")
        if len(labels) == 0:
            problems.append(f"it has no {split} images")
        elif num_classes and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            problems.append(f"{split} labels must lie in [0, {num_classes}), found "
                            f"[{int(labels.min())}, {int(labels.max())}]")
        shapes.append(tuple(images.shape[1:]))
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        problems.append(f"train images are {_shape(shapes[0])} but test images {_shape(shapes[1])}")
    if shapes:
        chans = shapes[0][0]
        if len(data.mean) != chans or len(data.std) != chans:
            problems.append(f"mean and std need {chans} values (one per channel), got "
                            f"{len(data.mean)} and {len(data.std)}")
        if any(not s > 0 for s in data.std):
            problems.append(f"std must be > 0, got {data.std}")
    if problems:
        raise DataError([f"dataset {name!r}: {p}" for p in problems])
    return data


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _resolve_registry(pm_registry: Any) -> Any:
    from kdreg import registry

    if pm_registry is None or isinstance(pm_registry, registry.Registry):
        return pm_registry
    return registry.collect("dataset", pm_registry)  # a plugin manager


def load_data(config: Any, *, pm_registry: Any = None) -> Splits:
    """Build the splits described by a recipe's data section.

    ``config`` has ``dataset``, ``root``, ``val_split``, ``train_limit``, ``test_limit``,
    ``download``, ``data_seed`` and ``options``. ``pm_registry`` is a dataset
    :class:`kdreg.registry.Registry` or a plugin manager to use instead of the process-wide one.
    """
    data = read_data(config, pm_registry=pm_registry)
    return prepare_splits(data, val_split=config.val_split, train_limit=config.train_limit,
                          test_limit=config.test_limit, seed=config.data_seed)


def read_data(config: Any, *, pm_registry: Any = None) -> ImageData:
    """The data source's images as it returns them (checked), before any split."""
    from kdreg.create import create

    options = dict(getattr(config, "options", None) or {})
    for reserved in ("root", "download"):
        if reserved in options:
            raise UserError(f"data.options may not set {reserved!r}; use data.{reserved} "
                            f"@ recipe.data.options.{reserved}")
    download = bool(config.download)
    registry = _resolve_registry(pm_registry)
    provided = {"root": Path(str(config.root)).expanduser(), "download": download}
    if download:
        from kdreg.options import accepted_options
        from kdreg.registry import get_registry

        entry = (registry or get_registry("dataset")).get(config.dataset)
        if "download" not in accepted_options(entry.factory):
            raise UserError(f"dataset {config.dataset!r} cannot download; set data.download = false "
                            "@ recipe.data.download")
    data: ImageData = create("dataset", config.dataset, options, provided=provided,
                             path="recipe.data.options", registry=registry,
                             name_key="recipe.data.dataset")
    return data


# --------------------------------------------------------------------------------------------
# Batches on the training device


def _reflect_table(size: int, pad: int) -> Tensor:
    """``table[o, i]``: source index of output ``i`` of a crop at offset ``o`` of the padded axis."""
    pos = torch.arange(2 * pad + 1)[:, None] + torch.arange(size)[None, :] - pad
    pos = pos.abs()  # reflect at 0 (no edge repeat)
    return torch.where(pos > size - 1, 2 * (size - 1) - pos, pos)


class BatchLoader:
    """Batches of one set, normalised (and augmented when training) on ``device``.

    The uint8 images move to ``device`` once. Each iteration yields ``(x, y)``: x float32
    ``[B, C, H, W]`` normalised with ``mean``/``std``, y int64 ``[B]``. With ``train=True`` each
    epoch has its own permutation and augmentation (``padding``-pixel reflect-pad random crop,
    horizontal flip with p = 0.5), all drawn from a CPU generator seeded with
    ``kdreg.streams.stream_seed(seed, epoch)`` (no epoch of one seed is an epoch of another);
    call :meth:`set_epoch` before each epoch (an epoch not announced follows the previous one).
    ``drop_last`` defaults to True when training (if at least one full batch exists), else False.
    ``rank``/``world_size`` shard the batches for data-parallel training: every rank sees the
    same number of training batches.
    """

    def __init__(self, images: Tensor, labels: Tensor, *, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], device: torch.device | str,
                 train: bool, seed: int, drop_last: bool | None = None, padding: int = 4,
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
        if len(mean) != chans or len(std) != chans:
            raise ValueError(f"mean and std need {chans} values, got {len(mean)} and {len(std)}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self._announced = True
        self._iterated = False
        shard = len(self.images) // world_size if self.train else self._eval_index().numel()
        self.drop_last = (self.train and shard >= batch_size) if drop_last is None else drop_last
        self._shard = shard
        self._shift = torch.tensor([255.0 * m for m in mean]).view(1, -1, 1, 1).to(self.device)
        self._scale = torch.tensor([255.0 * s for s in std]).view(1, -1, 1, 1).to(self.device)
        self.padding = max(0, min(int(padding), height - 1, width - 1))
        self._rows = _reflect_table(height, self.padding).to(self.device)
        self._cols = _reflect_table(width, self.padding).to(self.device)

    def __len__(self) -> int:
        if self.drop_last:
            return self._shard // self.batch_size
        return math.ceil(self._shard / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation and augmentation of ``epoch`` (reproducible)."""
        self.epoch = int(epoch)
        self._announced = True

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

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if not self.train:
            yield from self._iter_eval()
            return
        if self._iterated and not self._announced:
            self.epoch += 1
        self._iterated, self._announced = True, False
        perm, offsets, flips = self.draws(self.epoch)
        usable = len(perm) - len(perm) % self.world_size
        perm, offsets, flips = (t[:usable][self.rank::self.world_size]
                                for t in (perm, offsets, flips))
        perm, offsets, flips = (t.to(self.device, non_blocking=True)
                                for t in (perm, offsets, flips))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            sl = slice(start, start + self.batch_size)
            yield self._augment(perm[sl], offsets[sl], flips[sl]), self.labels[perm[sl]]

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
