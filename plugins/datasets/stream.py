"""``imagefolder`` as a stream: the folder is scanned, never decoded whole.

The files of ``train/<class>/`` and ``test/<class>/`` (or ``val/<class>/``) are listed with their
labels; images are opened one at a time by the loader's workers, through a timm dataset reader
(:class:`~.readers.FileReader`), so they may have any size and memory does not grow with the data set. A
folder whose images turn out small and of one size can still be decoded whole (the stream's
``decode``: kdreg's in-memory path, ``data.in_memory``); one decoded before (its decode cache) is
returned decoded. A stream's statistics are those of :data:`STATS_IMAGES` of its training
images (a truncated or unreadable one among them is left out of them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from kdreg import process
from kdreg.data.loading import IN_MEMORY_LIMIT
from kdreg.data.sources import ImageData, ImageStream
from kdreg.errors import DataError, OptionError

from .folder import (
    MAX_IMAGE_PIXELS,
    MODES,
    SPLITS,
    Entry,
    _read_cache,
    cache_key,
    check_image_size,
    load_image_folder,
    resolve_root,
    scan,
)

#: How many training images' headers are read to guess whether they all have one size.
PROBES = 32
#: How many training images (spread over the set) the statistics of a stream are computed on.
STATS_IMAGES = 256

T = TypeVar("T")


def one_size(folder: Path, entries: list[Entry],
             max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int] | None:
    """``(H, W)`` of the images when the headers of :data:`PROBES` of them, spread over the set,
    agree (None when they differ); an unreadable header or an image of more than ``max_pixels``
    pixels among them is a :class:`DataError` naming it."""
    step = max(1, len(entries) // PROBES)
    sizes = set()
    for rel, *_ in entries[::step][:PROBES]:
        check_image_size(folder / rel, max_pixels)
        with Image.open(folder / rel) as img:
            sizes.add((img.height, img.width))
    return sizes.pop() if len(sizes) == 1 else None


def spread(items: Sequence[T], count: int) -> Sequence[T]:
    """``count`` of ``items`` spread evenly over them (all of them when there are fewer)."""
    return items[::max(1, len(items) // count)][:count]


def pixel_stats(images: Iterable[Callable[[], Image.Image]],
                mode: str) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (in [0, 1] units, over every pixel) of the images that the
    callables open; one that cannot be read (truncated, unreadable, over the pixel limit) is left
    out: the stream names it (or skips it) when it reads it."""
    chans = MODES[mode]
    total, squares, pixels = np.zeros(chans), np.zeros(chans), 0
    for opener in images:
        try:
            with opener() as img:
                array = np.asarray(img.convert(mode), dtype=np.float64).reshape(-1, chans) / 255.0
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, DataError):
            continue
        total += array.sum(0)
        squares += np.square(array).sum(0)
        pixels += len(array)
    mean = total / max(pixels, 1)
    std = np.sqrt(np.clip(squares / max(pixels, 1) - np.square(mean), 0, None))
    return mean.tolist(), np.maximum(std, 1e-6).tolist()


def sample_stats(folder: Path, entries: list[Entry], mode: str,
                 count: int = STATS_IMAGES) -> tuple[list[float], list[float]]:
    """:func:`pixel_stats` of ``count`` training images spread evenly over the set: the data
    set's statistics without decoding it whole."""
    return pixel_stats([partial(Image.open, folder / rel) for rel, *_ in spread(entries, count)],
                       mode)


def _looked_at(folder: Path, train: list[Entry], mode: str, max_pixels: int,
               probe: bool) -> tuple[tuple[int, int] | None, list[float], list[float]]:
    """(:func:`one_size` when ``probe``, :func:`sample_stats`) of the training images, read by
    the first process alone and given to the others (under torchrun every process builds the
    source; only rank 0 opens images outside its shard, and a problem stops every process)."""
    found: Any = None
    if process.is_main():
        try:
            size = one_size(folder, train, max_pixels) if probe else None
            found = (size, *sample_stats(folder, train, mode))
        except DataError as exc:
            found = exc.problems
        except Exception as exc:  # noqa: BLE001 - raised on every process, not on rank 0 alone
            found = [f"cannot read the images of {folder}: {type(exc).__name__}: {exc}"]
    found = process.broadcast(found)
    if isinstance(found, list):
        raise DataError(found)
    return found  # type: ignore[no-any-return]


def folder_stream(root: Path, *, mode: str = "RGB", use_cache: bool = True,
                  max_image_pixels: int = MAX_IMAGE_PIXELS,
                  in_memory: bool | str = "auto") -> ImageData | ImageStream:
    """The images under ``root`` (a folder or an archive of one): decoded (and cached) when
    ``in_memory`` is true, or ``"auto"`` and the training images' headers agree on one size
    (:func:`one_size`) and they are few enough (kdreg's :data:`kdreg.data.loading.IN_MEMORY_LIMIT`);
    else a stream. A folder decoded before (its decode cache) is returned decoded."""
    if mode not in MODES:
        raise OptionError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", key="mode")
    folder = resolve_root(Path(root).expanduser())
    files, classes = scan(folder)
    if use_cache:
        cached = _read_cache(folder, cache_key(folder, files, mode), mode)
        if cached is not None:
            return cached
    train, test = (files[s] for s in SPLITS)

    def decode() -> ImageData:
        return load_image_folder(folder, mode=mode, use_cache=use_cache,
                                 max_image_pixels=max_image_pixels)

    if in_memory is True:
        return decode()
    size, mean, std = _looked_at(folder, train, mode, max_image_pixels, in_memory == "auto")
    if size is not None and len(train) * MODES[mode] * size[0] * size[1] <= IN_MEMORY_LIMIT:
        return decode()
    from .readers import FileReader

    return ImageStream(train=FileReader(folder, train, max_image_pixels),
                       test=FileReader(folder, test, max_image_pixels), classes=classes,
                       train_labels=[e[1] for e in train], test_labels=[e[1] for e in test],
                       mean=mean, std=std, in_chans=MODES[mode], decode=decode, image_size=size)
