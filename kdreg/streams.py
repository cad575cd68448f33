"""The random streams of a run, each derived from the run's seed and what it is for.

Every stream is ``stream_seed(seed, purpose, stage, ...)``: a hash of the whole key, so two
different keys give unrelated streams. No stream of seed ``s`` is a shifted stream of seed
``s + 1`` (as ``seed + epoch`` or ``seed + index`` would make it), and the streams of the
initialisation, of the training step and of the batches are apart from one another:

- ``init_seed(seed, stage)``: the global RNGs (torch, numpy, random) before stage ``stage``
  (its index in the recipe) is built: its initial weights;
- ``train_seed(seed, stage)``: the global RNGs before the stage trains (dropout and the like);
- ``batch_seed(seed, stage)``: the base seed of the stage's training batch loader, whose epoch
  ``e`` draws its permutation and augmentation from ``stream_seed(batch_seed(seed, stage), e)``:
  the crops and flips of the in-memory path, or on the streamed path every image's own
  augmentation seed (and each batch's mixup from ``stream_seed(batch_seed, e, "batch", step)``).
"""

from __future__ import annotations

import hashlib

_MASK = 2**63 - 1   # a non-negative int every RNG accepts as its seed


def stream_seed(seed: int, *keys: int | str) -> int:
    """A seed in ``[0, 2**63)`` for the stream named by ``(seed, *keys)``; the same key gives the
    same seed on every machine and Python version."""
    parts = [seed, *keys]
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, int | str):
            raise TypeError(f"stream keys are ints or strings, got {part!r}")
    text = repr(tuple(int(p) if isinstance(p, int) else str(p) for p in parts))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK


def init_seed(seed: int, stage: int) -> int:
    """The global RNGs' seed before stage number ``stage`` is built (its initial weights)."""
    return stream_seed(seed, "init", stage)


def train_seed(seed: int, stage: int) -> int:
    """The global RNGs' seed before stage number ``stage`` trains (dropout and the like)."""
    return stream_seed(seed, "train", stage)


def batch_seed(seed: int, stage: int) -> int:
    """The base seed of stage number ``stage``'s training batches (a :class:`kdreg.data.BatchLoader`'s
    or :class:`kdreg.data.StreamLoader`'s ``seed``; epoch ``e`` draws from
    ``stream_seed(batch_seed(seed, stage), e)``)."""
    return stream_seed(seed, "batches", stage)
