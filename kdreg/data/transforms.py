"""The streamed path's transforms, built from timm's (``timm.data``): per image in the loader's
workers, per batch in the training process.

Per image (a lazily opened PIL image in, uint8 ``[C, H, W]`` out, unnormalised: each model
normalises its own input). The first step decodes: a JPEG is decoded at the smallest DCT scale
(1/2, 1/4 or 1/8, PIL's ``draft``, as FFCV does) that still leaves every pixel of the output
drawn from at least one decoded pixel per output pixel, so a 400-pixel photo cropped to 128 is
rarely decoded whole:

- ``cifar``: a 4-pixel reflect-pad random crop and a horizontal flip at the images' size (the
  in-memory path's augmentation, per image), after a resize when ``image_size`` differs;
- ``imagenet``: ``timm.data.create_transform``: RandomResizedCrop and flip (and the recipe's
  ``auto_augment``, colour jitter) for training; resize to ``image_size / crop_pct`` and centre
  crop for evaluation.

The training crop is timm's ``RandomResizedCropAndInterpolation``: its own ``get_params`` draw
the crop on the header's size, then the image is decoded at the scale the crop allows and the crop
resized in one step (:class:`DraftedResizedCrop`).

Per batch (:class:`BatchMix`, on the training device, images in [0, 1]): timm's random erasing
and ``timm.data.Mixup`` (mixup / CutMix, soft targets).
"""

from __future__ import annotations

import contextlib
import math
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
                     native_size: tuple[int, int] | None,
                     mode: str = "RGB") -> tuple[Transform, Transform]:
    """(training transform, evaluation transform) of lazily opened PIL images (or loaded ones)
    to uint8 ``[C, H, W]`` in ``mode``."""
    from timm.data import create_transform, resolve_data_config
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    config = resolve_data_config({"input_size": (3, *image_size), "crop_pct": augment.crop_pct,
                                  "interpolation": augment.interpolation})
    eval_tf = create_transform(config["input_size"], is_training=False, normalize=False,
                               interpolation=config["interpolation"], crop_pct=config["crop_pct"],
                               crop_mode=config["crop_mode"])
    if name == "cifar":
        steps: list[Any] = []
        if native_size != tuple(image_size):
            steps.append(T.Resize(image_size))
        steps += [T.RandomCrop(image_size, padding=4, padding_mode="reflect"),
                  T.RandomHorizontalFlip(augment.hflip), T.PILToTensor()]
        if native_size == tuple(image_size):
            eval_tf = T.PILToTensor()
        return (T.Compose([Decode(mode, _covers(steps[0])), *steps]),
                T.Compose([Decode(mode, _covers(_first(eval_tf))), eval_tf]))
    jitter: Any = augment.color_jitter or None   # None: no ColorJitter step at all
    train_tf = create_transform(
        config["input_size"], is_training=True, normalize=False, scale=tuple(augment.scale),
        ratio=tuple(augment.ratio), hflip=augment.hflip, color_jitter=jitter,
        auto_augment=augment.auto_augment, interpolation=augment.interpolation)
    steps = list(train_tf.transforms)
    if isinstance(steps[0], RandomResizedCropAndInterpolation):
        train = T.Compose([DraftedResizedCrop(steps[0], mode), *steps[1:]])
    else:
        train = T.Compose([Decode(mode), *steps])
    return train, T.Compose([Decode(mode, _covers(_first(eval_tf))), eval_tf])


def _first(transform: Any) -> Any:
    steps = getattr(transform, "transforms", None)
    return steps[0] if steps else transform


def _covers(step: Any) -> Callable[[int, int], tuple[int, int]] | None:
    """For a resize step: the smallest ``(width, height)`` a ``W x H`` image may be decoded at
    without the resize having fewer source pixels than output pixels; None for any other step."""
    from torchvision import transforms as T

    if not isinstance(step, T.Resize):
        return None
    size = step.size
    if isinstance(size, int) or len(size) == 1:       # the shorter side becomes `size`
        short = size if isinstance(size, int) else size[0]
        return lambda w, h: (math.ceil(w * short / min(w, h)), math.ceil(h * short / min(w, h)))
    out_h, out_w = size
    return lambda w, h: (out_w, out_h)


def reduction(have: tuple[float, float], need: tuple[float, float]) -> int:
    """The largest of 1, 2, 4, 8 by which ``have`` (width, height) may shrink and still cover
    ``need``: the DCT scale a JPEG may be decoded at."""
    factor = 1
    while factor < 8 and have[0] / (2 * factor) >= need[0] and have[1] / (2 * factor) >= need[1]:
        factor *= 2
    return factor


def decode(image: Any, mode: str, factor: int = 1) -> Any:
    """``image`` (a PIL image, perhaps opened lazily) decoded in ``mode``; a JPEG not decoded yet
    at ``1 / factor`` of its size (PIL's ``draft``: the DCT scale, about ``factor^2`` times less
    work)."""
    if factor > 1 and getattr(image, "format", None) == "JPEG":  # a no-op once decoded
        w, h = image.size
        image.draft(mode, (max(1, w // factor), max(1, h // factor)))
    image.load()
    return image if image.mode == mode else image.convert(mode)


class Decode:
    """The first step of a streamed transform: the image decoded in ``mode``, a JPEG at the
    smallest scale from which ``covers(width, height)`` can still be made."""

    def __init__(self, mode: str, covers: Callable[[int, int], tuple[int, int]] | None = None):
        self.mode, self.covers = mode, covers

    def __call__(self, image: Any) -> Any:
        factor = 1
        if self.covers is not None:
            factor = reduction(image.size, self.covers(*image.size))
        return decode(image, self.mode, factor)

    def __repr__(self) -> str:
        return f"Decode(mode={self.mode!r})"


class DraftedResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` on a lazily opened image: the crop drawn by
    its ``get_params`` on the header's size (the same draws as timm's own call), the image decoded
    at the smallest scale that still gives the crop at least the output's pixels, then the crop
    resized in one step."""

    def __init__(self, crop: Any, mode: str):
        import torchvision.transforms.functional as F

        self.crop, self.mode = crop, mode
        self._pil = F.pil_modes_mapping

    def __call__(self, image: Any) -> Any:
        box, interpolation = self.draw(image)
        return self.apply(image, box, interpolation)

    def draw(self, image: Any) -> tuple[tuple[int, int, int, int], Any]:
        """The crop box ``(top, left, height, width)`` in the image's pixels (its header's size)
        and the interpolation, drawn from the global RNGs as timm's own call draws them."""
        crop = self.crop
        i, j, h, w = crop.get_params(image, crop.scale, crop.ratio)
        interpolation = crop.interpolation
        if isinstance(interpolation, tuple | list):
            interpolation = random.choice(interpolation)
        return (int(i), int(j), int(h), int(w)), interpolation

    def apply(self, image: Any, box: tuple[int, int, int, int], interpolation: Any) -> Any:
        """``image`` decoded at the scale ``box`` allows, the box resized to the output size."""
        i, j, h, w = box
        out_h, out_w = self.crop.size
        full_w, full_h = image.size
        image = decode(image, self.mode, reduction((w, h), (out_w, out_h)))
        sx, sy = image.width / full_w, image.height / full_h
        return image.resize((out_w, out_h), self._pil[interpolation],
                            box=(j * sx, i * sy, (j + w) * sx, (i + h) * sy))

    def __repr__(self) -> str:
        return f"DraftedResizedCrop({self.crop!r}, mode={self.mode!r})"


@contextlib.contextmanager
def seeded(seed: int, torch_too: bool = True) -> Iterator[None]:
    """Python's, numpy's (and torch's CPU) global RNGs seeded with ``seed`` inside, restored
    after: timm's and torchvision's transforms draw from them, so an image's augmentation depends
    on its seed alone, never on which process or in what order it is decoded."""
    if torch.utils.data.get_worker_info() is not None:  # a loader worker: nothing to restore
        random.seed(seed)
        np.random.seed(seed % 2**32)
        if torch_too:
            torch.random.default_generator.manual_seed(seed)
        yield
        return
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
