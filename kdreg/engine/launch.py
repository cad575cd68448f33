"""``kdreg run --nproc N``: the same command started by torchrun on N local processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from kdreg.engine import distributed
from kdreg.errors import UserError


def torchrun_command(nproc: int, kdreg_args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m kdreg ARGS``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "kdreg", *kdreg_args]


def launch(nproc: int, kdreg_args: Sequence[str]) -> int:
    """Run ``kdreg ARGS`` under torchrun with ``nproc`` processes on this machine; its exit code."""
    if nproc < 1:
        raise UserError(f"--nproc takes a number of processes >= 1, got {nproc} @ --nproc")
    if distributed.world_size() > 1:
        raise UserError("--nproc is for starting torchrun; this process runs under torchrun already @ --nproc")
    return subprocess.call(torchrun_command(nproc, kdreg_args))
