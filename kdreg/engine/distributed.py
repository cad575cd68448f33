"""Data-parallel set-up under ``torchrun``: joining the process group, averaging buffers, leaving.

The process facts (rank, world size, :func:`is_main`) and the collectives plugins use live in
:mod:`kdreg.process`; they are imported here so the engine reads both from one name.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

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
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = restart_store()
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=rank(), world_size=world_size())
    return device


def restart_store() -> Any:
    """Under torchrun's agent store, a view of it whose keys belong to this restart alone
    (``TORCHELASTIC_RESTART_COUNT``); None otherwise (the environment's own rendezvous).

    The agent keeps one store across restarts: the keys the killed processes wrote (their gloo
    addresses) are still there, and a restarted process that reads one before its new peer writes
    it connects to a process that is gone. Prefixing the keys with the restart count leaves them
    behind."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    import torch.distributed as dist

    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(),
                          is_master=False)
    return dist.PrefixStore(f"/kdreg/restart_{os.environ['TORCHELASTIC_RESTART_COUNT']}", agent)


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


_cpu_group: Any = None


def all_reduce_max_cpu(tensor: Tensor) -> Tensor:
    """The element-wise max of a CPU ``tensor`` over the processes, in place, on a gloo group
    (the process group itself when it is gloo): a vote that never synchronises a device."""
    global _cpu_group
    if not active():
        return tensor
    import torch.distributed as dist

    if _cpu_group is None:   # made once, at the same call on every process
        _cpu_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_cpu_group)
    return tensor


def shutdown() -> None:
    """Leave the process group cleanly (every process waits for the others first)."""
    import torch.distributed as dist

    global _cpu_group
    _cpu_group = None
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
