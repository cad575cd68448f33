"""A student stage's training from a teacher store: every image of epoch ``e`` at one of its K
stored views (chosen by :meth:`kdreg.store.format.TeacherStore.views_of`), rebuilt from the stored
crop and flip (in memory here, streamed by :mod:`kdreg.store.streamed`), and the stored teacher outputs of that (image, view) in place of the teacher's
forward pass."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, cast

import attrs
import numpy as np
import torch
from torch import Tensor

from kdreg.backbone import FlexibleBackbone
from kdreg.data.batches import BatchLoader
from kdreg.data.splits import Splits
from kdreg.data.streaming import Streaming, StreamSet
from kdreg.errors import UserError
from kdreg.graph import external_node
from kdreg.stages import TeacherStage
from kdreg.store.format import TeacherStore, data_depends
from kdreg.store.streamed import StoredStreamLoader, ViewMaker, stream_depends


class StoreLoader(BatchLoader):
    """The in-memory path's training batches with each image at its stored view of the epoch.

    The epoch's permutation is the live loader's (the same generator and draws); the crop and
    flip of image ``n`` are those of view ``views_of(seed, epoch)[n]``. Iteration yields
    ``(x, y, rows)``: ``rows`` int64 ``[B]`` on the device, each image's store row
    ``image * K + view``. Sharding, ``set_epoch(epoch, skip)`` and resuming are the
    :class:`BatchLoader`'s: a process reads only its own images' rows of the store.
    """

    def __init__(self, store: TeacherStore, images: Tensor, labels: Tensor, *, batch_size: int,
                 device: torch.device | str, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(images, labels, batch_size=batch_size, device=device, train=True, seed=seed,
                         padding=store.padding, rank=rank, world_size=world_size)
        self.store = store
        self._views = torch.zeros(len(labels), dtype=torch.long, device=self.device)

    def draws(self, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        """The live loader's permutation; the crop offsets and flips of each position's image at
        its view of the epoch."""
        perm, _, _ = super().draws(epoch)
        views = self.store.views_of(self.seed, epoch)
        offsets, flips = self.store.view_params(views)
        self._views = views.to(self.device)
        return perm, offsets[perm], flips[perm]     # as the loader reads them: by position

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        self.with_indices = True
        k = self.store.views
        for x, y, index in super().__iter__():
            yield x, y, index * k + self._views[index]


@attrs.frozen(eq=False)
class StoredOutputs:
    """One batch's teacher outputs from the store, in the place of
    :class:`kdreg.engine.step.Teachers` (the same ``nodes``, ``bridge_output`` and ``outputs``)."""

    store: TeacherStore
    #: external graph node -> (stage, sub-model index)
    nodes: Mapping[str, tuple[str, int]]
    rows: Tensor
    bridge_output: tuple[str, int] | None = None

    def outputs(self, x: Tensor, dtype: torch.dtype | None
                ) -> tuple[dict[tuple[str, int], Tensor], dict[tuple[str, int], dict[str, Tensor]]]:
        """float32 logits of every held output for this batch's rows, on ``x``'s device; no
        features (a store holds none)."""
        read = self.store.outputs(self.rows.cpu().numpy().astype(np.int64))
        return {key: v.to(x.device, non_blocking=True) for key, v in read.items()}, {}


@attrs.frozen(eq=False)
class StoredTeachers:
    """A stage's store and the graph nodes it answers: its loader and its batches' outputs."""

    store: TeacherStore
    nodes: Mapping[str, tuple[str, int]]
    #: the recipe key of ``teacher_store`` (for messages)
    where: str = ""

    def loader(self, images: Tensor, labels: Tensor, *, batch_size: int, device: torch.device,
               seed: int, rank: int, world_size: int) -> StoreLoader:
        return StoreLoader(self.store, images, labels, batch_size=batch_size, device=device, seed=seed,
                           rank=rank, world_size=world_size)

    def stream_loader(self, data: StreamSet, streaming: Streaming, *, num_classes: int, batch_size: int,
                      device: torch.device, seed: int, rank: int, world_size: int) -> StoredStreamLoader:
        """The streamed path's: every image rebuilt by the workers at its stored view."""
        return StoredStreamLoader(self.store, ViewMaker.of(streaming, self.where), data, streaming,
                                  batch_size=batch_size, device=device, seed=seed, num_classes=num_classes,
                                  rank=rank, world_size=world_size)

    def at(self, rows: Tensor) -> StoredOutputs:
        return StoredOutputs(self.store, self.nodes, rows)


@attrs.frozen(eq=False)
class StoredStage(TeacherStage):
    """An earlier stage whose outputs a teacher store holds, as a graph factory receives it: its
    name and its sub-models' labels; it is never built (``model`` is None)."""

    labels: tuple[str, ...] = ()

    @classmethod
    def of(cls, name: str, labels: tuple[str, ...]) -> StoredStage:
        return cls(name, cast(FlexibleBackbone, None), labels)

    @property
    def submodel_labels(self) -> tuple[str, ...]:
        return self.labels

    @property
    def num_submodels(self) -> int:
        return len(self.labels)

    def node(self, index: int = -1) -> str:
        n = len(self.labels)
        if not -n <= index < n:
            raise IndexError(f"sub-model index {index} out of range: stage {self.name!r} has {n} "
                             f"sub-models (0..{n - 1})")
        return external_node(self.name, self.labels[index])

    def nodes(self) -> tuple[str, ...]:
        return tuple(external_node(self.name, label) for label in self.labels)


def data_problems(stored: StoredTeachers, dataset: str, splits: Splits) -> list[str]:
    """Why the run's training data is not what ``stored``'s store was built from (one line per
    differing key), or streamed with an augmentation the store does not replay."""
    if splits.streaming is not None:
        assert isinstance(splits.train, StreamSet)
        try:
            maker = ViewMaker.of(splits.streaming, stored.where)
            actual = stream_depends(dataset, splits.train, splits.streaming, splits.num_classes, maker)
        except UserError as exc:
            return exc.problems
        return stored.store.differences(actual, stored.where)
    train: Any = splits.train
    padding = BatchLoader(train.images[:1], train.labels[:1], batch_size=1, device="cpu", train=True,
                          seed=0).padding
    return stored.store.differences(data_depends(dataset, train.images, train.labels, splits.num_classes,
                                                 padding), stored.where)
