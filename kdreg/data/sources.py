"""What a data source returns, and its checks.

A dataset factory (hook ``kdreg_register_datasets``) returns either decoded images
(:class:`ImageData`: uint8 tensors, the in-memory path) or a stream of encoded ones
(:class:`ImageStream`: readers that open one image at a time, the streamed path, for images of any
size and data sets of any size). kdreg checks what it returns with :func:`check_source` (one line
per problem) before anything else reads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
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


#: The statistics of a streamed source that gives none (ImageNet's, as timm's default).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _labels(values: Any) -> Tensor:
    return torch.as_tensor(values, dtype=torch.int64)


@attrs.frozen(eq=False)
class ImageStream:
    """Encoded images read one at a time, as a dataset factory returns them for the streamed path.

    ``train`` and ``test`` are readers (timm's dataset reader interface, e.g.
    ``timm.data.readers.ReaderImageFolder``): ``len(reader)``, and ``reader[i]`` gives ``(image,
    label)`` where ``image`` is a path, an open binary file, bytes or a PIL image; a reader with
    ``filename(i)`` is named in error messages. ``train_labels`` / ``test_labels`` are every
    image's label in reader order (int64 ``[N]`` in ``range(len(classes))``), so that kdreg draws
    the validation split and subsets without opening an image. ``mean``/``std`` are per channel in
    [0, 1] units (default: ImageNet's); ``decode``, when given, returns the whole set as
    :class:`ImageData` (all images of one size) for the in-memory path (``data.in_memory``), and
    ``image_size`` is the size ``(H, W)`` of its images when known to be one.
    """

    train: Any
    test: Any
    classes: tuple[str, ...] = attrs.field(converter=_str_tuple)
    train_labels: Tensor = attrs.field(converter=_labels)
    test_labels: Tensor = attrs.field(converter=_labels)
    mean: tuple[float, ...] = attrs.field(default=IMAGENET_MEAN, converter=_floats)
    std: tuple[float, ...] = attrs.field(default=IMAGENET_STD, converter=_floats)
    in_chans: int = 3
    decode: Callable[[], ImageData] | None = None
    image_size: tuple[int, int] | None = None


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
        problems += _label_problems(split, labels, num_classes)
        shapes.append(tuple(images.shape[1:]))
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        problems.append(f"train images are {_shape(shapes[0])} but test images {_shape(shapes[1])}")
    if shapes:
        problems += _stats_problems(data.mean, data.std, shapes[0][0])
    if problems:
        raise DataError([f"dataset {name!r}: {p}" for p in problems])
    return data


def _label_problems(split: str, labels: Tensor, num_classes: int) -> list[str]:
    """A split without images, or labels outside ``range(num_classes)``."""
    if len(labels) == 0:
        return [f"it has no {split} images"]
    if num_classes and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        return [f"{split} labels must lie in [0, {num_classes}), found "
                f"[{int(labels.min())}, {int(labels.max())}]"]
    return []


def _stats_problems(mean: tuple[float, ...], std: tuple[float, ...], chans: int) -> list[str]:
    """Statistics that are not one positive value per channel."""
    problems = []
    if len(mean) != chans or len(std) != chans:
        problems.append(f"mean and std need {chans} values (one per channel), got "
                        f"{len(mean)} and {len(std)}")
    if any(not s > 0 for s in std):
        problems.append(f"std must be > 0, got {std}")
    return problems


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def check_stream(data: ImageStream, name: str) -> ImageStream:
    """Raise :class:`DataError` (one line per problem) unless ``data`` is a well-formed stream."""
    problems: list[str] = []
    num_classes = len(data.classes)
    if num_classes < 1:
        problems.append("it has no classes")
    for split in ("train", "test"):
        reader, labels = getattr(data, split), getattr(data, f"{split}_labels")
        if not (hasattr(reader, "__len__") and hasattr(reader, "__getitem__")):
            problems.append(f"{split} must be an indexable reader (len() and [i]), got "
                            f"{type(reader).__name__}")
            continue
        if labels.dim() != 1 or len(labels) != len(reader):
            problems.append(f"{split}_labels must give one label per image: {len(reader)} images "
                            f"but labels {list(labels.shape)}")
            continue
        problems += _label_problems(split, labels, num_classes)
    problems += _stats_problems(data.mean, data.std, data.in_chans)
    if problems:
        raise DataError([f"dataset {name!r}: {p}" for p in problems])
    return data


def check_source(data: Any, name: str) -> ImageData | ImageStream:
    """:func:`check_image_data` or :func:`check_stream`, by what a dataset factory returned."""
    if isinstance(data, ImageStream):
        return check_stream(data, name)
    if not isinstance(data, ImageData):
        raise DataError(f"dataset {name!r} returned {type(data).__name__}, not "
                        "kdreg.data.ImageData or kdreg.data.ImageStream")
    return check_image_data(data, name)
