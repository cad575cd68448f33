"""``hfds``: a Hugging Face dataset saved on disk, streamed through timm's dataset reader.

``root`` is a folder that ``datasets.load_dataset`` reads (one written by ``save_to_disk``, or
parquet/arrow files with a ``train`` and a ``test`` split); timm's ``ReaderHfds``
(``timm.data.readers.create_reader("hfds/<root>")``) reads its encoded images one at a time, so
the images may have any size and are never decoded whole. Needs the ``datasets`` package:
``pip install "kdreg[hf]"``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from kdreg.data.sources import ImageStream
from kdreg.errors import DataError


def hfds(*, root: Path, train_split: str = "train", test_split: str = "test",
         image_key: str = "image", label_key: str = "label") -> ImageStream:
    """A Hugging Face dataset saved on disk at root (save_to_disk, parquet or arrow files), read
    through timm's reader; needs pip install "kdreg[hf]"."""
    if importlib.util.find_spec("datasets") is None:
        raise DataError('the hfds data source needs the datasets package: pip install "kdreg[hf]"')
    from timm.data.readers import create_reader

    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DataError(f"expected a Hugging Face dataset saved on disk (save_to_disk, or parquet "
                        f"or arrow files) at {folder}; it does not exist")
    readers: dict[str, Any] = {}
    for split in (train_split, test_split):
        try:
            readers[split] = create_reader(f"hfds/{folder}", root=None, split=split,
                                           input_key=image_key, target_key=label_key)
        except Exception as exc:  # noqa: BLE001 - the datasets library's reasons, as one line
            why = str(exc).strip().splitlines()
            raise DataError(f"cannot read split {split!r} of the Hugging Face dataset at {folder}: "
                            f"{type(exc).__name__}: {why[0] if why else ''}") from None
    train, test = readers[train_split], readers[test_split]
    names = sorted(train.class_to_idx, key=train.class_to_idx.get)
    if names != sorted(test.class_to_idx, key=test.class_to_idx.get):
        raise DataError(f"splits {train_split!r} and {test_split!r} of {folder} name other classes")
    return ImageStream(train=train, test=test, classes=names,
                       train_labels=list(train.iter_targets()), test_labels=list(test.iter_targets()))
