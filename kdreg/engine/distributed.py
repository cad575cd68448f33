"""Data-parallel context under ``torchrun``: which process this is, and what only one may do.

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them a run is one process
(rank 0 of 1). Rank 0 alone writes files, prints and fires run events (:func:`is_main`).
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch
from torch import Tensor, nn

from kdreg.errors import UserError

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


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (once; gloo on the CPU, NCCL on CUDA) and return this
    process's device: ``cuda:LOCAL_RANK`` on CUDA. Without torchrun, ``device`` as it is."""
    if world_size() <= 1:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        if device.index is not None and device.index != local_rank():
            raise UserError(f"under torchrun each process uses cuda:LOCAL_RANK; set device = 'cuda' "
                            f"or 'auto', not {str(device)!r} @ recipe.train.device")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the processes, in place (nothing to do in one process)."""
    if active():
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def average_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the processes, so
    every rank evaluates and saves the same model."""
    if not active():
        return
    import torch.distributed as dist

    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if buffers:
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.all_reduce(flat)
        flat /= world_size()
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


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


def shutdown() -> None:
    """Leave the process group cleanly (every process waits for the others first)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
