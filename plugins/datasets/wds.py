"""``wds``: WebDataset shards read by random access, on the streamed path.

A WebDataset shard is a plain tar file; a sample is the group of its members that share a key
(WebDataset's convention: a member's path up to the first dot of its file name, the rest its
extension): ``key.jpg`` (or ``.jpeg``, ``.png``, ``.webp``) the image and ``key.cls`` its class
number as text; other members (``key.json``, ...) are ignored. Each shard is indexed once with
the standard library's ``tarfile`` (the members' data offsets and sizes, and the classes: the
``.cls`` members are read while indexing) and the index is kept in a small file beside the shard
(``.<shard>.kdreg-index.json``; under ``$KDREG_CACHE/wds-index`` when the shard's folder is
read-only), keyed by the shard's name, size and modification time, so a changed shard is indexed
again. A loader worker reads an image by seeking to its offset in the shard. kdreg's sampler
therefore deals each torchrun process its own disjoint set of samples and draws each epoch's
order and every image's augmentation from the run's seed, as for a folder of images: a run is
reproducible and ``--resume`` bit-identical, which WebDataset's own iterable readers (and timm's
``ReaderWds``), shuffling in buffers inside the workers, cannot give.

No extra package is needed (``tarfile`` is in the standard library). A compressed shard
(``.tar.gz``, ...) allows no random access and is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from kdreg import process
from kdreg.data.sources import ImageStream, cache_dir
from kdreg.errors import DataError, OptionError

from .folder import MAX_IMAGE_PIXELS, MODES
from .stream import STATS_IMAGES, pixel_stats, spread

if TYPE_CHECKING:
    from .readers import ShardReader

#: The folder names (and shard name prefixes) of each split, in order of preference.
SPLIT_NAMES = {"train": ("train",), "test": ("test", "val")}
#: The extensions of a sample's image member.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: The extension of a sample's class member.
LABEL_EXTENSION = "cls"
CLASSES_FILE = "classes.txt"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst",
                       ".tar.lz4")
#: The first bytes of compressed files (a compressed shard named ``.tar``).
MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
         (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "lz4"))
INDEX_VERSION = 1
LAYOUT = ("<root>/train-*.tar and <root>/test-*.tar or <root>/val-*.tar, or <root>/train/*.tar "
          "and <root>/test/*.tar or <root>/val/*.tar")
UNCOMPRESS = ("a compressed tar cannot be read by seeking to a sample; write uncompressed .tar "
              "shards (e.g. gunzip each one)")

#: One sample of a shard's index: (image member, data offset, data size, class number).
Sample = tuple[str, int, int, int]


def wds(*, root: Path, mode: str = "RGB",
        max_image_pixels: int = MAX_IMAGE_PIXELS) -> ImageStream:
    """WebDataset shards (uncompressed .tar) in root, read by random access on the streamed path.

    Layout: ``root/train-*.tar`` and ``root/test-*.tar`` (or ``root/val-*.tar``), or the shards of
    each split in a folder of its own, ``root/train/*.tar`` and ``root/test/*.tar`` (or
    ``root/val/*.tar``); shards are read in the order of their names. A sample is the members
    sharing a key (the path up to the first dot of the file name, WebDataset's convention):
    ``key.jpg``, ``.jpeg``, ``.png`` or ``.webp`` its image, ``key.cls`` its class number as text.
    The class names are the lines of ``root/classes.txt`` when there is one (a ``.cls`` is a line
    number, from 0), else the class numbers. Train and test must hold the same classes.

    Each shard is indexed once (members, data offsets, classes) into
    ``.<shard>.kdreg-index.json`` beside it, or under ``$KDREG_CACHE/wds-index`` when its folder
    is read-only; the index is rebuilt when the shard's size or modification time changes. Loader
    workers read an image by seeking into its shard, so kdreg's sampler deals each torchrun
    process its own samples and every epoch's order and augmentation follow the run's seed
    (reproducible runs, bit-identical ``--resume``). The statistics are those of 256 training
    images spread over the set. ``mode`` is ``"RGB"`` or ``"L"``; an image of more than
    ``max_image_pixels`` pixels (PIL's default limit) is refused before it is decoded.

    Refused, one line naming the shard and member: a compressed shard (``.tar.gz``: no random
    access), a member that is a link, a device file, an absolute path or a path with ``..``, a
    sample without an image or a ``.cls``, a ``.cls`` that is not a class number (or beyond the
    lines of ``classes.txt``), a split without shards. Needs no extra package (``tarfile`` is in
    the standard library).
    """
    if mode not in MODES:
        raise OptionError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", key="mode")
    if int(max_image_pixels) != max_image_pixels or max_image_pixels < 1:
        raise OptionError(f"max_image_pixels must be an integer >= 1, got {max_image_pixels!r}",
                          key="max_image_pixels")
    folder = Path(root).expanduser().absolute()
    if not folder.is_dir():
        raise DataError(f"expected a folder of WebDataset shards ({LAYOUT}) at {folder}; "
                        f"{'it is a file' if folder.exists() else 'it does not exist'}")
    limit = int(max_image_pixels)
    # Under torchrun every process builds the source: the first indexes the shards (writing the
    # index files the others then read) and samples the statistics; a problem stops every process.
    source: ImageStream | None = None
    found: Any = None
    if process.is_main():
        try:
            source = _source(folder, mode, limit)
            found = pixel_stats([partial(_open_sample, source.train, i)
                                 for i in spread(range(len(source.train)), STATS_IMAGES)], mode)
        except DataError as exc:
            found = exc.problems
        except Exception as exc:  # noqa: BLE001 - raised on every process, not on rank 0 alone
            found = [f"cannot read the WebDataset shards of {folder}: {type(exc).__name__}: {exc}"]
    found = process.broadcast(found)
    if isinstance(found, list):
        raise DataError(found)
    if source is None:
        source = _source(folder, mode, limit)
    mean, std = found
    return ImageStream(train=source.train, test=source.test, classes=source.classes,
                       train_labels=source.train_labels, test_labels=source.test_labels,
                       mean=mean, std=std, in_chans=MODES[mode])


def _open_sample(reader: ShardReader, index: int) -> Image.Image:
    return reader[index][0]


# --------------------------------------------------------------------------------------------
# The shards


def _compression(path: Path) -> str | None:
    """The compression of ``path`` by its name or its first bytes (None: a plain tar)."""
    name = path.name.lower()
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    with open(path, "rb") as f:
        head = f.read(6)
    return next((what for magic, what in MAGIC if head.startswith(magic)), None)


def _is_shard_name(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith((".tar", *COMPRESSED_SUFFIXES))


def find_shards(folder: Path, split: str) -> list[Path]:
    """The shards of ``split`` (``train`` or ``test``, which may be called ``val``) in ``folder``,
    in name order; :class:`DataError` when there are none, or both layouts."""
    for name in SPLIT_NAMES[split]:
        flat = sorted(p for p in folder.glob(f"{name}-*") if p.is_file() and _is_shard_name(p))
        sub = folder / name
        nested = sorted(p for p in sub.iterdir() if p.is_file() and _is_shard_name(p)) \
            if sub.is_dir() else []
        if flat and nested:
            raise DataError(f"{folder} holds shards of both {folder}/{name}-*.tar and "
                            f"{sub}/*.tar; keep one layout")
        if flat or nested:
            return flat or nested
    tried = " or ".join(f"{folder}/{n}-*.tar or {folder}/{n}/*.tar" for n in SPLIT_NAMES[split])
    raise DataError(f"expected WebDataset shards of the {split} split, {tried}; found none "
                    f"(layout: {LAYOUT})")


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member's name (WebDataset's convention: the key is the path up to
    the first dot of the file name); None for a name without one."""
    match = re.fullmatch(r"((?:.*/|)[^./][^.]*)\.([^/]*)", name)
    return (match.group(1), match.group(2)) if match else None


def _check_member(member: tarfile.TarInfo, shard: Path) -> None:
    """The checks of kdreg's archive extraction: no absolute path, no ``..``, no link or special
    file (a shard is only ever read, but such a member means it is not what it claims)."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or member.name.startswith(("/", "\\")):
        raise DataError(f"refusing shard {shard}: member {member.name!r} has an absolute path or "
                        f"one with ..")
    if not (member.isfile() or member.isdir()) or member.issparse():
        raise DataError(f"refusing shard {shard}: member {member.name!r} is a link or special "
                        f"file; expected only regular files")


def _class_number(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: Path) -> int:
    source = tar.extractfile(member)
    assert source is not None  # a regular file always has data
    raw = source.read(64)
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = ""
    if member.size > 64 or not re.fullmatch(r"[0-9]+", text):
        raise DataError(f"shard {shard}: member {member.name!r} holds {raw[:20]!r}, not a class "
                        f"number (an integer >= 0 as text)")
    return int(text)


def index_shard(shard: Path) -> list[Sample]:
    """The samples of ``shard`` in the order of their first member: one pass over its headers
    (seeking past the data; the ``.cls`` members are read)."""
    compressed = _compression(shard)
    if compressed is not None:
        raise DataError(f"shard {shard} is compressed ({compressed}); {UNCOMPRESS}")
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                _check_member(member, shard)
                parts = split_name(member.name) if member.isfile() else None
                if parts is None:
                    continue
                key, ext = parts[0], parts[1].lower()
                members = groups.setdefault(key, {})
                if ext in members:
                    raise DataError(f"shard {shard}: member {member.name!r} repeats sample "
                                    f"{key!r}'s {members[ext].name!r}")
                members[ext] = member
                if ext == LABEL_EXTENSION:
                    labels[key] = _class_number(tar, member, shard)
    except (tarfile.TarError, EOFError) as exc:
        raise DataError(f"cannot read shard {shard} as a tar file: {exc}") from None
    samples = []
    for key, members in groups.items():
        images = [members[e] for e in IMAGE_EXTENSIONS if e in members]
        if not images:
            raise DataError(f"shard {shard}: sample {key!r} has no image (member {key}.jpg, "
                            f".jpeg, .png or .webp); it has {', '.join(m.name for m in members.values())}")
        if len(images) > 1:
            raise DataError(f"shard {shard}: sample {key!r} has two images, {images[0].name!r} and "
                            f"{images[1].name!r}; expected one")
        if key not in labels:
            raise DataError(f"shard {shard}: sample {key!r} has no class (member {key}.cls) for "
                            f"its image {images[0].name!r}")
        samples.append((images[0].name, images[0].offset_data, images[0].size, labels[key]))
    return samples


def index_paths(shard: Path) -> list[Path]:
    """Where the index of ``shard`` is kept: beside it, else in kdreg's cache folder."""
    where = hashlib.sha256(str(shard.parent.resolve()).encode()).hexdigest()[:12]
    return [shard.with_name(f".{shard.name}.kdreg-index.json"),
            cache_dir() / "wds-index" / f"{where}-{shard.name}.json"]


def _stamp(shard: Path) -> dict[str, Any]:
    st = shard.stat()
    return {"version": INDEX_VERSION, "shard": shard.name, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


def _read_index(path: Path, stamp: dict[str, Any]) -> list[Sample] | None:
    try:
        saved = json.loads(path.read_text())
        if saved["stamp"] != stamp:
            return None
        return [(str(m), int(o), int(s), int(c)) for m, o, s, c in saved["samples"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: indexed again


def _write_index(shard: Path, stamp: dict[str, Any], samples: list[Sample]) -> None:
    text = json.dumps({"stamp": stamp, "samples": samples}, separators=(",", ":"))
    for path in index_paths(shard):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)  # atomic: processes indexing at once leave one whole file
            return
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def shard_index(shard: Path) -> list[Sample]:
    """The index of ``shard``: its index file when that matches the shard's name, size and
    modification time, else :func:`index_shard` (and the file written)."""
    stamp = _stamp(shard)
    for path in index_paths(shard):
        samples = _read_index(path, stamp)
        if samples is not None:
            return samples
    samples = index_shard(shard)
    _write_index(shard, stamp, samples)
    return samples


# --------------------------------------------------------------------------------------------
# Reading


# --------------------------------------------------------------------------------------------
# The source


def read_classes(folder: Path) -> tuple[str, ...] | None:
    """The lines of ``folder/classes.txt`` (None when there is none)."""
    path = folder / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DataError(f"{path} names no classes; expected one class name per line")
    if "" in lines:
        raise DataError(f"{path} line {lines.index('') + 1} is empty; expected one class name "
                        f"per line")
    return tuple(lines)


def _source(folder: Path, mode: str, limit: int) -> ImageStream:
    """The stream of the shards in ``folder`` (statistics still ImageNet's)."""
    names = read_classes(folder)
    readers, found = {}, {}
    for split in ("train", "test"):
        shards = find_shards(folder, split)
        compressed = [(s, c) for s in shards if (c := _compression(s)) is not None]
        if compressed:  # every compressed shard of the split, one line each
            raise DataError([f"shard {s} is compressed ({c}); {UNCOMPRESS}" for s, c in compressed])
        indexes = [shard_index(s) for s in shards]
        if names is not None:
            for shard, index in zip(shards, indexes):
                for member, _, _, label in index:
                    if label >= len(names):
                        key = split_name(member)
                        raise DataError(f"shard {shard}: member "
                                        f"'{key[0] if key else member}.cls' holds class {label}, "
                                        f"beyond the {len(names)} classes of "
                                        f"{folder / CLASSES_FILE}")
        from .readers import ShardReader

        reader = ShardReader(shards, indexes, limit)
        if len(reader) == 0:
            raise DataError(f"the {split} shards of {folder} ({shards[0].name}, ...) hold no "
                            f"samples")
        readers[split] = reader
        found[split] = (shards, set(np.unique(reader.labels).tolist()))
    classes = names or tuple(str(c) for c in range(1 + max(max(f[1]) for f in found.values())))
    (train_shards, train), (test_shards, test) = found["train"], found["test"]
    if train != test:
        def listed(labels: set[int]) -> str:
            return ", ".join(classes[c] for c in sorted(labels)) or "-"
        raise DataError(f"the train shards ({train_shards[0]}, ...) and the test shards "
                        f"({test_shards[0]}, ...) must hold the same classes; only in train: "
                        f"{listed(train - test)}; only in test: {listed(test - train)}")
    return ImageStream(train=readers["train"], test=readers["test"], classes=classes,
                       train_labels=readers["train"].labels, test_labels=readers["test"].labels,
                       in_chans=MODES[mode])
