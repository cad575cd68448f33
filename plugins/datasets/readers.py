"""The timm dataset readers of the streamed sources: files listed in a folder
(:class:`FileReader`) and samples in tar shards (:class:`ShardReader`). Their own module, imported
when a stream is made, so that a process that streams nothing never imports timm's data package
(and torchvision with it)."""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
from timm.data.readers.reader import Reader

from kdreg.errors import DataError

from .folder import MAX_IMAGE_PIXELS, Entry, open_checked

if TYPE_CHECKING:
    from .wds import Sample


class FileReader(Reader):
    """timm's dataset reader interface over a list of ``(file, label)``: ``reader[i]`` is the
    image opened lazily (a PIL image whose header is read, so that the transform may decode a JPEG
    at a reduced scale) and its label; a file of more than ``max_pixels`` pixels is refused before
    it is decoded."""

    def __init__(self, root: Path, entries: list[Entry], max_pixels: int = MAX_IMAGE_PIXELS):
        super().__init__()
        self.root = root
        self.samples = [(rel, label) for rel, label, *_ in entries]
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        rel, label = self.samples[index]
        return open_checked(self.root / rel, self.max_pixels), label  # opened lazily, once

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        rel = self.samples[index][0]
        if basename:
            return Path(rel).name
        return str(self.root / rel) if absolute else rel


class ShardReader(Reader):
    """timm's dataset reader interface over the samples of a list of shards: ``reader[i]`` is
    sample ``i``'s image (read by seeking into its shard, opened lazily with its header checked
    against the pixel limit) and its class; ``filename(i)`` is ``<shard>:<member>``."""

    def __init__(self, shards: list[Path], indexes: list[list[Sample]],
                 max_pixels: int = MAX_IMAGE_PIXELS):
        super().__init__()
        self.shards = [str(s) for s in shards]
        self.max_pixels = max_pixels
        # arrays rather than a list of tuples: no per-sample objects for the workers to copy
        self.shard_of = np.concatenate([np.full(len(ix), k, dtype=np.int32)
                                        for k, ix in enumerate(indexes)])
        flat = [s for ix in indexes for s in ix]
        self.members = np.array([s[0].encode() for s in flat], dtype=np.bytes_)
        self.offsets = np.array([s[1] for s in flat], dtype=np.int64)
        self.sizes = np.array([s[2] for s in flat], dtype=np.int64)
        self.labels = np.array([s[3] for s in flat], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> bytes:
        """The bytes of sample ``index``'s image."""
        size = int(self.sizes[index])
        with open(self.shards[self.shard_of[index]], "rb") as f:
            f.seek(int(self.offsets[index]))
            data = f.read(size)
        if len(data) != size:
            raise DataError(f"cannot read image {self._filename(index)}: the shard ends after "
                            f"{len(data)} of its {size} bytes (changed since it was indexed?)")
        return data

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = open_checked(io.BytesIO(self.read(index)), self.max_pixels, self._filename(index))
        return image, int(self.labels[index])

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        member = self.members[index].decode()
        if basename:
            return PurePosixPath(member).name
        return f"{self.shards[self.shard_of[index]]}:{member}"
