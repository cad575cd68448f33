"""CIFAR-10 and CIFAR-100 in torchvision's format (the python pickles), downloaded on request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdreg.data.sources import ImageData, channel_stats
from kdreg.errors import DataError

# name -> (torchvision class, folder under root, files torchvision expects there)
LAYOUTS = {
    "CIFAR-10": ("CIFAR10", "cifar-10-batches-py",
                 [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
    "CIFAR-100": ("CIFAR100", "cifar-100-python", ["train", "test", "meta"]),
}


def load_cifar(title: str, root: Path, download: bool) -> ImageData:
    """Read one of the CIFAR data sets with torchvision; DataError if missing or unreadable."""
    import torchvision.datasets

    cls_name, base, expected = LAYOUTS[title]
    folder = Path(root) / base
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing and not download:
        raise DataError(f"{title} not found: expected {', '.join(missing)} under {folder} "
                        f"(torchvision's format); set data.download = true to fetch it")
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as exc:
        raise DataError(f"{title} files under {folder} are incomplete or corrupted ({exc}); "
                        f"delete them and set data.download = true") from None
    except OSError as exc:  # no network, a read-only root, a failed write
        raise DataError(f"could not download {title} into {root}: {exc}") from None
    images = {s: torch.from_numpy(np.ascontiguousarray(d.data)).permute(0, 3, 1, 2).contiguous()
              for s, d in (("train", train), ("test", test))}
    mean, std = channel_stats(images["train"])
    return ImageData(train_images=images["train"],
                     train_labels=torch.as_tensor(train.targets, dtype=torch.int64),
                     test_images=images["test"],
                     test_labels=torch.as_tensor(test.targets, dtype=torch.int64),
                     classes=tuple(train.classes), mean=mean, std=std)


def cifar10(*, root: Path, download: bool = False) -> ImageData:
    """CIFAR-10 (torchvision's format under root; downloads when data.download = true)."""
    return load_cifar("CIFAR-10", root, download)


def cifar100(*, root: Path, download: bool = False) -> ImageData:
    """CIFAR-100 (torchvision's format under root; downloads when data.download = true)."""
    return load_cifar("CIFAR-100", root, download)
