"""A recipe's data section, from the source to the batches: the source through the dataset
registry (:func:`read_data`), the path it takes (:func:`choose_path`: in memory or streamed), the
splits (:func:`load_data`) and a set's batches on that path (:func:`batches`)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import attrs
import torch

from kdreg.create import create
from kdreg.data.batches import BatchLoader
from kdreg.data.sources import ImageData, ImageStream, check_source
from kdreg.data.splits import Splits, TensorSet, prepare_splits
from kdreg.data.streaming import Streaming, StreamLoader, StreamSet, default_workers
from kdreg.data.transforms import BatchMix, image_transforms, resolve_augment, uses_timm_options
from kdreg.engine import distributed
from kdreg.errors import DataError, UserError
from kdreg.options import accepted_options
from kdreg.recipe import DataConfig
from kdreg.registry import Registry, collect, get_registry

#: ``data.in_memory = "auto"`` keeps a training set in memory up to this many decoded bytes.
IN_MEMORY_LIMIT = 2 * 2**30
#: The streamed path's image size when the recipe sets none.
STREAM_IMAGE_SIZE = 224

IN_MEMORY = "in memory"
STREAMED = "streamed"

#: What kdreg gives a dataset factory that declares it (never a recipe option): ``root``,
#: ``download`` and ``in_memory`` (:func:`wanted_in_memory`).
PROVIDED = ("root", "download", "in_memory")


def _resolve_registry(pm_registry: Any) -> Registry | None:
    if pm_registry is None or isinstance(pm_registry, Registry):
        return pm_registry
    return collect("dataset", pm_registry)  # a plugin manager


def load_data(config: Any, *, pm_registry: Any = None) -> Splits:
    """Build the splits described by a recipe's data section, on the path :func:`choose_path`
    takes.

    ``config`` has ``dataset``, ``root``, ``val_split``, ``train_limit``, ``test_limit``,
    ``download``, ``data_seed`` and ``options`` (and ``in_memory``, ``image_size``, ``augment``,
    ``workers``, ``skip_bad_images``; missing ones take the recipe's defaults). ``pm_registry`` is
    a dataset :class:`kdreg.registry.Registry` or a plugin manager to use instead of the
    process-wide one.
    """
    source = read_data(config, pm_registry=pm_registry)
    path = choose_path(config, source)
    streaming = None
    if path == IN_MEMORY and isinstance(source, ImageStream):
        assert source.decode is not None  # choose_path checked
        try:
            source = check_source(source.decode(), str(config.dataset))
        except DataError as exc:
            if _setting(config, "in_memory") is True:
                raise _at_root(exc, config) from None
            path = STREAMED  # "auto": images of several sizes after all, or unreadable ones
    if path == STREAMED:
        streaming = _streaming(config, source)
        if isinstance(source, ImageData):
            source = tensor_stream(source)
    return prepare_splits(source, val_split=config.val_split, train_limit=config.train_limit,
                          test_limit=config.test_limit, seed=config.data_seed, streaming=streaming)


def source_shape(config: Any, *, pm_registry: Any = None) -> tuple[
        int, int, tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """(classes, channels, the models' input size, mean, std) of the recipe's data on the path it
    takes, from the source alone (no split drawn, no stream decoded): what validation builds the
    models for."""
    source = read_data(config, pm_registry=pm_registry)
    size = image_size(config, source, streamed=choose_path(config, source) == STREAMED)
    chans = source.in_chans if isinstance(source, ImageStream) else int(source.train_images.shape[1])
    return len(source.classes), chans, size, source.mean, source.std


def read_data(config: Any, *, pm_registry: Any = None) -> ImageData | ImageStream:
    """The data source's images as it returns them (checked), before any split: decoded
    (:class:`ImageData`) or a stream (:class:`ImageStream`). A problem with the data (a folder
    without class folders, an empty class) is one ``what @ recipe.data.root`` line."""
    options = dict(getattr(config, "options", None) or {})
    for reserved in PROVIDED:
        if reserved in options:
            raise UserError(f"data.options may not set {reserved!r}; use data.{reserved} "
                            f"@ recipe.data.options.{reserved}")
    download = bool(config.download)
    registry = _resolve_registry(pm_registry)
    provided: dict[str, Any] = {"root": Path(str(config.root)).expanduser(), "download": download}
    datasets = registry or get_registry("dataset")
    entry = datasets.get(config.dataset) if config.dataset in datasets else None
    if entry is not None and "in_memory" in inspect.signature(entry.factory).parameters:
        provided["in_memory"] = wanted_in_memory(config)  # only to a factory that names it
    if download and entry is not None and "download" not in accepted_options(entry.factory):
        raise UserError(f"dataset {config.dataset!r} cannot download; set data.download = false "
                        "@ recipe.data.download")
    try:
        data: ImageData | ImageStream = create(
            "dataset", config.dataset, options, provided=provided, path="recipe.data.options",
            registry=registry, name_key="recipe.data.dataset",
            result=("a kdreg.data.ImageData or kdreg.data.ImageStream", check_source))
    except DataError as exc:
        raise _at_root(exc, config) from None
    return data


def _at_root(exc: DataError, config: Any) -> DataError:
    """``exc`` with ``@ recipe.data.root`` on the source's own problems (they are about the
    data); the contract check's (``dataset 'name': ...``) are about the source, and kept."""
    own = f"dataset {config.dataset!r}: "
    return DataError([p if " @ " in p or p.startswith(own) else f"{p} @ recipe.data.root"
                      for p in exc.problems])


# --------------------------------------------------------------------------------------------
# In memory or streamed


def _setting(config: Any, key: str) -> Any:
    if hasattr(config, key):
        return getattr(config, key)
    default: Any = attrs.fields_dict(DataConfig)[key].default
    return default.factory() if isinstance(default, attrs.Factory) else default  # type: ignore[arg-type]


def _native_size(source: ImageData | ImageStream) -> tuple[int, int] | None:
    if isinstance(source, ImageData):
        return int(source.train_images.shape[2]), int(source.train_images.shape[3])
    return tuple(source.image_size) if source.image_size is not None else None  # type: ignore[return-value]


def wanted_in_memory(config: Any) -> bool | str:
    """``data.in_memory`` as a dataset factory learns it: ``"auto"`` becomes false when the
    recipe's augmentation needs the streamed path anyway (so the source need not decode)."""
    mode = _setting(config, "in_memory")
    if mode == "auto" and in_memory_problems(config, None):
        return False
    return bool(mode) if isinstance(mode, bool) else "auto"


def in_memory_problems(config: Any, source: ImageData | ImageStream | None) -> list[str]:
    """Why ``source`` (None: any source) cannot take the in-memory path with this recipe (empty:
    it can)."""
    problems = []
    where = "@ recipe.data.in_memory"
    if isinstance(source, ImageStream) and source.decode is None:
        problems.append(f"dataset {config.dataset!r} is a stream that cannot be decoded into memory; "
                        f"set data.in_memory = \"auto\" or false {where}")
    augment = _setting(config, "augment")
    if str(augment.name) == "imagenet":
        problems.append(f"the in-memory path augments as `cifar` only, not `imagenet`; set "
                        f"data.in_memory = \"auto\" or false {where}")
    extra = uses_timm_options(augment)
    if extra:
        problems.append(f"data.augment.{', data.augment.'.join(extra)} need the streamed path; set "
                        f"data.in_memory = \"auto\" or false {where}")
    size = int(_setting(config, "image_size"))
    native = None if source is None else _native_size(source)
    if size and native is not None and native != (size, size):
        problems.append(f"data.image_size = {size} but the images are {native[0]}x{native[1]} and "
                        f"the in-memory path does not resize; set data.in_memory = \"auto\" or "
                        f"false {where}")
    return problems


def choose_path(config: Any, source: ImageData | ImageStream) -> str:
    """``"in memory"`` or ``"streamed"``, by ``data.in_memory``: ``true`` (refused, one line per
    reason, when the source or the augmentation cannot), ``false``, or ``"auto"``: in memory when
    it can and the decoded training set is at most :data:`IN_MEMORY_LIMIT` bytes (a source
    already decoded is in memory already)."""
    augment = _setting(config, "augment")
    if str(augment.name) == "cifar":
        per_image = [k for k in ("auto_augment", "color_jitter") if getattr(augment, k)]
        if per_image:
            raise UserError([f"data.augment.{k} goes with name = \"imagenet\" (timm's transform), "
                             f"not \"cifar\" @ recipe.data.augment.{k}" for k in per_image])
    mode = _setting(config, "in_memory")
    if mode is False:
        return STREAMED
    problems = in_memory_problems(config, source)
    if mode is True:
        if problems:
            raise UserError(problems)
        return IN_MEMORY
    if problems:
        return STREAMED
    if isinstance(source, ImageData):
        return IN_MEMORY
    native = _native_size(source)
    if native is None:
        return STREAMED
    decoded = len(source.train_labels) * source.in_chans * native[0] * native[1]
    return IN_MEMORY if decoded <= IN_MEMORY_LIMIT else STREAMED


def image_size(config: Any, source: ImageData | ImageStream, streamed: bool) -> tuple[int, int]:
    """The models' input size: ``data.image_size``, else the images' own size in memory and
    :data:`STREAM_IMAGE_SIZE` streamed."""
    size = int(_setting(config, "image_size"))
    if size:
        return size, size
    native = _native_size(source)
    if not streamed and native is not None:
        return native
    return STREAM_IMAGE_SIZE, STREAM_IMAGE_SIZE


def _streaming(config: Any, source: ImageData | ImageStream) -> Streaming:
    augment = _setting(config, "augment")
    name = resolve_augment(augment, streamed=True)
    size = image_size(config, source, streamed=True)
    chans = source.in_chans if isinstance(source, ImageStream) else int(source.train_images.shape[1])
    train_tf, eval_tf = image_transforms(augment, name, size, _native_size(source),
                                         "RGB" if chans == 3 else "L")
    workers = _setting(config, "workers")
    return Streaming(image_size=size, in_chans=chans, augment=name, train_transform=train_tf,
                     eval_transform=eval_tf,
                     workers=default_workers(distributed.world_size()) if workers is None else int(workers),
                     skip_bad=bool(_setting(config, "skip_bad_images")),
                     mix=augment if BatchMix.wanted(augment) else None)


class TensorReader:
    """Decoded uint8 images ``[N, C, H, W]`` read one at a time as PIL images (a decoded source
    on the streamed path, e.g. CIFAR with ``imagenet`` augmentation)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        array = self.images[index].permute(1, 2, 0).numpy()
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        return image, int(self.labels[index])

    def filename(self, index: int, absolute: bool = False) -> str:
        return f"image {index}"


def tensor_stream(data: ImageData) -> ImageStream:
    """Decoded images as a stream (the streamed path's transforms apply to them)."""
    _, chans, h, w = data.train_images.shape
    return ImageStream(train=TensorReader(data.train_images, data.train_labels),
                       test=TensorReader(data.test_images, data.test_labels),
                       classes=data.classes, train_labels=data.train_labels,
                       test_labels=data.test_labels, mean=data.mean, std=data.std,
                       in_chans=int(chans), image_size=(int(h), int(w)))


def describe(splits: Splits) -> dict[str, Any]:
    """results.json's ``data``: which path the run took and how it read its images."""
    s = splits.streaming
    info: dict[str, Any] = {"path": IN_MEMORY if s is None else STREAMED,
                            "image_size": list(splits.input_size),
                            "train_images": len(splits.train), "val_images": len(splits.val),
                            "test_images": len(splits.test)}
    if s is None:
        info["augment"] = "cifar"
    else:
        info.update(augment=s.augment, workers=s.workers, skip_bad_images=s.skip_bad)
    return info


# --------------------------------------------------------------------------------------------
# A set's batches


def batches(splits: Splits, part: str, *, batch_size: int, device: torch.device, train: bool,
            seed: int = 0, rank: int = 0, world_size: int = 1) -> BatchLoader | StreamLoader:
    """Batches of ``splits.<part>`` on ``device``, unnormalised (each model normalises its own
    input): a :class:`BatchLoader` in memory, a :class:`StreamLoader` streamed."""
    data = getattr(splits, part)
    if isinstance(data, TensorSet):
        return BatchLoader(data.images, data.labels, batch_size=batch_size, device=device,
                           train=train, seed=seed, rank=rank, world_size=world_size)
    assert isinstance(data, StreamSet) and splits.streaming is not None
    return StreamLoader(data, splits.streaming, batch_size=batch_size, device=device, train=train,
                        seed=seed, num_classes=splits.num_classes, rank=rank,
                        world_size=world_size)
