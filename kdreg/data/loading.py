"""Loading a recipe's data through the dataset registry: the source's images, then the splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdreg.create import create
from kdreg.data.sources import ImageData, check_image_data
from kdreg.data.splits import Splits, prepare_splits
from kdreg.errors import UserError
from kdreg.options import accepted_options
from kdreg.registry import Registry, collect, get_registry


def _resolve_registry(pm_registry: Any) -> Registry | None:
    if pm_registry is None or isinstance(pm_registry, Registry):
        return pm_registry
    return collect("dataset", pm_registry)  # a plugin manager


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
    options = dict(getattr(config, "options", None) or {})
    for reserved in ("root", "download"):
        if reserved in options:
            raise UserError(f"data.options may not set {reserved!r}; use data.{reserved} "
                            f"@ recipe.data.options.{reserved}")
    download = bool(config.download)
    registry = _resolve_registry(pm_registry)
    provided = {"root": Path(str(config.root)).expanduser(), "download": download}
    if download:
        entry = (registry or get_registry("dataset")).get(config.dataset)
        if "download" not in accepted_options(entry.factory):
            raise UserError(f"dataset {config.dataset!r} cannot download; set data.download = false "
                            "@ recipe.data.download")
    data: ImageData = create("dataset", config.dataset, options, provided=provided,
                             path="recipe.data.options", registry=registry,
                             name_key="recipe.data.dataset",
                             result=("a kdreg.data.ImageData", check_image_data))
    return data
