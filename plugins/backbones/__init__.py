"""Built-in backbones. Each module below defines ``register(register)``; this plugin calls them all."""

from __future__ import annotations

import importlib
from typing import Any

from kdreg.hookspecs import hookimpl

MODULES = [
    "mobilenet_v1",
    "tiny",
    "cifar_resnet",
    "cifar_resnet_wide",
    "wrn",
    "vgg",
    "slimmable_resnet",
    "msdnet",
    "timm_adapter",
    "exits",
    "slimmable_derived",
]


@hookimpl
def kdreg_register_backbones(register: Any) -> None:
    for module in MODULES:
        importlib.import_module(f"{__name__}.{module}").register(register)
