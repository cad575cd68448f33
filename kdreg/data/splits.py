"""The three sets a run uses: the class-balanced validation hold-out and the limited subsets.

:func:`prepare_splits` holds out a class-balanced validation set from the training images and
draws the class-balanced subsets of ``train_limit`` / ``test_limit`` with a fixed data seed, from
the labels alone: decoded images become :class:`TensorSet` s (the in-memory path), a stream's
readers :class:`StreamSet` s (positions into the reader, nothing opened).
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from kdreg.data.sources import ImageData, ImageStream, _floats, _str_tuple
from kdreg.data.streaming import Streaming, StreamSet
from kdreg.errors import DataError, UserError


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
    """The three sets a run uses; ``val`` is empty when ``val_split = 0``. Streamed sets come with
    ``streaming``, how they are read (:class:`kdreg.data.streaming.Streaming`)."""

    train: TensorSet | StreamSet
    val: TensorSet | StreamSet
    test: TensorSet | StreamSet
    classes: tuple[str, ...] = attrs.field(converter=_str_tuple)
    mean: tuple[float, ...] = attrs.field(converter=_floats)
    std: tuple[float, ...] = attrs.field(converter=_floats)
    streaming: Streaming | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        if self.streaming is not None:
            return self.streaming.in_chans
        assert isinstance(self.train, TensorSet)
        return int(self.train.images.shape[1])

    @property
    def input_size(self) -> tuple[int, int]:
        if self.streaming is not None:
            return self.streaming.image_size
        assert isinstance(self.train, TensorSet)
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])


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


def _take(data: ImageData | ImageStream, split: str,
          index: Tensor | None) -> TensorSet | StreamSet:
    labels = getattr(data, f"{split}_labels")
    if isinstance(data, ImageStream):
        index = torch.arange(len(labels)) if index is None else index
        return StreamSet(getattr(data, split), index, labels[index])
    images = getattr(data, f"{split}_images")
    if index is None:
        return TensorSet(images, labels)
    return TensorSet(images[index], labels[index])


def prepare_splits(data: ImageData | ImageStream, *, val_split: int, train_limit: int,
                   test_limit: int, seed: int = 0, streaming: Streaming | None = None) -> Splits:
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
        train=_take(data, "train", None if whole_train else train_index),
        val=_take(data, "train", val_index),
        test=_take(data, "test", test_index),
        classes=data.classes, mean=data.mean, std=data.std, streaming=streaming,
    )
