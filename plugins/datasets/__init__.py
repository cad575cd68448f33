"""Built-in data sources: cifar10, cifar100, imagefolder, cifar10-sample, synthetic, hfds, wds."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from kdreg.data.sources import ImageData, ImageStream, cache_dir
from kdreg.errors import DataError, OptionError
from kdreg.hookspecs import hookimpl

from .cifar import cifar10, cifar100
from .folder import MAX_IMAGE_PIXELS, extract_archive, load_image_folder
from .hf import hfds
from .stream import folder_stream
from .synthetic import synthetic
from .wds import wds

SAMPLE = "cifar10_sample.tar"


def imagefolder(*, root: Path, download: bool = False, mode: str = "RGB",
                max_image_pixels: int = MAX_IMAGE_PIXELS, use_cache: bool = True,
                in_memory: bool | str = "auto") -> ImageData | ImageStream:
    """Images in root/train/<class>/ and root/test/<class>/ or root/val/<class>/ (or a .tar/.tar.gz
    of that layout), of any sizes: decoded for the in-memory path (``data.in_memory``: true, or
    "auto" with small images of one size), else a stream read image by image.

    An image of more than ``max_image_pixels`` pixels (PIL's default limit) is refused before it
    is decoded (a decompression bomb); ``use_cache = false`` decodes again instead of reading the
    decoded copy kept beside the data.
    """
    if int(max_image_pixels) != max_image_pixels or max_image_pixels < 1:
        raise OptionError(f"max_image_pixels must be an integer >= 1, got {max_image_pixels!r}",
                          key="max_image_pixels")
    return folder_stream(root, mode=mode, max_image_pixels=int(max_image_pixels),
                         use_cache=use_cache, in_memory=in_memory)


def cifar10_sample(*, root: Path, download: bool = False) -> ImageData:
    """A stratified real sample of CIFAR-10 shipped with kdreg (4,000 train, 1,000 test)."""
    with resources.as_file(resources.files(__name__) / SAMPLE) as archive:
        if not archive.is_file():
            raise DataError(f"the cifar10-sample archive {archive} is missing from the "
                            f"installation; reinstall kdreg")
        try:
            folder = extract_archive(archive, Path(root).expanduser())
        except DataError:
            folder = extract_archive(archive, cache_dir() / "data")  # root is not writable
        return load_image_folder(folder)


@hookimpl
def kdreg_register_datasets(register: Any) -> None:
    register("cifar10", cifar10, shape=(10, 3, 32, 32))
    register("cifar100", cifar100, shape=(100, 3, 32, 32))
    register("imagefolder", imagefolder)
    register("cifar10-sample", cifar10_sample, shape=(10, 3, 32, 32))
    register("synthetic", synthetic)
    register("hfds", hfds)
    register("wds", wds, description=(
        "WebDataset shards (uncompressed .tar: root/train-*.tar and root/test-*.tar or val-*.tar, "
        "or root/train/*.tar and root/test/*.tar or val/*.tar; a sample is key.jpg|jpeg|png|webp "
        "with its class number in key.cls, class names from an optional root/classes.txt), "
        "indexed once and read by random access on the streamed path: each torchrun process its "
        "own samples, epochs and augmentation drawn from the seed, --resume bit-identical; no "
        "extra package"))
