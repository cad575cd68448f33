"""The data layer, one idea per module:

- :mod:`kdreg.data.sources`: what a data source returns, decoded images (:class:`ImageData`) or a
  stream of encoded ones (:class:`ImageStream`), and their checks;
- :mod:`kdreg.data.splits`: the validation hold-out and the limited subsets (:func:`prepare_splits`);
- :mod:`kdreg.data.loading`: a recipe's data section through the dataset registry, the path it
  takes (in memory or streamed) and a set's batches on it (:func:`load_data`, :func:`batches`);
- :mod:`kdreg.data.batches`: the in-memory path, batches augmented on the device (:class:`BatchLoader`);
- :mod:`kdreg.data.streaming`: the streamed path, a DataLoader with worker processes, sharded by
  rank (:class:`StreamLoader`);
- :mod:`kdreg.data.transforms`: the streamed path's transforms, from timm's.

No concrete data set lives here (see ``kdreg_plugins.datasets``).
"""

from kdreg.data.batches import BatchLoader
from kdreg.data.loading import batches, load_data, read_data
from kdreg.data.sources import (
    CACHE_ENV,
    ImageData,
    ImageStream,
    cache_dir,
    channel_stats,
    check_image_data,
    check_source,
    check_stream,
)
from kdreg.data.splits import Splits, TensorSet, prepare_splits
from kdreg.data.streaming import StreamLoader, StreamSet

__all__ = [
    "CACHE_ENV",
    "BatchLoader",
    "ImageData",
    "ImageStream",
    "Splits",
    "StreamLoader",
    "StreamSet",
    "TensorSet",
    "batches",
    "cache_dir",
    "channel_stats",
    "check_image_data",
    "check_source",
    "check_stream",
    "load_data",
    "prepare_splits",
    "read_data",
]
