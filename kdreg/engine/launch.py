"""``kdreg run --nproc N``: the same command started by torchrun on N local processes."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from kdreg.engine import distributed
from kdreg.errors import EXIT_RESUME, UserError

#: torchrun's own logger: its per-failure log lines repeat what the processes said.
AGENT_LOGGER = "torch.distributed.elastic"


def torchrun_command(nproc: int, kdreg_args: Sequence[str], max_restarts: int = 0) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N [--max-restarts M] -m kdreg
    ARGS``."""
    restarts = [f"--max-restarts={max_restarts}"] if max_restarts else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *restarts, "-m", "kdreg", *kdreg_args]


def launch(nproc: int, kdreg_args: Sequence[str], *, max_restarts: int = 0,
           signals: Sequence[signal.Signals] = (), directory: str | None = None) -> int:
    """Run ``kdreg ARGS`` under torchrun with ``nproc`` processes on this machine; its exit code:
    2 when a process stopped on bad input (it printed its ``error:`` line), 75 when the processes
    checkpointed on a signal, 1 for another failure.

    torchrun runs in this process (``torch.distributed.run.run``, what ``torchrun`` itself calls),
    so that a failed process is reported by its own lines, not by torchrun's traceback (which
    ``--debug`` keeps). ``max_restarts``: when a process dies, torchrun restarts them all (each run
    resumes from the last checkpoint in ``directory``) up to that many times. ``signals`` reaching
    this process are passed on to the processes (torchrun passes ``SIGTERM`` itself), which
    checkpoint at their next step and exit with 75; the restarts are not used then."""
    if nproc < 1:
        raise UserError(f"--nproc takes a number of processes >= 1, got {nproc} @ --nproc")
    if distributed.world_size() > 1:
        raise UserError("--nproc is for starting torchrun; this process runs under torchrun already @ --nproc")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    command = torchrun_command(nproc, kdreg_args, max_restarts=max_restarts)
    parser = get_args_parser()
    parser.allow_abbrev = False    # kdreg's own options are never taken for abbreviations of torchrun's
    args = parser.parse_args(command[3:])
    debug = "--debug" in kdreg_args
    if not debug:   # its loggers set their own levels: each one is quietened
        for name in [AGENT_LOGGER, *logging.root.manager.loggerDict]:
            if name.startswith(AGENT_LOGGER):
                logging.getLogger(name).setLevel(logging.CRITICAL)

    def pass_on(signum: int, frame: object) -> None:
        # torchrun's agent stops its processes with the signal it is given (and waits for them):
        # the processes checkpoint on it, and no restart follows
        raise SignalException(f"process {os.getpid()} got signal {signum}", sigval=signal.Signals(signum))

    previous = {sig: signal.signal(sig, pass_on) for sig in signals if sig != signal.SIGTERM}
    where = f" in {directory}" if directory else ""
    try:
        run(args)
    except SignalException as exc:
        if debug:
            raise
        print(f"stopped by {exc.sigval.name}: the processes saved their checkpoint{where}; run the "
              f"same command again to resume (exit code {EXIT_RESUME})", file=sys.stderr)
        return EXIT_RESUME
    except ChildFailedError as exc:
        if debug:
            raise
        codes = {failure.exitcode for failure in exc.failures.values()}
        if codes == {EXIT_RESUME}:
            print(f"the processes checkpointed on a signal{where}; run the same command again to resume "
                  f"(exit code {EXIT_RESUME})", file=sys.stderr)
            return EXIT_RESUME
        for rank, failure in killed_processes(exc.failures):   # they said nothing themselves
            tries = f" after {max_restarts} restart(s)" if max_restarts else ""
            print(f"failed: process {rank} of {nproc} (pid {failure.pid}) was killed by "
                  f"{failure.signal_name()}{tries}; the last checkpoint is kept{where}: run the same "
                  "command again to resume", file=sys.stderr)
        return 2 if 2 in codes else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def killed_processes(failures: Mapping[int, Any]) -> list[tuple[int, Any]]:
    """The processes a signal killed, by rank, but those torchrun itself stopped with SIGTERM once
    another had failed (the failure is the other's, which says why); when every one died of
    SIGTERM, the first."""
    killed = [(r, f) for r, f in sorted(failures.items()) if f.exitcode < 0]
    own = [(r, f) for r, f in killed if f.exitcode != -signal.SIGTERM]
    if own or any(f.exitcode > 0 for f in failures.values()):
        return own
    return killed[:1]
