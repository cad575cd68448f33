"""The ``wds`` data source: WebDataset shards read by random access on the streamed path."""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from kdreg import plugins
from kdreg.cli import main
from kdreg.data.loading import load_data
from kdreg.data.streaming import LOG_ENV, StreamLoader
from kdreg.engine.run import Run
from kdreg.errors import DataError
from kdreg.hookspecs import hookimpl
from kdreg.recipe import DataConfig
from kdreg_plugins.datasets.wds import index_paths, wds

#: the module (the package's attribute ``wds`` is the factory)
module = importlib.import_module("kdreg_plugins.datasets.wds")

CLASSES = ("cat", "dog", "emu")
FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"))


def image_bytes(rng: np.random.Generator, label: int, fmt: str = "JPEG",
                size: tuple[int, int] | None = None) -> bytes:
    """An image of a random size (a brightness per class, so a model can learn them)."""
    h, w = size or tuple(int(v) for v in rng.integers(12, 48, size=2))
    pixels = (rng.random((h, w, 3)) * 70 + 30 + 70 * label).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, quality=90)
    return out.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain tar of ``(name, data)`` members, as WebDataset's ``TarWriter`` writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def samples(rng: np.random.Generator, prefix: str, n: int, start: int = 0) -> list[tuple[str, bytes]]:
    """Members of ``n`` samples: an image (jpg, png or webp) and its class, plus a json ignored."""
    members = []
    for i in range(start, start + n):
        label = i % len(CLASSES)
        ext, fmt = FORMATS[i % len(FORMATS)]
        key = f"{prefix}{i:06d}"
        members += [(f"{key}.{ext}", image_bytes(rng, label, fmt)),
                    (f"{key}.cls", f"{label}\n".encode()),
                    (f"{key}.json", json.dumps({"i": i}).encode())]
    return members


def shards(root: Path, train: int = 12, test: int = 6, test_name: str = "test",
           nested: bool = False, classes: bool = True, seed: int = 0) -> Path:
    """Two shards per split, ``root/<split>-00000{0,1}.tar`` (or ``root/<split>/...`` when
    ``nested``), with ``root/classes.txt``."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), (test_name, test)):
        for k in range(2):
            name = f"{split}/shard-{k:06d}.tar" if nested else f"{split}-{k:06d}.tar"
            start, stop = (0, n // 2) if k == 0 else (n // 2, n)
            write_shard(root / name, samples(rng, f"{split}/s", stop - start, start=start))
    if classes:
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def config(root: Path, **changes: Any) -> Any:
    return attrs.evolve(DataConfig(), dataset="wds", root=str(root), val_split=0, image_size=16,
                        workers=0, **changes)


def members_of(root: Path, split: str = "train") -> list[tuple[str, bytes]]:
    """``(<shard>:<member>, image bytes)`` of every image of a split, in shard order."""
    found = []
    for shard in sorted(root.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith((".jpg", ".png", ".webp")):
                    data = tar.extractfile(m)
                    assert data is not None
                    found.append((f"{shard}:{m.name}", data.read()))
    return found


# ----------------------------------------------------------------------------- reading
def test_shards_read_back_every_image_and_class_by_random_access(tmp_path: Path) -> None:
    root = shards(tmp_path / "wds")
    source = wds(root=root)
    assert source.classes == CLASSES
    assert (len(source.train), len(source.test)) == (12, 6)
    assert source.train_labels.tolist() == [i % 3 for i in range(12)]
    assert source.test_labels.tolist() == [i % 3 for i in range(6)]
    expected = members_of(root)
    reader = source.train
    for i in (7, 0, 11, 3):  # out of order: each read seeks to its own offset
        name, data = expected[i]
        assert reader.filename(i) == name
        image, label = reader[i]
        assert label == i % 3
        assert np.array_equal(np.asarray(image.convert("RGB")),
                              np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        assert reader.read(i) == data
    # the statistics are the images', not ImageNet's defaults
    assert source.mean != (0.485, 0.456, 0.406)
    means = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB"), dtype=np.float64) / 255
             for _, d in expected]
    pixels = np.concatenate([m.reshape(-1, 3) for m in means])
    assert np.allclose(source.mean, pixels.mean(0), atol=1e-6)
    assert np.allclose(source.std, pixels.std(0), atol=1e-6)


@pytest.mark.parametrize("layout", ["nested", "val", "no classes.txt"])
def test_the_other_layouts_and_class_numbers_as_names(tmp_path: Path, layout: str) -> None:
    root = shards(tmp_path / "wds", nested=layout == "nested",
                  test_name="val" if layout == "val" else "test",
                  classes=layout != "no classes.txt")
    source = wds(root=root)
    assert source.classes == (("0", "1", "2") if layout == "no classes.txt" else CLASSES)
    assert (len(source.train), len(source.test)) == (12, 6)
    first = source.train.filename(0)
    assert first == (f"{root}/train/shard-000000.tar:train/s000000.jpg" if layout == "nested"
                     else f"{root}/train-000000.tar:train/s000000.jpg")
    assert source.test.filename(5).startswith(f"{root}/{'val' if layout == 'val' else 'test'}")


def test_the_index_is_built_once_and_rebuilt_when_a_shard_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = shards(tmp_path / "wds")
    indexed: list[str] = []
    real = module.index_shard
    monkeypatch.setattr(module, "index_shard", lambda s: indexed.append(s.name) or real(s))
    wds(root=root)
    assert sorted(indexed) == ["test-000000.tar", "test-000001.tar", "train-000000.tar",
                               "train-000001.tar"]
    shard = root / "train-000001.tar"
    beside = index_paths(shard)[0]
    assert beside.is_file() and beside.parent == root
    indexed.clear()
    wds(root=root)
    assert indexed == []                                   # every index read from its file
    # the same name and size, another modification time: indexed again
    before = shard.stat()
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))
    wds(root=root)
    assert indexed == ["train-000001.tar"]
    # rewritten with other samples (another size): indexed again, and read as it is now
    rng = np.random.default_rng(7)
    write_shard(shard, samples(rng, "train/t", 4, start=6))
    indexed.clear()
    source = wds(root=root)
    assert indexed == ["train-000001.tar"] and len(source.train) == 10
    assert source.train.filename(9) == f"{shard}:train/t000009.jpg"
    # a damaged index file is indexed again, not fatal
    index_paths(shard)[0].write_text("{not json")
    indexed.clear()
    wds(root=root)
    assert indexed == ["train-000001.tar"]


def test_an_index_that_cannot_be_kept_beside_the_shards_goes_to_kdregs_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDREG_CACHE", str(tmp_path / "cache"))
    root = shards(tmp_path / "wds")
    for shard in root.glob("*.tar"):  # a folder where each index file would go (as root, who
        index_paths(shard)[0].mkdir()  # may write to read-only folders, can be refused no write)
    wds(root=root)
    cached = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache" / "wds-index").iterdir())
    assert cached == [f"{s}-00000{k}.tar.json" for s in ("test", "train") for k in (0, 1)]
    assert all(p.is_dir() for p in root.glob(".*.kdreg-index.json"))
    indexed: list[str] = []
    real = module.index_shard
    monkeypatch.setattr(module, "index_shard", lambda s: indexed.append(s.name) or real(s))
    wds(root=root)
    assert indexed == []


def test_under_torchrun_the_first_process_indexes_and_the_others_read_its_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = shards(tmp_path / "wds")
    first = wds(root=root)                                     # rank 0: indexes, samples the stats
    indexed: list[str] = []
    real = module.index_shard
    monkeypatch.setattr(module, "index_shard", lambda s: indexed.append(s.name) or real(s))
    monkeypatch.setattr(module.process, "is_main", lambda: False)
    given: list[Any] = []
    monkeypatch.setattr(module.process, "broadcast",
                        lambda value: given.append(value) or (list(first.mean), list(first.std)))
    other = wds(root=root)                                     # another rank: rank 0's statistics
    assert given == [None] and indexed == []                   # it computed nothing, indexed nothing
    assert (other.mean, other.std) == (first.mean, first.std)
    assert [other.train.filename(i) for i in range(12)] == [first.train.filename(i) for i in range(12)]
    # a problem found by rank 0 stops the others with the same line
    monkeypatch.setattr(module.process, "broadcast", lambda value: ["shard x: bad"])
    with pytest.raises(DataError, match="shard x: bad"):
        wds(root=root)


# ----------------------------------------------------------------------------- training
RECIPE = """
name = "shards"
seed = 0
[data]
dataset = "wds"
root = "{root}"
batch_size = 6
eval_batch_size = 8
val_split = 6
image_size = 32
augment = "imagenet"
workers = 2
[train]
epochs = 2
device = "cpu"
channels_last = false
optimizer = {{ name = "sgd", lr = 0.02 }}
schedule = {{ name = "constant" }}
[[stages]]
name = "student"
backbone = {{ name = "timm", model = "test_resnet" }}
"""


class Interrupt:
    """Stops the run after its first epoch, as Ctrl-C would."""

    @hookimpl
    def kdreg_epoch_finished(self, run, stage, record):  # type: ignore[no-untyped-def]
        if record["epoch"] == 1:
            raise KeyboardInterrupt


def _metrics(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_shards_train_evaluate_and_resume_bit_identically(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    root = shards(tmp_path / "wds", train=18, test=6)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(root=root))
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setenv(LOG_ENV, str(logs))
    full = Run.start(recipe, tmp_path / "full", progress=False).execute()
    assert "data: streamed (2 loader workers per process), 32x32 images" in capsys.readouterr().out
    assert full["finished"] and full["data"]["path"] == "streamed"
    assert (full["data"]["train_images"], full["data"]["val_images"],
            full["data"]["test_images"]) == (12, 6, 6)
    assert len(full["stages"][0]["test_accuracy"]) == 1
    # each training image read exactly once per epoch (two epochs), each evaluated one once per
    # evaluation: the 6 validation images after each epoch, the test images at the end
    read = Counter((logs / "rank-0.log").read_text().splitlines())
    names = [n for n, _ in members_of(root)] + [n for n, _ in members_of(root, "test")]
    assert set(read) == set(names)
    counts = Counter(read.values())
    assert counts == {2: 12 + 6, 1: 6}, counts
    # stopped after its first epoch, resumed: bit-identical to the uninterrupted run
    monkeypatch.delenv(LOG_ENV)
    plugins.reset(plugins.make_plugin_manager(extra=[Interrupt()]))
    try:
        with pytest.raises(KeyboardInterrupt):
            Run.start(recipe, tmp_path / "cut", progress=False).execute()
    finally:
        plugins.reset()
    torch.manual_seed(12345)  # whatever the global RNGs hold now must not matter
    resumed = Run.resume(tmp_path / "cut", progress=False).execute()
    assert [m["train_loss"] for m in _metrics(tmp_path / "full")] == \
           [m["train_loss"] for m in _metrics(tmp_path / "cut")]
    assert full["stages"][0]["test_accuracy"] == resumed["stages"][0]["test_accuracy"]
    a, b = (torch.load(tmp_path / d / "checkpoints/student/last.pt", weights_only=True)["model"]
            for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_training_image_is_read_once_per_epoch(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = shards(tmp_path / "wds", train=16, test=6)
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setenv(LOG_ENV, str(logs))
    splits = load_data(config(root))
    assert splits.streaming is not None
    loader = StreamLoader(splits.train, attrs.evolve(splits.streaming, workers=2), batch_size=4,
                          device="cpu", train=True, seed=0, num_classes=3)
    seen = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        labels = torch.cat([y for _, y in loader])
        assert sorted(labels.tolist()) == sorted(splits.train.labels.tolist())
        lines = (logs / "rank-0.log").read_text().splitlines()
        (logs / "rank-0.log").unlink()
        assert sorted(lines) == sorted(n for n, _ in members_of(root))    # all, each once
        seen.append(lines)
    assert seen[0] != seen[1]                                   # each epoch its own order


# ----------------------------------------------------------------------------- refusals
def _one_line(root: Path, expected: tuple[str, ...]) -> None:
    with pytest.raises(DataError) as exc:
        wds(root=root)
    assert len(exc.value.problems) == 1, exc.value.problems
    line = str(exc.value.problems[0])
    assert "\n" not in line
    for fragment in expected:
        assert fragment in line, line


def _append(shard: Path, members: list[tuple[str, bytes]],
            edit: Callable[[tarfile.TarInfo], None] | None = None) -> None:
    """Rewrite ``shard`` with ``members`` added (``edit`` changes the last one's header)."""
    with tarfile.open(shard) as tar:
        old = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(shard, "w") as tar:
        for info, data in old:
            tar.addfile(info, io.BytesIO(data))
        for k, (name, data) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if edit is not None and k == len(members) - 1:
                edit(info)
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def _link(info: tarfile.TarInfo) -> None:
    info.type, info.linkname, info.size = tarfile.SYMTYPE, "/etc/passwd", 0


def _device(info: tarfile.TarInfo) -> None:
    info.type, info.size = tarfile.CHRTYPE, 0


def _hardlink(info: tarfile.TarInfo) -> None:
    info.type, info.linkname, info.size = tarfile.LNKTYPE, "train/s000000.jpg", 0


IMAGE = image_bytes(np.random.default_rng(1), 0, size=(8, 8))


@pytest.mark.parametrize(("members", "edit", "expected"), [
    ([("x/../../evil.jpg", IMAGE)], None, ("refusing shard", "'x/../../evil.jpg'", "..")),
    ([("/abs/evil.jpg", IMAGE)], None, ("refusing shard", "'/abs/evil.jpg'", "absolute")),
    ([("evil.jpg", b"")], _link, ("refusing shard", "'evil.jpg'", "link or special file")),
    ([("evil.jpg", b"")], _hardlink, ("refusing shard", "'evil.jpg'", "link or special file")),
    ([("evil.jpg", b"")], _device, ("refusing shard", "'evil.jpg'", "link or special file")),
    ([("extra/s9.cls", b"1")], None, ("sample 'extra/s9' has no image", "extra/s9.cls")),
    ([("extra/s9.png", IMAGE)], None, ("sample 'extra/s9' has no class", "extra/s9.cls",
                                       "'extra/s9.png'")),
    ([("extra/s9.png", IMAGE), ("extra/s9.cls", b"one")], None,
     ("member 'extra/s9.cls' holds b'one'", "not a class number")),
    ([("extra/s9.png", IMAGE), ("extra/s9.cls", b"-1")], None,
     ("member 'extra/s9.cls' holds b'-1'", "not a class number")),
    ([("extra/s9.png", IMAGE), ("extra/s9.cls", b"3")], None,
     ("member 'extra/s9.cls' holds class 3", "beyond the 3 classes of", "classes.txt")),
    ([("extra/s9.png", IMAGE), ("extra/s9.jpg", IMAGE), ("extra/s9.cls", b"1")], None,
     ("sample 'extra/s9' has two images", "'extra/s9.png'", "'extra/s9.jpg'")),
])
def test_a_bad_shard_is_refused_in_one_line_naming_it(
        tmp_path: Path, members: list[tuple[str, bytes]], edit: Any,
        expected: tuple[str, ...]) -> None:
    root = shards(tmp_path / "wds", train=6, test=3)
    shard = root / "train-000001.tar"
    _append(shard, members, edit)
    _one_line(root, (str(shard), *expected))


def test_compressed_shards_are_refused_with_the_way_out(tmp_path: Path) -> None:
    import gzip

    root = shards(tmp_path / "wds", train=6, test=3)
    shard = root / "train-000001.tar"
    gz = root / "train-000001.tar.gz"
    gz.write_bytes(gzip.compress(shard.read_bytes()))
    shard.unlink()
    _one_line(root, (f"shard {gz} is compressed (.tar.gz)", "seeking", "uncompressed .tar"))
    # a gzipped shard named .tar: found by its first bytes
    gz.rename(shard)
    _one_line(root, (f"shard {shard} is compressed (gzip)", "uncompressed .tar"))


def test_a_missing_split_other_classes_and_a_bad_folder_are_refused(tmp_path: Path) -> None:
    root = shards(tmp_path / "wds", train=6, test=3)
    for shard in root.glob("test-*.tar"):
        shard.unlink()
    _one_line(root, ("expected WebDataset shards of the test split", f"{root}/test-*.tar",
                     f"{root}/val/*.tar", "found none"))
    _one_line(tmp_path / "nowhere", ("expected a folder of WebDataset shards",
                                     "does not exist"))
    # test shards of classes 0 and 1 only; train has 0, 1, 2
    rng = np.random.default_rng(3)
    write_shard(root / "test-000000.tar",
                [m for i in range(4) for m in ((f"t{i}.jpg", image_bytes(rng, i % 2)),
                                                (f"t{i}.cls", str(i % 2).encode()))])
    _one_line(root, ("train shards", f"{root}/train-000000.tar", f"{root}/test-000000.tar",
                     "same classes", "only in train: emu", "only in test: -"))
    # a split whose shards hold no sample; a classes.txt with a gap
    empty = write_shard(root / "test-000001.tar", [])
    (root / "test-000000.tar").unlink()
    _one_line(root, ("the test shards of", "test-000001.tar", "hold no samples"))
    empty.unlink()
    shards(root, train=6, test=3)
    (root / "classes.txt").write_text("cat\n\ndog\nemu\n")
    _one_line(root, (f"{root}/classes.txt line 2 is empty",))
    (root / "classes.txt").write_text("cat\ndog\nemu\n\n")
    assert wds(root=root).classes == CLASSES
    # both layouts at once
    (root / "classes.txt").unlink()
    write_shard(root / "test" / "a.tar", [("t.jpg", IMAGE), ("t.cls", b"0")])
    _one_line(root, (f"{root}/test-*.tar", f"{root}/test/*.tar", "keep one layout"))


def test_validate_exits_2_with_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = shards(tmp_path / "wds", train=6, test=3)
    shard = root / "test-000000.tar"
    _append(shard, [("../evil.jpg", IMAGE)])
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(root=root).replace("val_split = 6", "val_split = 2"))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert str(shard) in err[0] and "'../evil.jpg'" in err[0] and err[0].endswith("@ recipe.data.root")


def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    root = shards(tmp_path / "wds", train=6, test=3)
    sizes = [Image.open(io.BytesIO(d)).size for _, d in members_of(root)]
    i = next(k for k, (w, h) in enumerate(sizes) if w * h > 400)
    source = wds(root=root, max_image_pixels=400)
    with pytest.raises(DataError) as exc:
        source.train[i]
    line = str(exc.value.problems[0])
    assert source.train.filename(i) in line and "more than the limit of 400" in line
    assert "max_image_pixels" in line
    small = next(k for k, (w, h) in enumerate(sizes) if w * h <= 400)
    assert source.train[small][0].size == sizes[small]
    with pytest.raises(Exception, match="max_image_pixels"):
        wds(root=root, max_image_pixels=0)


# ----------------------------------------------------------------------------- webdataset
@pytest.mark.skipif(importlib.util.find_spec("webdataset") is None,
                    reason="the webdataset package is not installed")
def test_shards_written_by_webdataset_read_back_the_same(tmp_path: Path) -> None:
    import webdataset

    rng = np.random.default_rng(5)
    root = tmp_path / "wds"
    root.mkdir()
    written: dict[str, list[tuple[bytes, int]]] = {}
    for split, n in (("train", 6), ("test", 3)):
        for k in range(2):
            with webdataset.TarWriter(str(root / f"{split}-{k:06d}.tar")) as sink:
                for i in range(n):
                    label = i % 3
                    data = image_bytes(rng, label)
                    sink.write({"__key__": f"{split}{k}-{i:04d}", "jpg": data, "cls": label})
                    written.setdefault(split, []).append((data, label))
    source = wds(root=root)
    for split in ("train", "test"):
        reader = getattr(source, split)
        assert [(reader.read(i), int(reader.labels[i])) for i in range(len(reader))] == written[split]
