"""``kdreg run --nproc N``: the same command started by torchrun on N local processes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from kdreg.engine import distributed
from kdreg.errors import UserError

#: torchrun's own logger: its per-failure log lines repeat what the processes said.
AGENT_LOGGER = "torch.distributed.elastic"


def torchrun_command(nproc: int, kdreg_args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m kdreg ARGS``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "kdreg", *kdreg_args]


def launch(nproc: int, kdreg_args: Sequence[str]) -> int:
    """Run ``kdreg ARGS`` under torchrun with ``nproc`` processes on this machine; its exit code:
    2 when a process stopped on bad input (it printed its ``error:`` line), 1 for another failure.

    torchrun runs in this process (``torch.distributed.run.run``, what ``torchrun`` itself calls),
    so that a failed process is reported by its own lines, not by torchrun's traceback (which
    ``--debug`` keeps)."""
    if nproc < 1:
        raise UserError(f"--nproc takes a number of processes >= 1, got {nproc} @ --nproc")
    if distributed.world_size() > 1:
        raise UserError("--nproc is for starting torchrun; this process runs under torchrun already @ --nproc")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_command(nproc, kdreg_args)[3:])
    debug = "--debug" in kdreg_args
    if not debug:
        logging.getLogger(AGENT_LOGGER).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        if debug:
            raise
        codes = {failure.exitcode for failure in exc.failures.values()}
        return 2 if 2 in codes else 1
    return 0
