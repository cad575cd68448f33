"""The streamed data path's figures (imported by ``benchmarks/run.py``).

* ``stream_loader_ratio``: images per second of kdreg's streaming loader (``StreamLoader``, the
  loader a streamed run trains from) / torchvision's ``ImageFolder`` + ``DataLoader``, with the
  same transforms (RandomResizedCrop to 128 px + horizontal flip, float tensors in [0, 1] out), the same
  worker processes and batch size, on a folder of JPEGs of ImageNet-like sizes (300-500 px a side,
  any aspect) built from the packaged CIFAR-10 sample. Whole epochs, the two loaders alternating,
  the median of each.
* ``stream_memory_ratio``: peak resident memory (the process and its loader workers: their
  proportional set sizes summed, so that pages the forked workers share with the process count
  once; sampled every 20 ms) of ``kdreg run`` training one streamed epoch over N = 8,000 images /
  the same over N = 2,000 images. Each size is run three times (``--quick``: once), the sizes
  alternating, and the figure is the ratio of the medians, so one low or high peak does not
  decide it; every reading goes to the figure's details.
* ``loader_fraction_streamed``: ``loader_fraction`` with the streamed path: the packaged sample's
  32x32 JPEGs read by worker processes (reported beside the in-memory figure, no target).
"""

from __future__ import annotations

import random
import sys
import tarfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from probes import median, median_ratio, peak_pss

SIDES = (300, 500)             # an image's sides are drawn from this range (ImageNet-like)
CROP = 128                     # the training crop of stream_loader_ratio
SAMPLE = Path(__file__).resolve().parent.parent / "plugins" / "datasets" / "cifar10_sample.tar"


def sample_images() -> list[tuple[str, Image.Image]]:
    """``(class, image)`` of every training image of the packaged CIFAR-10 sample."""
    out = []
    with tarfile.open(SAMPLE) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and "train" in parts and member.name.endswith((".jpg", ".png")):
                f = tar.extractfile(member)
                assert f is not None
                with Image.open(f) as img:
                    out.append((parts[parts.index("train") + 1], img.convert("RGB")))
    return out


def build_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``root/train/<class>/*.jpg`` (n images) and ``root/test/<class>/*.jpg`` (``n / 50`` per
    class, 1 to 20) upscaled from the sample to random sizes in ``SIDES``; kept when it exists."""
    done = root / ".complete"
    if done.is_file():
        return root
    test = max(1, min(20, n // 50))
    images = sample_images()
    rng = random.Random(seed)
    classes = sorted({c for c, _ in images})
    by_class = {c: [img for k, img in images if k == c] for c in classes}
    picks = {"train": [(classes[k % len(classes)], by_class[classes[k % len(classes)]][
                 (k // len(classes)) % len(by_class[classes[k % len(classes)]])]) for k in range(n)],
             "test": [(c, by_class[c][-1 - k]) for c in classes for k in range(test)]}
    for split, chosen in picks.items():
        for k, (cls, img) in enumerate(chosen):
            size = (rng.randint(*SIDES), rng.randint(*SIDES))
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            img.resize(size, Image.BICUBIC).save(folder / f"{k:06d}.jpg", quality=90)
    done.write_text(f"{n}\n")
    return root


def torchvision_loader(root: Path, *, workers: int, batch: int) -> Iterable[Any]:
    """The baseline: torchvision's ImageFolder and a shuffled DataLoader with its reference
    training preset (RandomResizedCrop, flip, PILToTensor, ConvertImageDtype to float in [0, 1]:
    torchvision's ``references/classification/presets.py`` without the normalisation, which
    kdreg's models apply themselves), as kdreg's loader yields float batches in [0, 1]."""
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(CROP), T.RandomHorizontalFlip(), T.PILToTensor(),
                    T.ConvertImageDtype(torch.float)])
    data = datasets.ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None)


def images_per_second(loader: Iterable[Any]) -> float:
    """One epoch of ``loader`` (every batch pulled, nothing else done), in images per second."""
    seen = 0
    t0 = time.perf_counter()
    for x, _ in loader:
        seen += len(x)
    return seen / (time.perf_counter() - t0)


def alternate_epochs(loaders: dict[str, Callable[[int], Iterable[Any]]], rounds: int) -> dict[str, list[float]]:
    """Images per second of each loader's epochs, the loaders taking turns (one warm-up epoch
    each first: persistent workers started, files in the page cache)."""
    made = {name: make(0) for name, make in loaders.items()}
    for loader in made.values():
        images_per_second(loader)
    out: dict[str, list[float]] = {name: [] for name in loaders}
    for r in range(rounds):
        names = list(made) if r % 2 == 0 else list(reversed(made))
        for name in names:
            loader = made[name]
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(r + 1)
            out[name].append(images_per_second(loader))
    return out


def kdreg_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdreg.cli", *args]


# ------------------------------------------------------------------------------ the figures
def kdreg_loader(root: Path, *, workers: int, batch: int, size: int = CROP, augment: str = "imagenet",
                 device: torch.device | None = None) -> Any:
    """kdreg's training loader of a streamed run over ``root`` (``data.in_memory = false``)."""
    from kdreg.data.loading import batches, load_data
    from kdreg.recipe import AugmentConfig, DataConfig

    config = DataConfig(dataset="imagefolder", root=str(root), batch_size=batch, val_split=0,
                        in_memory=False, image_size=size, augment=AugmentConfig(name=augment),
                        workers=workers)
    splits = load_data(config)
    return batches(splits, "train", batch_size=batch, device=device or torch.device("cpu"),
                   train=True, seed=0)


def loader_ratio(workdir: Path, *, images: int, workers: int, batch: int, rounds: int) -> dict[str, Any]:
    """``stream_loader_ratio``'s measurement: median images per second of each loader."""
    root = build_folder(workdir / f"jpeg-{images}", images)
    ips = alternate_epochs({
        "kdreg": lambda _: kdreg_loader(root, workers=workers, batch=batch),
        "torchvision": lambda _: torchvision_loader(root, workers=workers, batch=batch),
    }, rounds)
    med = {k: sorted(v)[len(v) // 2] for k, v in ips.items()}
    return {"ratio": med["kdreg"] / med["torchvision"], "images_per_second": ips,
            "median_images_per_second": med, "images": images, "workers": workers, "batch": batch,
            "crop": CROP, "sides": list(SIDES)}


RUN_RECIPE = """
name = "stream-memory"
[data]
dataset = "imagefolder"
root = "{root}"
batch_size = {batch}
eval_batch_size = {batch}
val_split = 0
in_memory = false
image_size = {size}
augment = "imagenet"
workers = {workers}
[train]
epochs = 1
log_interval = 1000
[[stages]]
name = "student"
backbone = {{ name = "resnet8" }}
"""


def memory_ratio(workdir: Path, *, small: int, large: int, workers: int, batch: int,
                 size: int = 64, repeats: int = 3) -> dict[str, Any]:
    """``stream_memory_ratio``'s measurement: peak resident memory of ``kdreg run`` training one
    streamed epoch over ``large`` / over ``small`` images (the same recipe otherwise). Each size
    runs ``repeats`` times, the sizes alternating, and the ratio is of the medians
    (:func:`probes.median_ratio`); every peak (``readings``) and run time goes to the details."""
    recipes: dict[int, Path] = {}
    for n in (small, large):
        root = build_folder(workdir / f"jpeg-{n}", n)
        recipes[n] = workdir / f"memory-{n}.toml"
        recipes[n].write_text(RUN_RECIPE.format(root=root, batch=batch, size=size, workers=workers))
    seconds: dict[int, list[float]] = {small: [], large: []}

    def peak(n: int) -> float:
        run_dir = workdir / f"run-{n}-{len(seconds[n])}"      # a fresh run directory each time
        pss, took = peak_pss(kdreg_command("run", str(recipes[n]), "--out", str(run_dir),
                                           "--no-progress"))
        seconds[n].append(round(took, 1))
        return pss

    ratio, readings = median_ratio(peak, (small, large), repeats)
    out: dict[str, Any] = {"workers": workers, "batch": batch, "image_size": size, "repeats": repeats}
    for n in (small, large):
        out[str(n)] = {"peak_pss_bytes": median(readings[n]), "readings": readings[n],
                       "seconds": seconds[n]}
    out["ratio"] = ratio
    return out
