"""The streamed path's transforms, built from timm's (``timm.data``): per image in the loader's
workers, per batch in the training process.

Per image (PIL in, uint8 ``[C, H, W]`` out, unnormalised: each model normalises its own input):

- ``cifar``: a 4-pixel reflect-pad random crop and a horizontal flip at the images' size (the
  in-memory path's augmentation, per image), after a resize when ``image_size`` differs;
- ``imagenet``: ``timm.data.create_transform``: RandomResizedCrop and flip (and the recipe's
  ``auto_augment``, colour jitter) for training; resize to ``image_size / crop_pct`` and centre
  crop for evaluation.

Per batch (:class:`BatchMix`, on the training device, images in [0, 1]): timm's random erasing
and ``timm.data.Mixup`` (mixup / CutMix, soft targets).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdreg.errors import UserError

Transform = Callable[[Any], Tensor]

#: The augmentation keys only the streamed path applies (``[data.augment]``), with their "off".
TIMM_KEYS = {"auto_augment": None, "color_jitter": 0.0, "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0}


def uses_timm_options(augment: Any) -> list[str]:
    """The keys of ``[data.augment]`` set to something the in-memory path cannot do."""
    return [k for k, off in TIMM_KEYS.items() if getattr(augment, k) != off]


def resolve_augment(augment: Any, streamed: bool) -> str:
    """``cifar`` or ``imagenet``: the recipe's name, ``auto`` resolved by the path."""
    name = str(augment.name)
    if name == "auto":
        return "imagenet" if streamed else "cifar"
    return name


def image_transforms(augment: Any, name: str, image_size: tuple[int, int],
                     native_size: tuple[int, int] | None) -> tuple[Transform, Transform]:
    """(training transform, evaluation transform) of PIL images to uint8 ``[C, H, W]``."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": (3, *image_size), "crop_pct": augment.crop_pct,
                                  "interpolation": augment.interpolation})
    eval_tf = create_transform(config["input_size"], is_training=False, normalize=False,
                               interpolation=config["interpolation"], crop_pct=config["crop_pct"],
                               crop_mode=config["crop_mode"])
    if name == "cifar":
        from torchvision import transforms as T

        steps: list[Any] = []
        if native_size != tuple(image_size):
            steps.append(T.Resize(image_size))
        steps += [T.RandomCrop(image_size, padding=4, padding_mode="reflect"),
                  T.RandomHorizontalFlip(augment.hflip), T.PILToTensor()]
        if native_size == tuple(image_size):
            eval_tf = T.PILToTensor()
        return T.Compose(steps), eval_tf
    train_tf = create_transform(
        config["input_size"], is_training=True, normalize=False, scale=tuple(augment.scale),
        ratio=tuple(augment.ratio), hflip=augment.hflip, color_jitter=augment.color_jitter,
        auto_augment=augment.auto_augment, interpolation=augment.interpolation)
    return train_tf, eval_tf


@contextlib.contextmanager
def seeded(seed: int, torch_too: bool = True) -> Iterator[None]:
    """Python's, numpy's (and torch's CPU) global RNGs seeded with ``seed`` inside, restored
    after: timm's and torchvision's transforms draw from them, so an image's augmentation depends
    on its seed alone, never on which process or in what order it is decoded."""
    state = (random.getstate(), np.random.get_state(),
             torch.random.get_rng_state() if torch_too else None)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch_too:
        torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        if state[2] is not None:
            torch.random.set_rng_state(state[2])


class BatchMix:
    """Random erasing and mixup / CutMix of a training batch (images in [0, 1] on the device),
    with timm's ``RandomErasing`` and ``Mixup``; the draws of a batch come from its seed."""

    def __init__(self, augment: Any, num_classes: int, device: torch.device):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        self.erase = (RandomErasing(augment.re_prob, mode="const", device=str(device))
                      if augment.re_prob > 0 else None)
        self.mix = None
        if augment.mixup > 0 or augment.cutmix > 0:
            self.mix = Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix,
                             prob=augment.mix_prob, switch_prob=augment.switch_prob,
                             label_smoothing=augment.label_smoothing, num_classes=num_classes)

    @staticmethod
    def wanted(augment: Any) -> bool:
        return augment.re_prob > 0 or augment.mixup > 0 or augment.cutmix > 0

    def __call__(self, x: Tensor, y: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """``(x, y)`` erased and mixed: ``y`` becomes soft targets ``[B, classes]`` under mixup."""
        with seeded(seed, torch_too=False):   # timm draws these from random and numpy
            if self.erase is not None:
                x = self.erase(x)
            if self.mix is not None:
                if len(x) % 2:
                    raise UserError(f"mixup / CutMix mixes pairs of images: a batch of {len(x)} per "
                                    "process is odd; make data.batch_size / processes even "
                                    "@ recipe.data.batch_size")
                x, y = self.mix(x, y)
        return x, y
