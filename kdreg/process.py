"""Process facts under ``torchrun``, for the engine and for plugins: which process this is, and the
few collectives a plugin may need (every process must call a collective, in the same order).

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them a run is one process (rank
0 of 1), and every function here is then a no-op that returns its input. Rank 0 alone writes
files, prints and fires run events (:func:`is_main`): a plugin that writes a file or downloads a
data set does it on rank 0, then :func:`barrier` (or :func:`broadcast` what it found) so that the
others read it. This module is part of the plugin contract; ``kdreg.engine`` is not.
"""

from __future__ import annotations

import os
from typing import TypeVar

from torch import Tensor

T = TypeVar("T")


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


def active() -> bool:
    """Whether a process group of more than one process is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every process (e.g. until rank 0 has written a checkpoint the others read)."""
    if active():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's ``value`` (a picklable object) on every process."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value: T) -> list[T]:
    """Every process's ``value`` (a picklable object), in rank order."""
    if not active():
        return [value]
    import torch.distributed as dist

    out: list[T] = [value] * world_size()
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the processes, in place (nothing to do in one process)."""
    if active():
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor
