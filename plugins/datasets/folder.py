"""Image folders (``train/<class>/*``, ``test/<class>/*``), archives of them, and the decode cache.

A folder is decoded once into uint8 tensors; the result is stored in a cache file next to the data
(or under ``$KDREG_CACHE/decoded`` when the folder is read-only), keyed by the file list, sizes and
modification times, so later loads only read that file. An archive (``.tar``, ``.tar.gz``, ...)
is extracted once, safely, into a cache folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from kdreg.data.sources import ImageData, cache_dir, channel_stats
from kdreg.errors import DataError, OptionError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")
SPLITS = ("train", "test")
MODES = {"RGB": 3, "L": 1}
CACHE_VERSION = 1
EXTRACTED_MARKER = ".kdreg-extracted"
LAYOUT = "train/<class>/*.jpg and test/<class>/*.jpg"
#: PIL's own default limit on the pixels of one image (decompression bombs).
MAX_IMAGE_PIXELS = 89_478_485


def load_image_folder(root: Path, *, mode: str = "RGB", use_cache: bool = True,
                      max_image_pixels: int = MAX_IMAGE_PIXELS) -> ImageData:
    """The images under ``root`` (a folder, or an archive of one), decoded or from the cache.

    An image of more than ``max_image_pixels`` pixels is refused before it is decoded.
    """
    if mode not in MODES:
        raise OptionError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", key="mode")
    folder = resolve_root(Path(root).expanduser())
    files, classes = scan(folder)
    key = cache_key(folder, files, mode)
    if use_cache:
        cached = _read_cache(folder, key, mode)
        if cached is not None:
            return cached
    data = decode(folder, files, classes, mode, max_image_pixels)
    if use_cache:
        _write_cache(folder, key, mode, data)
    return data


# --------------------------------------------------------------------------------------------
# Where the folder is


def archive_stem(path: Path) -> str | None:
    """``cifar10-jpeg`` for ``cifar10-jpeg.tar.gz``; None if ``path`` is not an archive name."""
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def resolve_root(root: Path) -> Path:
    """The folder holding ``train/`` and ``test/``: ``root`` itself or its extracted archive."""
    if not root.exists():
        raise DataError(f"expected an image folder ({LAYOUT}) or a .tar/.tar.gz archive of one "
                        f"at {root}; it does not exist")
    if root.is_file():
        if archive_stem(root) is None:
            raise DataError(f"expected an image folder ({LAYOUT}) or a .tar/.tar.gz archive at "
                            f"{root}; it is some other file")
        root = extract_archive(root, cache_dir() / "data")
    return _layout_root(root)


def _layout_root(folder: Path) -> Path:
    """``folder``, or its only sub-folder when the train/ and test/ folders sit one level down."""
    if any((folder / s).is_dir() for s in (*SPLITS, "val")):
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and any((subdirs[0] / s).is_dir() for s in (*SPLITS, "val")):
        return subdirs[0]
    return folder


def _archive_stamp(archive: Path) -> str:
    st = archive.stat()
    return f"{archive.name}\t{st.st_size}\t{st.st_mtime_ns}\n"


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or member.name.startswith(("/", "\\")):
        raise DataError(f"refusing to extract {archive}: member {member.name!r} points outside "
                        f"the target folder")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"refusing to extract {archive}: member {member.name!r} is a link or "
                        f"special file; expected only folders and image files")


def _extract_members(archive: Path, target: Path) -> None:
    """Write the folders and regular files of ``archive`` under the fresh folder ``target``.

    Members are checked first (:func:`_check_member`), so every path stays inside ``target``;
    permissions are not taken from the archive, modification times are.
    """
    made = {str(target)}
    with tarfile.open(archive, "r|*") as tar:  # one streaming pass
        for member in tar:
            _check_member(member, archive)
            path = os.path.join(target, *PurePosixPath(member.name).parts)
            folder = path if member.isdir() else os.path.dirname(path)
            if folder not in made:
                os.makedirs(folder, exist_ok=True)
                made.add(folder)
            if member.isfile():
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has data
                with open(path, "wb") as out:
                    shutil.copyfileobj(source, out)
                os.utime(path, (member.mtime, member.mtime))


def extract_archive(archive: Path, parent: Path) -> Path:
    """Extract ``archive`` once into ``parent/<archive stem>`` and return that folder.

    A folder extracted earlier from the same archive (same name, size and mtime) is reused; one
    from a different version of it is replaced. Members that are links, special files, absolute
    paths or paths with ``..`` are refused.
    """
    stem = archive_stem(archive)
    if stem is None:
        raise DataError(f"expected a .tar or .tar.gz archive, got {archive}")
    dest = parent / stem
    marker = dest / EXTRACTED_MARKER
    stamp = _archive_stamp(archive)
    if marker.is_file():
        if marker.read_text() == stamp:
            return dest
        shutil.rmtree(dest)  # extracted by kdreg from another version of the archive
    elif dest.exists():
        raise DataError(f"{dest} exists but was not extracted by kdreg from {archive}; remove it "
                        f"or set data.root to it")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=parent))
    except OSError as exc:
        raise DataError(f"cannot extract {archive} into {parent}: {exc.strerror or exc}") from None
    try:
        try:
            _extract_members(archive, tmp)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"cannot extract {archive}: {exc}") from None
        (tmp / EXTRACTED_MARKER).write_text(stamp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (marker.is_file() and marker.read_text() == stamp):  # not a concurrent twin
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------
# What the folder holds


Entry = tuple[str, int, int, int]  # (path relative to the folder, label, size, mtime in ns)


def _image_files(folder: Path, prefix: str, label: int) -> list[Entry]:
    """Image files under ``folder`` (recursively, sorted), named ``prefix/<relative path>``."""
    found = []
    with os.scandir(folder) as it:
        for entry in sorted(it, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            rel = f"{prefix}/{entry.name}"
            if entry.is_dir():
                found += _image_files(Path(entry.path), rel, label)
            elif entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file():
                st = entry.stat()
                found.append((rel, label, st.st_size, st.st_mtime_ns))
    return found


def split_folder(folder: Path, split: str) -> str:
    """The folder name of ``split`` under ``folder``: ``train``; ``test``, or ``val`` when there is
    a ``val/`` and no ``test/`` (ImageNet's layout)."""
    if split == "test" and not (folder / "test").is_dir() and (folder / "val").is_dir():
        return "val"
    return split


def scan(folder: Path) -> tuple[dict[str, list[Entry]], tuple[str, ...]]:
    """``({split: [(relative path, label), ...]}, classes)``; DataError for a malformed layout."""
    files: dict[str, list[Entry]] = {}
    class_lists: dict[str, list[str]] = {}
    for split in SPLITS:
        split_dir = folder / split_folder(folder, split)
        if not split_dir.is_dir():
            raise DataError(f"expected {split_dir}/<class>/*.jpg (one folder of {'/'.join(IMAGE_SUFFIXES)} "
                            f"images per class); {split_dir} is missing")
        classes = sorted(p.name for p in split_dir.iterdir()
                         if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"expected class folders in {split_dir} ({split_dir}/<class>/*.jpg); "
                            f"found none")
        entries = []
        for label, name in enumerate(classes):
            found = _image_files(split_dir / name, f"{split_dir.name}/{name}", label)
            if not found:
                raise DataError(f"expected image files ({', '.join(IMAGE_SUFFIXES)}) in "
                                f"{split_dir / name}; found none")
            entries += found
        files[split], class_lists[split] = entries, classes
    train, test = class_lists["train"], class_lists["test"]
    if train != test:
        only_train = sorted(set(train) - set(test)) or ["-"]
        only_test = sorted(set(test) - set(train)) or ["-"]
        test_dir = split_folder(folder, "test")
        raise DataError(f"{folder}/train and {folder}/{test_dir} must hold the same class folders; "
                        f"only in train: {', '.join(only_train)}; only in {test_dir}: "
                        f"{', '.join(only_test)}")
    return files, tuple(train)


def cache_key(folder: Path, files: dict[str, list[Entry]], mode: str) -> str:
    """A hash of the file list with sizes and modification times, and the decode settings."""
    digest = hashlib.sha256(f"kdreg-decoded v{CACHE_VERSION} {mode}\n".encode())
    for split in SPLITS:
        for rel, label, size, mtime in files[split]:
            digest.update(f"{rel}\t{label}\t{size}\t{mtime}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Decoding


def _torchvision_decoder(mode: str) -> Callable[[Path], Tensor] | None:
    """torchvision's decoder (about twice as fast as PIL for small JPEGs), if it still has one."""
    try:
        from torchvision.io import ImageReadMode, decode_image, read_file
    except ImportError:
        return None
    read_mode = ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY
    return lambda path: decode_image(read_file(str(path)), mode=read_mode)


def _pil_decode(path: Path, mode: str) -> Tensor:
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert(mode), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def open_checked(path: Path | IO[bytes], limit: int, name: str | None = None) -> Image.Image:
    """``path`` (a file, or a binary file object called ``name`` in messages) opened lazily (its
    header read, nothing decoded yet), refused if the header declares more than ``limit``
    pixels: a decompression bomb never reaches a decoder."""
    name = str(path) if name is None else name
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # this check replaces PIL's warning with an error of ours
    try:
        img = Image.open(path)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {name}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    width, height = img.size
    if width * height > limit:
        img.close()
        raise DataError(f"image {name} has {width}x{height} = {width * height:,} pixels, more than "
                        f"the limit of {limit:,} (a decompression bomb?); if it is genuine, raise "
                        f"data.options.max_image_pixels @ recipe.data.options.max_image_pixels")
    return img


def check_image_size(path: Path, limit: int) -> None:
    """Refuse ``path`` if its header declares more than ``limit`` pixels (see :func:`open_checked`)."""
    open_checked(path, limit).close()


def _decode_one(path: Path, mode: str, fast: Callable[[Path], Tensor] | None,
                max_pixels: int = MAX_IMAGE_PIXELS) -> Tensor:
    """One image as uint8 ``[C, H, W]`` in ``mode`` (RGB or L), at most ``max_pixels`` pixels."""
    check_image_size(path, max_pixels)
    if fast is not None:
        try:
            image = fast(path)
            if image.dtype == torch.uint8:
                return image
        except (RuntimeError, ValueError, OSError):
            pass  # PIL reads a few formats torchvision does not, and explains what is wrong
    return _pil_decode(path, mode)


def decode(folder: Path, files: dict[str, list[Entry]], classes: tuple[str, ...],
           mode: str = "RGB", max_image_pixels: int = MAX_IMAGE_PIXELS) -> ImageData:
    """Decode every image; all must have the same size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io's decoders
        return _decode_all(folder, files, classes, mode, max_image_pixels)


def _decode_all(folder: Path, files: dict[str, list[Entry]], classes: tuple[str, ...],
                mode: str, max_image_pixels: int) -> ImageData:
    fast = _torchvision_decoder(mode)
    first: tuple[str, tuple[int, ...]] | None = None
    tensors: dict[str, tuple[Tensor, Tensor]] = {}
    for split in SPLITS:
        entries = files[split]
        out: Tensor | None = None
        for i, (rel, *_) in enumerate(entries):
            image = _decode_one(folder / rel, mode, fast, max_image_pixels)
            if first is None:
                first = (rel, tuple(image.shape))
            if tuple(image.shape) != first[1]:
                raise DataError(f"image {folder / rel} is {_shape(image.shape)} (CxHxW) but "
                                f"{folder / first[0]} is {_shape(first[1])}; all images must "
                                f"have the same size")
            if out is None:
                out = torch.empty((len(entries), *first[1]), dtype=torch.uint8)
            out[i] = image
        assert out is not None  # scan() guarantees at least one image per split
        tensors[split] = (out, torch.tensor([e[1] for e in entries], dtype=torch.int64))
    mean, std = channel_stats(tensors["train"][0])
    return ImageData(train_images=tensors["train"][0], train_labels=tensors["train"][1],
                     test_images=tensors["test"][0], test_labels=tensors["test"][1],
                     classes=classes, mean=mean, std=std)


def _shape(shape: tuple[int, ...] | torch.Size) -> str:
    return "x".join(str(s) for s in shape)


# --------------------------------------------------------------------------------------------
# The decode cache


def cache_paths(folder: Path, key: str, mode: str) -> list[Path]:
    """Where the decoded tensors are stored: next to the data, else in kdreg's cache folder."""
    name = f".kdreg-decoded-{mode}-{key[:24]}.pt"
    where = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    return [folder / name, cache_dir() / "decoded" / f"{folder.name}-{where}{name}"]


def _read_cache(folder: Path, key: str, mode: str) -> ImageData | None:
    for path in cache_paths(folder, key, mode):
        if not path.is_file():
            continue
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if saved.get("key") != key:
                continue
            return ImageData(train_images=saved["train_images"],
                             train_labels=saved["train_labels"],
                             test_images=saved["test_images"], test_labels=saved["test_labels"],
                             classes=tuple(saved["classes"]), mean=saved["mean"],
                             std=saved["std"])
        except Exception:  # noqa: BLE001 - a damaged cache file is decoded again, not fatal
            continue
    return None


def _write_cache(folder: Path, key: str, mode: str, data: ImageData) -> Path | None:
    saved = {"key": key, "train_images": data.train_images, "train_labels": data.train_labels,
             "test_images": data.test_images, "test_labels": data.test_labels,
             "classes": list(data.classes), "mean": list(data.mean), "std": list(data.std)}
    for path in cache_paths(folder, key, mode):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(saved, tmp)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            continue
        prefix = path.name[: -len(f"{key[:24]}.pt")]
        for stale in path.parent.iterdir():  # caches of older versions of the folder
            if stale != path and stale.name.startswith(prefix) and stale.suffix == ".pt":
                with contextlib.suppress(OSError):
                    stale.unlink()
        return path
    return None
