"""Random but learnable images for tests: a class colour and a class pattern, plus noise."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from kdreg.data.sources import ImageData, channel_stats
from kdreg.errors import OptionError


def _check(name: str, value: int, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise OptionError(f"{name} must be an integer >= {least}, got {value!r}", key=name)


def synthetic(*, root: Path | None = None, download: bool = False, num_classes: int = 10,
              train_size: int = 256, test_size: int = 64, image_size: int = 32,
              channels: int = 3, seed: int = 0) -> ImageData:
    """Random learnable images for tests (class colour and pattern plus noise)."""
    for name, value, least in (("num_classes", num_classes, 2), ("train_size", train_size, 1),
                               ("test_size", test_size, 1), ("image_size", image_size, 2),
                               ("channels", channels, 1), ("seed", seed, 0)):
        _check(name, value, least)
    gen = torch.Generator().manual_seed(seed)
    colours = 0.2 + 0.6 * torch.rand(num_classes, channels, 1, 1, generator=gen)
    coarse = torch.randn(num_classes, channels, 4, 4, generator=gen)
    patterns = 0.15 * F.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                                    align_corners=False)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        noise = 0.1 * torch.randn(n, channels, image_size, image_size, generator=gen)
        pixels = (colours[labels] + patterns[labels] + noise).clamp(0, 1)
        return pixels.mul(255).round().to(torch.uint8), labels

    train_images, train_labels = draw(train_size)
    test_images, test_labels = draw(test_size)
    mean, std = channel_stats(train_images)
    return ImageData(train_images=train_images, train_labels=train_labels,
                     test_images=test_images, test_labels=test_labels,
                     classes=tuple(f"class{k}" for k in range(num_classes)), mean=mean, std=std)
