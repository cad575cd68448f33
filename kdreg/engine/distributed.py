"""Data-parallel context under ``torchrun``: which process this is, and what only one may do.

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them a run is one process
(rank 0 of 1). Rank 0 alone writes files, prints and fires run events (:func:`is_main`).
"""

from __future__ import annotations

import os


def rank() -> int:
    """This process's global rank (0 without torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    """This process's rank on its node (0 without torchrun): its GPU index on CUDA."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def world_size() -> int:
    """How many processes train together (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    """Whether this process writes files, prints and fires run events (rank 0)."""
    return rank() == 0
