"""The data layer, one idea per module:

- :mod:`kdreg.data.sources`: what a data source returns (:class:`ImageData`) and its checks;
- :mod:`kdreg.data.splits`: the validation hold-out and the limited subsets (:func:`prepare_splits`);
- :mod:`kdreg.data.loading`: a recipe's data through the dataset registry (:func:`load_data`);
- :mod:`kdreg.data.batches`: the in-memory path, batches augmented on the device (:class:`BatchLoader`).

No concrete data set lives here (see ``kdreg_plugins.datasets``).
"""

from kdreg.data.batches import BatchLoader
from kdreg.data.loading import load_data, read_data
from kdreg.data.sources import CACHE_ENV, ImageData, cache_dir, channel_stats, check_image_data
from kdreg.data.splits import Splits, TensorSet, prepare_splits

__all__ = [
    "CACHE_ENV",
    "BatchLoader",
    "ImageData",
    "Splits",
    "TensorSet",
    "cache_dir",
    "channel_stats",
    "check_image_data",
    "load_data",
    "prepare_splits",
    "read_data",
]
