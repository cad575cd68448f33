"""Data-parallel set-up under ``torchrun``: joining the process group, averaging buffers, leaving.

The process facts (rank, world size, :func:`is_main`) and the collectives plugins use live in
:mod:`kdreg.process`; they are imported here so the engine reads both from one name.
"""

from __future__ import annotations

import torch
from torch import nn

from kdreg.errors import UserError
from kdreg.process import (  # noqa: F401 - the engine's one name for process facts
    active,
    all_gather,
    all_reduce_sum,
    barrier,
    broadcast,
    is_main,
    local_rank,
    rank,
    world_size,
)


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


def shutdown() -> None:
    """Leave the process group cleanly (every process waits for the others first)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
