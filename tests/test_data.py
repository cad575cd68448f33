"""The data layer: splits, the on-device batch loader, image folders, archives, built-in datasets."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import kdreg_plugins.datasets as builtin
from kdreg import plugins
from kdreg.data import (
    BatchLoader,
    ImageData,
    Splits,
    TensorSet,
    channel_stats,
    load_data,
    prepare_splits,
)
from kdreg.errors import DataError, OptionError, UserError
from kdreg.recipe import parse_recipe
from kdreg.registry import Entry, Registry, get_registry
from kdreg_plugins.datasets import folder as folder_mod
from kdreg_plugins.datasets.synthetic import synthetic

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDREG_CACHE", str(tmp_path / "kdreg-cache"))


# --------------------------------------------------------------------------------------------
# helpers


def indexed_data(n_train: int = 500, n_test: int = 100, classes: int = 5,
                 counts: list[int] | None = None) -> ImageData:
    """Images whose first two pixels spell their index, so splits can be traced back."""
    def make(n: int, offset: int, labels: torch.Tensor) -> ImageData:
        index = torch.arange(n) + offset
        images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
        images[:, 0, 0, 0], images[:, 0, 0, 1] = (index // 256).to(torch.uint8), index % 256
        return images, labels

    gen = torch.Generator().manual_seed(123)
    if counts is None:
        train_labels = (torch.arange(n_train) % classes)[torch.randperm(n_train, generator=gen)]
    else:
        train_labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
        n_train = len(train_labels)
    test_labels = (torch.arange(n_test) % classes)[torch.randperm(n_test, generator=gen)]
    train_images, _ = make(n_train, 0, train_labels)
    test_images, _ = make(n_test, 10_000, test_labels)
    return ImageData(train_images, train_labels, test_images, test_labels,
                     classes=[f"c{k}" for k in range(classes)], mean=[0.5] * 3, std=[0.25] * 3)


def ids(tensor_set: TensorSet) -> list[int]:
    images = tensor_set.images
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()


def per_class(tensor_set: TensorSet, classes: int) -> list[int]:
    return torch.bincount(tensor_set.labels, minlength=classes).tolist()


def write_folder(root: Path, layout: dict[str, dict[str, int]], size: tuple[int, int] = (6, 5),
                 seed: int = 0) -> dict[str, np.ndarray]:
    """PNG images (lossless) in root/<split>/<class>/; returns {relative path: pixels}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                rel = f"{split}/{name}/{i:03d}.png"
                Image.fromarray(pixels).save(root / rel)
                written[rel] = pixels
    return written


SMALL = {"train": {"cat": 3, "ant": 2}, "test": {"cat": 1, "ant": 2}}


def one_line_error(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def data_config(**changes) -> SimpleNamespace:
    base = dict(dataset="synthetic", root="~/unused", val_split=0, train_limit=0, test_limit=0,
                download=False, data_seed=0, options={})
    return SimpleNamespace(**{**base, **changes})


def datasets_only(monkeypatch: pytest.MonkeyPatch):
    """A plugin manager with only the built-in dataset plugin (others switched off by env)."""
    monkeypatch.setenv(plugins.DISABLE_ENV, "backbones,graphs,console")
    return plugins.make_plugin_manager()


# --------------------------------------------------------------------------------------------
# prepare_splits


def test_splits_are_class_balanced_and_sized() -> None:
    data = indexed_data()
    s = prepare_splits(data, val_split=50, train_limit=100, test_limit=25, seed=0)
    assert isinstance(s, Splits)
    assert per_class(s.val, 5) == [10] * 5
    assert per_class(s.train, 5) == [20] * 5
    assert per_class(s.test, 5) == [5] * 5
    assert (s.num_classes, s.in_chans, s.input_size) == (5, 3, (4, 4))
    assert s.classes == data.classes and s.mean == (0.5,) * 3 and s.std == (0.25,) * 3


def test_uneven_counts_differ_by_at_most_one() -> None:
    s = prepare_splits(indexed_data(), val_split=53, train_limit=101, test_limit=0)
    assert sum(per_class(s.val, 5)) == 53 and set(per_class(s.val, 5)) == {10, 11}
    assert sum(per_class(s.train, 5)) == 101 and set(per_class(s.train, 5)) == {20, 21}
    assert len(s.test) == 100


def test_splits_do_not_overlap_and_labels_follow_images() -> None:
    data = indexed_data()
    s = prepare_splits(data, val_split=50, train_limit=200, test_limit=40, seed=3)
    train, val, test = set(ids(s.train)), set(ids(s.val)), set(ids(s.test))
    assert len(train) == 200 and len(val) == 50 and len(test) == 40
    assert not train & val
    assert train | val <= set(range(500)) and test <= set(range(10_000, 10_100))
    for subset, source_labels, offset in ((s.train, data.train_labels, 0),
                                          (s.val, data.train_labels, 0),
                                          (s.test, data.test_labels, 10_000)):
        expected = source_labels[torch.tensor(ids(subset)) - offset]
        assert torch.equal(subset.labels, expected)


def test_without_val_all_training_images_stay() -> None:
    s = prepare_splits(indexed_data(), val_split=0, train_limit=0, test_limit=0)
    assert s.val.images.shape == (0, 3, 4, 4) and len(s.val) == 0
    assert sorted(ids(s.train)) == list(range(500))


def test_draws_are_seeded_random_not_first_n() -> None:
    data = indexed_data()
    a = prepare_splits(data, val_split=50, train_limit=100, test_limit=20, seed=0)
    b = prepare_splits(data, val_split=50, train_limit=100, test_limit=20, seed=0)
    c = prepare_splits(data, val_split=50, train_limit=100, test_limit=20, seed=1)
    for name in ("train", "val", "test"):
        assert ids(getattr(a, name)) == ids(getattr(b, name))
        assert ids(getattr(a, name)) != ids(getattr(c, name))
    first_per_class = set()
    for k in range(5):
        first_per_class |= set((data.train_labels == k).nonzero().flatten()[:20].tolist())
    assert set(ids(a.train)) != first_per_class
    assert max(ids(a.train)) > 400  # spread over the whole set


def test_val_set_does_not_depend_on_limits() -> None:
    data = indexed_data()
    a = prepare_splits(data, val_split=40, train_limit=0, test_limit=0)
    b = prepare_splits(data, val_split=40, train_limit=60, test_limit=10)
    assert ids(a.val) == ids(b.val)
    assert set(ids(b.train)) <= set(ids(a.train))


def test_imbalanced_classes_keep_a_training_image() -> None:
    data = indexed_data(counts=[2, 50, 50], classes=3)
    s = prepare_splits(data, val_split=30, train_limit=0, test_limit=0)
    counts = per_class(s.val, 3)
    assert counts[0] == 1 and sum(counts) == 30 and sorted(counts[1:]) == [14, 15]
    assert min(per_class(s.train, 3)) >= 1
    with pytest.raises(DataError) as exc:
        prepare_splits(data, val_split=100, train_limit=0, test_limit=0)
    one_line_error(exc, "data.val_split = 100", "at most 99")


@pytest.mark.parametrize(("kwargs", "fragments"), [
    ({"val_split": 500}, ("data.val_split = 500", "500 training images")),
    ({"val_split": 100, "train_limit": 401}, ("data.train_limit = 401", "400 training images")),
    ({"test_limit": 101}, ("data.test_limit = 101", "100 test images")),
])
def test_split_errors(kwargs: dict, fragments: tuple[str, ...]) -> None:
    args = {"val_split": 0, "train_limit": 0, "test_limit": 0, **kwargs}
    with pytest.raises(DataError) as exc:
        prepare_splits(indexed_data(), **args)
    one_line_error(exc, *fragments)


def test_negative_limit_is_a_user_error() -> None:
    with pytest.raises(UserError, match="data.train_limit must be an integer >= 0"):
        prepare_splits(indexed_data(), val_split=0, train_limit=-1, test_limit=0)


def test_channel_stats_match_torch() -> None:
    images = torch.randint(0, 256, (50, 3, 7, 7), dtype=torch.uint8)
    mean, std = channel_stats(images, chunk=16)
    x = images.double() / 255
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-9)
    assert np.allclose(std, x.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-9)


# --------------------------------------------------------------------------------------------
# BatchLoader


def noise_images(n: int, size: int = 10, chans: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, chans, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def raw_loader(images: torch.Tensor, **kwargs) -> BatchLoader:
    """A loader whose x are the raw pixel values (mean 0, std 1/255) and y the image index."""
    chans = images.shape[1]
    opts = dict(batch_size=8, mean=[0.0] * chans, std=[1 / 255] * chans, device="cpu",
                train=True, seed=5)
    return BatchLoader(images, torch.arange(len(images)), **{**opts, **kwargs})


def reference_crop(image: torch.Tensor, dy: int, dx: int, flip: bool, pad: int = 4) -> torch.Tensor:
    """The slow way: reflect-pad one image, crop at (dy, dx), maybe flip."""
    return crop_of(padded(image, pad), dy, dx, flip, image.shape[1:])


def padded(image: torch.Tensor, pad: int = 4) -> torch.Tensor:
    return F.pad(image.float()[None], (pad, pad, pad, pad), mode="reflect")[0]


def crop_of(padded_image: torch.Tensor, dy: int, dx: int, flip: bool,
            size: tuple[int, int]) -> torch.Tensor:
    crop = padded_image[:, dy:dy + size[0], dx:dx + size[1]]
    return crop.flip(-1) if flip else crop


def test_eval_batches_are_ordered_normalised_and_complete() -> None:
    images = noise_images(10, size=5)
    labels = torch.arange(10) % 3
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    loader = BatchLoader(images, labels, batch_size=4, mean=mean, std=std, device="cpu",
                         train=False, seed=0)
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (10, 3, 5, 5)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-5)
    assert torch.equal(y, labels)
    assert torch.equal(torch.cat([b[0] for b in loader]), x)  # the same every time


def test_train_batches_shapes_and_drop_last() -> None:
    loader = raw_loader(noise_images(20), batch_size=8)
    batches = list(loader)
    assert len(loader) == 2 and len(batches) == 2
    for x, y in batches:
        assert x.shape == (8, 3, 10, 10) and x.dtype == torch.float32
        assert y.shape == (8,) and y.dtype == torch.int64
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == 16  # a permutation, not draws with replacement
    keep = raw_loader(noise_images(20), batch_size=8, drop_last=False)
    assert len(keep) == 3 and sorted(torch.cat([y for _, y in keep]).tolist()) == list(range(20))
    small = raw_loader(noise_images(5), batch_size=8)  # fewer images than a batch: keep them
    assert len(small) == 1 and len(next(iter(small))[1]) == 5


def test_crops_are_shifted_crops_of_the_padded_image() -> None:
    images = noise_images(12)
    loader = raw_loader(images, batch_size=4, drop_last=False)
    loader.set_epoch(2)
    perm, offsets, flips = loader.draws(2)
    position = 0
    for x, y in loader:
        for out, index in zip(x, y.tolist()):
            assert index == int(perm[position])
            dy, dx = offsets[position].tolist()
            expected = reference_crop(images[index], dy, dx, bool(flips[position]))
            assert torch.equal(out, expected), (position, dy, dx)
            position += 1
    assert position == 12


def test_crop_offsets_and_flips_are_spread() -> None:
    images = noise_images(64, size=12)
    loader = raw_loader(images, batch_size=64)
    x, y = next(iter(loader))
    found = []
    for out, index in zip(x[:16], y[:16].tolist()):  # search every crop, without the draws
        ref = padded(images[index])
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(out, crop_of(ref, dy, dx, flip, (12, 12)))]
        assert len(matches) == 1
        found.append(matches[0])
    assert len({m[:2] for m in found}) > 8
    assert {m[2] for m in found} == {False, True}
    _, offsets, flips = raw_loader(noise_images(2000, size=4), batch_size=8).draws(0)
    assert 0.45 < flips.float().mean() < 0.55
    assert offsets.min() == 0 and offsets.max() == 6  # padding 4 clamped to 3 for 4x4 images
    assert torch.bincount(offsets.flatten()).min() > 400


def test_epochs_are_reproducible_and_different() -> None:
    images = noise_images(32)

    def epoch(loader: BatchLoader, n: int) -> list[torch.Tensor]:
        loader.set_epoch(n)
        return [t for batch in loader for t in batch]

    a, b = raw_loader(images), raw_loader(images)
    first = epoch(a, 3)
    assert all(torch.equal(p, q) for p, q in zip(first, epoch(b, 3)))
    assert all(torch.equal(p, q) for p, q in zip(first, epoch(a, 3)))
    assert not torch.equal(first[1], epoch(a, 4)[1])
    other_seed = raw_loader(images, seed=6)
    assert not torch.equal(first[1], epoch(other_seed, 3)[1])
    c = raw_loader(images)  # without set_epoch, each pass is the next epoch
    c.set_epoch(3)
    list(c)
    after = [t for batch in c for t in batch]
    assert all(torch.equal(p, q) for p, q in zip(after, epoch(b, 4)))


def test_ranks_share_an_epoch_without_overlap() -> None:
    images = noise_images(21)
    shards = [raw_loader(images, batch_size=4, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([y for _, y in s]).tolist() for s in shards]
    assert len(shards[0]) == len(shards[1]) == 2
    assert not set(seen[0]) & set(seen[1])
    evals = [raw_loader(images, batch_size=4, rank=r, world_size=2, train=False)
             for r in range(2)]
    assert sorted(sum((torch.cat([y for _, y in s]).tolist() for s in evals), [])) == list(
        range(21))


def test_loader_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        raw_loader(noise_images(4).float())
    with pytest.raises(ValueError, match="batch_size"):
        raw_loader(noise_images(4), batch_size=0)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        raw_loader(noise_images(4), mean=[0.5], std=[0.5])


# --------------------------------------------------------------------------------------------
# image folders


def test_imagefolder_decodes_exact_pixels_and_sorted_classes(tmp_path: Path) -> None:
    written = write_folder(tmp_path / "d", SMALL)
    data = builtin.imagefolder(root=tmp_path / "d")
    assert data.classes == ("ant", "cat")
    assert data.train_images.shape == (5, 3, 6, 5) and data.train_images.dtype == torch.uint8
    assert data.train_labels.tolist() == [0, 0, 1, 1, 1]
    assert data.test_labels.tolist() == [0, 0, 1]
    assert np.array_equal(data.train_images[2].permute(1, 2, 0).numpy(),
                          written["train/cat/000.png"])
    assert np.array_equal(data.test_images[0].permute(1, 2, 0).numpy(),
                          written["test/ant/000.png"])
    mean, std = channel_stats(data.train_images)
    assert data.mean == mean and data.std == std


def test_imagefolder_grayscale_mode_and_bad_mode(tmp_path: Path) -> None:
    write_folder(tmp_path / "d", SMALL)
    gray = builtin.imagefolder(root=tmp_path / "d", mode="L")
    assert gray.train_images.shape == (5, 1, 6, 5) and len(gray.mean) == 1
    with pytest.raises(OptionError) as exc:
        builtin.imagefolder(root=tmp_path / "d", mode="CMYK")
    assert exc.value.key == "mode"


def test_decode_cache_is_used_and_invalidated(tmp_path: Path) -> None:
    root = tmp_path / "d"
    write_folder(root, SMALL)
    first = builtin.imagefolder(root=root)
    caches = list(root.glob(".kdreg-decoded-*.pt"))
    assert len(caches) == 1
    # Same size and mtime: the cache key is unchanged, so the cached pixels come back.
    image = root / "train/ant/000.png"
    st = image.stat()
    data = image.read_bytes()
    image.write_bytes(bytes(reversed(data)))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    cached = builtin.imagefolder(root=root)
    assert torch.equal(cached.train_images, first.train_images)
    # A real change (new mtime) invalidates it and replaces the old cache file.
    Image.fromarray(np.zeros((6, 5, 3), dtype=np.uint8)).save(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fresh = builtin.imagefolder(root=root)
    assert int(fresh.train_images[0].sum()) == 0
    assert torch.equal(fresh.train_images[1:], first.train_images[1:])
    new_caches = list(root.glob(".kdreg-decoded-*.pt"))
    assert len(new_caches) == 1 and new_caches != caches


@pytest.mark.parametrize(("make", "fragments"), [
    (lambda r: None, ("does not exist", "train/<class>/*.jpg")),
    (lambda r: r.write_text("x"), ("is some other file",)),
    (lambda r: write_folder(r, {"train": {"a": 1}}), ("expected", "test/<class>/*.jpg",
                                                      "test is missing")),
    (lambda r: (write_folder(r, {"test": {"a": 1}}), (r / "train").mkdir()),
     ("expected class folders in", "train")),
    (lambda r: (write_folder(r, {"train": {"a": 1}, "test": {"a": 1}}),
                (r / "train" / "b").mkdir()), ("expected image files", "train/b", "found none")),
    (lambda r: write_folder(r, {"train": {"a": 1, "b": 1}, "test": {"a": 1, "c": 1}}),
     ("same class folders", "only in train: b", "only in test: c")),
])
def test_malformed_folders(tmp_path: Path, make, fragments: tuple[str, ...]) -> None:
    root = tmp_path / "d"
    make(root)
    with pytest.raises(DataError) as exc:
        builtin.imagefolder(root=root)
    one_line_error(exc, str(root), *fragments)


def test_unreadable_and_odd_sized_images(tmp_path: Path) -> None:
    root = tmp_path / "d"
    write_folder(root, SMALL)
    bad = root / "train/cat/bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError) as exc:
        builtin.imagefolder(root=root)
    one_line_error(exc, "cannot read image", str(bad))
    bad.unlink()
    Image.fromarray(np.zeros((7, 5, 3), dtype=np.uint8)).save(root / "test/cat/big.png")
    with pytest.raises(DataError) as exc:
        builtin.imagefolder(root=root)
    one_line_error(exc, str(root / "test/cat/big.png"), "3x7x5", "3x6x5", "same size")


def test_non_images_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    root = tmp_path / "d"
    write_folder(root, SMALL)
    (root / "train/cat/notes.txt").write_text("hello")
    (root / "train/cat/.hidden.png").write_bytes(b"junk")
    (root / "test/README").write_text("a file, not a class")
    assert len(builtin.imagefolder(root=root).train_labels) == 5


def make_archive(source: Path, archive: Path, top: str = "") -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=str(Path(top) / path.relative_to(source)), recursive=False)


@pytest.mark.parametrize("top", ["", "cifar-like"])
def test_archives_are_extracted_once_into_the_cache(tmp_path: Path, top: str) -> None:
    write_folder(tmp_path / "d", SMALL)
    archive = tmp_path / "mini.tar.gz"
    make_archive(tmp_path / "d", archive, top)
    data = builtin.imagefolder(root=archive)
    extracted = tmp_path / "kdreg-cache" / "data" / "mini"
    assert (extracted / top / "train/cat/000.png").is_file()
    assert torch.equal(data.train_images, builtin.imagefolder(root=tmp_path / "d").train_images)
    marker = extracted / ".kdreg-extracted"
    stamp = marker.stat().st_mtime_ns
    again = builtin.imagefolder(root=archive)
    assert marker.stat().st_mtime_ns == stamp and torch.equal(again.test_images, data.test_images)


def test_unsafe_archives_are_refused(tmp_path: Path) -> None:
    for name, kind in (("../evil.png", tarfile.REGTYPE), ("/abs.png", tarfile.REGTYPE),
                       ("train/a/link.png", tarfile.SYMTYPE)):
        archive = tmp_path / "evil.tar"
        with tarfile.open(archive, "w") as tar:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
        with pytest.raises(DataError) as exc:
            builtin.imagefolder(root=archive)
        one_line_error(exc, "refusing to extract", str(archive), name)
    assert not (tmp_path / "kdreg-cache" / "evil.png").exists()
    assert not (tmp_path / "kdreg-cache" / "data" / "evil").exists()


def test_foreign_folder_in_the_way_is_not_deleted(tmp_path: Path) -> None:
    write_folder(tmp_path / "d", SMALL)
    make_archive(tmp_path / "d", tmp_path / "mini.tar")
    mine = tmp_path / "kdreg-cache" / "data" / "mini"
    mine.mkdir(parents=True)
    (mine / "keep.txt").write_text("user data")
    with pytest.raises(DataError) as exc:
        builtin.imagefolder(root=tmp_path / "mini.tar")
    one_line_error(exc, str(mine), "was not extracted by kdreg")
    assert (mine / "keep.txt").read_text() == "user data"


# --------------------------------------------------------------------------------------------
# built-in datasets and load_data


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sample-root")


@pytest.fixture(scope="module")
def sample(sample_root: Path) -> ImageData:
    return builtin.cifar10_sample(root=sample_root)


def test_sample_tar_is_small_and_loads_stratified(sample: ImageData) -> None:
    tar = Path(builtin.__file__).with_name(builtin.SAMPLE)
    assert tar.stat().st_size <= 8_000_000
    assert sample.classes == CIFAR10_CLASSES
    assert sample.train_images.shape == (4000, 3, 32, 32)
    assert sample.test_images.shape == (1000, 3, 32, 32)
    assert torch.bincount(sample.train_labels).tolist() == [400] * 10
    assert torch.bincount(sample.test_labels).tolist() == [100] * 10
    assert np.allclose(sample.mean, (0.491, 0.482, 0.447), atol=0.02)  # CIFAR-10's statistics
    assert np.allclose(sample.std, (0.247, 0.243, 0.262), atol=0.02)


def test_load_data_sample_through_the_plugin(sample: ImageData, sample_root: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pm = datasets_only(monkeypatch)
    config = data_config(dataset="cifar10-sample", root=str(sample_root), val_split=500,
                         train_limit=1000, test_limit=200)
    s = load_data(config, pm_registry=pm)
    assert (s.num_classes, s.in_chans, s.input_size) == (10, 3, (32, 32))
    assert per_class(s.val, 10) == [50] * 10
    assert per_class(s.train, 10) == [100] * 10
    assert per_class(s.test, 10) == [20] * 10
    assert (sample_root / "cifar10_sample" / "train" / "cat").is_dir()
    assert s.mean == sample.mean and s.std == sample.std


def test_builtin_datasets_are_registered() -> None:
    names = get_registry("dataset").names()
    assert {"cifar10", "cifar100", "imagefolder", "cifar10-sample", "synthetic"} <= set(names)


def test_synthetic_is_learnable_by_a_tiny_model() -> None:
    data = synthetic(num_classes=4, train_size=256, test_size=64, image_size=16, seed=1)
    assert data.train_images.shape == (256, 3, 16, 16) and data.classes[0] == "class0"
    assert torch.bincount(data.train_labels).tolist() == [64] * 4
    assert torch.equal(data.test_images, synthetic(num_classes=4, train_size=256, test_size=64,
                                                   image_size=16, seed=1).test_images)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(48, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train = BatchLoader(data.train_images, data.train_labels, batch_size=32, mean=data.mean,
                        std=data.std, device="cpu", train=True, seed=0)
    for step, (x, y) in enumerate(train):
        if step == 8:
            break
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    test = BatchLoader(data.test_images, data.test_labels, batch_size=64, mean=data.mean,
                       std=data.std, device="cpu", train=False, seed=0)
    x, y = next(iter(test))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.6  # chance is 0.25


def test_synthetic_rejects_bad_options() -> None:
    with pytest.raises(OptionError) as exc:
        synthetic(num_classes=1)
    assert exc.value.key == "num_classes"
    with pytest.raises(OptionError) as exc:
        synthetic(image_size=0)
    assert exc.value.key == "image_size"


def test_load_data_passes_options_and_reports_bad_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = datasets_only(monkeypatch)
    s = load_data(data_config(options={"num_classes": 3, "train_size": 30, "test_size": 9,
                                       "image_size": 8, "channels": 1}, val_split=6), pm_registry=pm)
    assert (s.num_classes, s.in_chans, s.input_size) == (3, 1, (8, 8))
    assert (len(s.train), len(s.val), len(s.test)) == (24, 6, 9)
    with pytest.raises(UserError) as exc:
        load_data(data_config(options={"colours": 3}), pm_registry=pm)
    one_line_error(exc, "unknown option 'colours' for dataset 'synthetic'", "num_classes",
                   "@ recipe.data.options.colours")
    with pytest.raises(UserError) as exc:
        load_data(data_config(options={"num_classes": 1}), pm_registry=pm)
    one_line_error(exc, "num_classes must be", "@ recipe.data.options.num_classes")
    with pytest.raises(UserError) as exc:
        load_data(data_config(options={"num_classes": "three"}), pm_registry=pm)
    one_line_error(exc, "recipe.data.options.num_classes")
    with pytest.raises(UserError) as exc:
        load_data(data_config(options={"root": "/x"}), pm_registry=pm)
    one_line_error(exc, "may not set 'root'")
    with pytest.raises(UserError) as exc:
        load_data(data_config(dataset="cifar11"), pm_registry=pm)
    assert "cifar10" in str(exc.value)


def test_load_data_checks_what_a_factory_returns() -> None:
    def bad(*, root: Path) -> ImageData:
        good = indexed_data(n_train=10, n_test=4, classes=2)
        return ImageData(good.train_images.float(), good.train_labels + 5, good.test_images,
                         good.test_labels.int(), good.classes, good.mean, good.std)

    registry = Registry("dataset", {"bad": Entry("bad", bad, "test", "local")})
    with pytest.raises(DataError) as exc:
        load_data(data_config(dataset="bad"), pm_registry=registry)
    assert exc.value.problems == [
        "dataset 'bad': train_images must be a uint8 tensor [N, C, H, W], got "
        "torch.float32 [10, 3, 4, 4]",
        "dataset 'bad': test_labels must be an int64 tensor [N], got torch.int32 [4]",
    ]
    with pytest.raises(UserError, match="cannot download"):
        load_data(data_config(dataset="bad", download=True), pm_registry=registry)


@pytest.mark.parametrize(("factory", "folder", "first"), [
    (builtin.cifar10, "cifar-10-batches-py", "data_batch_1"),
    (builtin.cifar100, "cifar-100-python", "train"),
])
def test_cifar_missing_and_corrupted(tmp_path: Path, factory, folder: str, first: str) -> None:
    with pytest.raises(DataError) as exc:
        factory(root=tmp_path)
    one_line_error(exc, f"expected {first}", str(tmp_path / folder), "data.download = true")
    (tmp_path / folder).mkdir()
    for name in builtin.cifar.LAYOUTS["CIFAR-10" if "10-" in folder else "CIFAR-100"][2]:
        (tmp_path / folder / name).write_bytes(b"garbage")
    with pytest.raises(DataError) as exc:
        factory(root=tmp_path)
    one_line_error(exc, "corrupted", str(tmp_path / folder))


def test_folder_module_names_archives() -> None:
    assert folder_mod.archive_stem(Path("a/cifar10-jpeg.tar.gz")) == "cifar10-jpeg"
    assert folder_mod.archive_stem(Path("x.TGZ")) == "x"
    assert folder_mod.archive_stem(Path("x.zip")) is None


def test_load_data_uses_the_recipes_data_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """data.data_seed draws the validation split and the subsets; the training seed does not."""
    pm = datasets_only(monkeypatch)
    options = {"num_classes": 3, "train_size": 60, "test_size": 30, "image_size": 4}
    base = dict(options=options, val_split=9, train_limit=30, test_limit=12)

    def images(s: Splits) -> list[bytes]:
        return [t.images.numpy().tobytes() for t in (s.train, s.val, s.test)]

    a = load_data(data_config(**base, data_seed=0), pm_registry=pm)
    b = load_data(data_config(**base, data_seed=0), pm_registry=pm)
    c = load_data(data_config(**base, data_seed=1), pm_registry=pm)
    assert images(a) == images(b)
    assert all(x != y for x, y in zip(images(a), images(c)))
    recipe = parse_recipe('[data]\ndata_seed = 7\n[[stages]]\nname = "s"\nbackbone = "resnet8"\n')
    assert recipe.data.data_seed == 7 and parse_recipe('[[stages]]\nname = "s"\nbackbone = "resnet8"\n').data.data_seed == 0
