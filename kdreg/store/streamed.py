"""A teacher store on the streamed path: each (image, view)'s RandomResizedCrop box and flip,
drawn as the live streamed path draws them, and the workers that rebuild a view from them.

A streamed training view is timm's ``RandomResizedCropAndInterpolation`` (kdreg's
:class:`kdreg.data.transforms.DraftedResizedCrop`) and a horizontal flip, drawn from the global
RNGs seeded with the image's seed (:func:`kdreg.data.transforms.seeded`). :class:`ViewMaker`
draws the box ``(top, left, height, width)`` in the source image's pixels and the flip at a seed,
and rebuilds the view's pixels from them alone; ``kdreg teach`` stores them
(``crops.i32``), and a student's workers rebuild each image at its stored view of the epoch
(:class:`StoredStreamLoader`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from kdreg.data.streaming import (
    ShardSampler,
    StreamDataset,
    Streaming,
    StreamLoader,
    StreamSet,
    collate,
    leave_signals_to_the_trainer,
)
from kdreg.data.transforms import DraftedResizedCrop, Transform, seeded
from kdreg.errors import DataError, UserError
from kdreg.store.format import TeacherStore


@attrs.frozen(eq=False)
class ViewMaker:
    """A streamed training transform split into what it draws and what it does: the crop, the
    flip probability (0: no flip step) and the steps after them (which draw nothing)."""

    crop: DraftedResizedCrop
    flip: float
    rest: tuple[Any, ...]
    #: the whole live transform (what draws at a seed)
    transform: Transform

    @classmethod
    def of(cls, streaming: Streaming, where: str) -> ViewMaker:
        """The maker of ``streaming``'s training views, or a :class:`UserError` line per reason a
        store cannot replay them (``where``: the ``teacher_store`` key)."""
        from torchvision import transforms as T

        steps = list(getattr(streaming.train_transform, "transforms", [streaming.train_transform]))
        crop = steps.pop(0) if steps and isinstance(steps[0], DraftedResizedCrop) else None
        flip = steps.pop(0).p if steps and isinstance(steps[0], T.RandomHorizontalFlip) else 0.0
        problems = []
        if crop is None:
            problems.append(f"the streamed training images are augmented as {streaming.augment!r}; a teacher "
                            f"store on the streamed path replays RandomResizedCrop and flip "
                            f"(data.augment.name = 'imagenet') ({where}) @ recipe.data.augment.name")
        elif isinstance(crop.crop.interpolation, tuple | list):
            problems.append(f"data.augment.interpolation = 'random' draws an interpolation per view that a "
                            f"store does not hold ({where}) @ recipe.data.augment.interpolation")
        drawn = [s for s in steps if type(s).__name__ not in ("MaybePILToTensor", "PILToTensor")]
        if crop is not None and drawn:
            problems.append(f"the streamed training transform draws {type(drawn[0]).__name__} after the crop "
                            f"and flip, which a store does not rebuild ({where}) @ recipe.data.augment")
        if problems:
            raise UserError(problems)
        assert crop is not None
        return cls(crop, float(flip), tuple(steps), streaming.train_transform)

    def draw(self, image: Any, seed: int) -> list[int]:
        """``[top, left, height, width, flip]`` of ``image``'s view at ``seed``: the draws of the
        live transform at that seed (the crop's ``get_params``, then the flip's ``torch.rand``)."""
        with seeded(seed):
            (i, j, h, w), _ = self.crop.draw(image)
            flip = bool(torch.rand(1) < self.flip) if self.flip > 0 else False
        return [i, j, h, w, int(flip)]

    def rebuild(self, image: Any, params: list[int]) -> Tensor:
        """The view's uint8 ``[C, H, W]`` pixels from its ``[top, left, height, width, flip]``."""
        import torchvision.transforms.functional as F

        i, j, h, w, flip = (int(p) for p in params)
        out = self.crop.apply(image, (i, j, h, w), self.crop.crop.interpolation)
        if flip:
            out = F.hflip(out)
        for step in self.rest:
            out = step(out)
        return out

    def describe(self) -> str:
        """The augmentation, as a store records it."""
        c = self.crop.crop
        return (f"streamed: RandomResizedCrop to {list(c.size)}, scale {list(c.scale)}, ratio "
                f"{[round(r, 6) for r in c.ratio]}, {c.interpolation}, horizontal flip p = {self.flip}")


def stream_depends(dataset: str, data: StreamSet, streaming: Streaming, num_classes: int,
                   maker: ViewMaker) -> dict[str, Any]:
    """What a streamed store's pixels depend on: the data set's name, its training files (their
    count and a hash of their names, sizes and labels: the split drawn included), the output
    size, channels, classes and the augmentation. A stream that is not files is refused."""
    reader = data.reader
    digest = hashlib.blake2b(digest_size=16)
    for position, index in enumerate(data.index.tolist()):
        try:
            path = reader.filename(index, absolute=True)
        except TypeError:
            path = reader.filename(index)
        if not os.path.isfile(path):
            raise UserError(f"the streamed training images of dataset {dataset!r} are not files on disk "
                            f"({path}); a teacher store on the streamed path identifies them by their "
                            "files' names and sizes @ recipe.data.in_memory")
        digest.update(f"{reader.filename(index)}\0{os.path.getsize(path)}\0{int(data.labels[position])}\n"
                      .encode())
    return {"data.dataset": dataset, "data.train_images": len(data),
            "data.train_files": f"blake2b:{digest.hexdigest()}",
            "data.image_size": list(streaming.image_size), "data.in_chans": int(streaming.in_chans),
            "data.num_classes": int(num_classes), "data.augment": maker.describe()}


class _TeachDataset(StreamDataset):
    """Item ``(position, seed)``: the image's view drawn at ``seed``, rebuilt from its parameters,
    with them: ``(pixels, label, why, position, params)``."""

    def __init__(self, data: StreamSet, maker: ViewMaker, mode: str):
        super().__init__(data, maker.transform, mode)
        self.maker = maker
        self._params: list[int] = []

    def __getitem__(self, item: tuple[int, int]) -> Any:
        self._params = []
        return (*super().__getitem__(item), self._params)

    def apply(self, image: Any, seed: Any) -> Tensor:
        self._params = self.maker.draw(image, seed)
        return self.maker.rebuild(image, self._params)


def _teach_collate(items: list[Any]) -> tuple[Tensor, Tensor]:
    x, _, _, problems = collate([item[:4] for item in items])
    if problems:    # every (image, view) of the store: an unreadable image stops kdreg teach
        first = problems[0]
        raise DataError(first if " @ " in first else f"{first} @ recipe.data.root")
    return x, torch.tensor([item[4] for item in items], dtype=torch.int32)


def teach_views(data: StreamSet, streaming: Streaming, maker: ViewMaker, seeds: Tensor,
                batch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``(pixels uint8 [B, C, H, W], params int32 [B, 5])`` of every (image, view) in store row
    order (``image * K + view``, ``seeds`` int64 ``[N, K]`` each one's seed), ``batch`` at a time,
    decoded by ``streaming.workers`` worker processes."""
    n, k = seeds.shape
    items = [(row // k, seed) for row, seed in enumerate(seeds.reshape(-1).tolist())]
    workers = streaming.workers
    loader: DataLoader[Any] = DataLoader(
        _TeachDataset(data, maker, "RGB" if streaming.in_chans == 3 else "L"), batch_size=batch,
        sampler=items, num_workers=workers, collate_fn=_teach_collate,
        prefetch_factor=4 if workers > 0 else None, worker_init_fn=leave_signals_to_the_trainer)
    yield from loader


class _StoredSampler(ShardSampler):
    """The live sampler's order of the epoch, with each image's stored view of the epoch
    (``store.views_of(seed, epoch)``) in place of its seed: items ``(position, params)``."""

    def __init__(self, store: TeacherStore, n: int, **kw: Any):
        super().__init__(n, **kw)
        self.store = store

    def shard(self) -> tuple[Tensor, Tensor]:
        positions, _ = super().shard()
        params = self.store.view_rows(self.store.views_of(self.seed, self.epoch))
        return positions, params[positions]


class _StoredDataset(StreamDataset):
    """Item ``(position, params)``: the image rebuilt at its stored view."""

    def __init__(self, data: StreamSet, maker: ViewMaker, mode: str):
        super().__init__(data, maker.transform, mode)
        self.maker = maker

    def apply(self, image: Any, seed: Any) -> Tensor:
        return self.maker.rebuild(image, seed)


class StoredStreamLoader(StreamLoader):
    """The streamed path's training batches with each image at its stored view of the epoch:
    the live loader's order (the same sampler draws), every image rebuilt by the workers at the
    box and flip of view ``views_of(seed, epoch)[n]``. Iteration yields ``(x, y, rows)``, ``rows``
    each image's store row ``image * K + view`` (an unreadable image skipped with its row)."""

    def __init__(self, store: TeacherStore, maker: ViewMaker, data: StreamSet, streaming: Streaming,
                 **kw: Any):
        self.store, self.maker = store, maker
        super().__init__(data, streaming, train=True, **kw)

    def _sampler(self, n: int, *, train: bool, seed: int, rank: int, world_size: int) -> ShardSampler:
        return _StoredSampler(self.store, n, train=train, seed=seed, rank=rank, world_size=world_size)

    def _dataset(self, data: StreamSet, transform: Transform, mode: str) -> StreamDataset:
        return _StoredDataset(data, self.maker, mode)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        self.with_indices = True
        k, views = self.store.views, None
        for x, y, index in super().__iter__():
            if views is None:     # the epoch is known once the first batch is drawn
                views = self.store.views_of(self.seed, self.epoch).to(index.device)
            yield x, y, index * k + views[index]
