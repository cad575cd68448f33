"""Built-in data sources: cifar10, cifar100, imagefolder, cifar10-sample, synthetic."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from kdreg.data import ImageData, cache_dir
from kdreg.errors import DataError
from kdreg.hookspecs import hookimpl

from .cifar import cifar10, cifar100
from .folder import extract_archive, load_image_folder
from .synthetic import synthetic

SAMPLE = "cifar10_sample.tar"


def imagefolder(*, root: Path, download: bool = False, mode: str = "RGB") -> ImageData:
    """Images in root/train/<class>/ and root/test/<class>/ (or a .tar/.tar.gz of that layout)."""
    return load_image_folder(root, mode=mode)


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
