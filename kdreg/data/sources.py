"""What a data source returns: decoded images (:class:`ImageData`), and its checks.

A dataset factory (hook ``kdreg_register_datasets``) returns :class:`ImageData`; kdreg checks it
with :func:`check_image_data` (one line per problem) before anything else reads it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from kdreg.errors import DataError

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
