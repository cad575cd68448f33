"""Stopping on a signal, checkpointed: what a cluster's preemption and time limits need.

``kdreg run`` handles the signals of ``--checkpoint-signals`` (default ``SIGTERM`` and ``SIGUSR1``): the
handler only records the request (:func:`requested`). The trainer reads it at its next step
boundary; under torchrun every process gives its own view and all agree (:func:`agree`, a max
over the processes on a gloo group, never inside the handler), so that all save the step checkpoint
together and stop with :class:`kdreg.errors.Checkpointed` (exit code 75). A second ``SIGTERM``
while a request is pending, or ``SIGINT`` at any time, ends the process at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from types import FrameType

import torch

from kdreg.engine import distributed
from kdreg.errors import Checkpointed, UserError

#: signals that cannot stand for "checkpoint and stop": uncatchable, or kept for "stop now"
_REFUSED = {"SIGKILL", "SIGSTOP", "SIGINT"}

_requested: str | None = None
_handling = False


def parse_signals(text: str | Sequence[str]) -> tuple[signal.Signals, ...]:
    """``"TERM,USR1"`` (or ``SIGTERM``, any case) as signals; :class:`UserError` naming a bad one."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    found, problems = [], []
    for name in names:
        full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        sig = getattr(signal.Signals, full, None) if full in signal.Signals.__members__ else None
        if sig is None:
            problems.append(f"{name!r} is no signal of this system (e.g. TERM, USR1, USR2, HUP) @ --checkpoint-signals")
        elif full in _REFUSED:
            problems.append(f"{full} cannot request a checkpoint ({'it ends the run at once' if full == 'SIGINT' else 'it cannot be caught'}) @ --checkpoint-signals")
        elif sig not in found:
            found.append(sig)
    if problems:
        raise UserError(problems)
    return tuple(found)


def requested() -> str | None:
    """The name of the signal that asked this process to checkpoint and stop (None: none did)."""
    return _requested


def stopped(where: str) -> Checkpointed:
    """The :class:`Checkpointed` that ends a run checkpointed ``where`` (a stage, epoch and step),
    naming the signal."""
    return Checkpointed(f"{where}, on {_requested or 'a signal to another process'}")


def _handle(signum: int, frame: FrameType | None) -> None:
    global _requested
    if _requested is not None and signum == signal.SIGTERM:   # the second SIGTERM: at once
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _requested is None:
        _requested = signal.Signals(signum).name


@contextlib.contextmanager
def handling(signals: Sequence[signal.Signals]) -> Iterator[None]:
    """Record ``signals`` as a request to checkpoint and stop while the block runs; the handlers
    before it are restored after it."""
    global _requested, _handling
    previous = {sig: signal.signal(sig, _handle) for sig in signals}
    _requested, _handling = None, bool(signals)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _requested, _handling = None, False


def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag true on every process when it is true on any (one process: as given)."""
    if not distributed.active():
        return tuple(bool(f) for f in flags)
    votes = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
    distributed.all_reduce_max_cpu(votes)
    return tuple(bool(v) for v in votes.tolist())


def stop_agreed() -> bool:
    """Whether a signal asked any process to stop (every process calls it at the same point)."""
    if not _handling:
        return False
    return agree(_requested is not None)[0]


class CheckpointClock:
    """When a stage writes its mid-epoch checkpoint (``train.checkpoint_every``: every ``steps``
    steps, or every ``seconds``) and whether it stops there (a signal): the same answer on every
    process."""

    def __init__(self, steps: int = 0, seconds: float = 0.0):
        self.steps, self.seconds = int(steps), float(seconds)
        self.last = time.monotonic()

    def saved(self) -> None:
        """A checkpoint was written now (the timed interval starts again)."""
        self.last = time.monotonic()

    def after_step(self, done: int, steps: int) -> tuple[bool, bool]:
        """``(save, stop)`` after ``done`` of the epoch's ``steps`` steps: save the mid-epoch
        checkpoint now, and stop after it (a signal). The epoch's last step saves nothing here
        (the epoch's own checkpoint follows): a signal then stops after that one."""
        counted = self.steps > 0 and done % self.steps == 0
        if _handling or self.seconds > 0:
            stop, timed = agree(_requested is not None,
                                self.seconds > 0 and time.monotonic() - self.last >= self.seconds)
        else:
            stop, timed = False, False
        if done >= steps:
            return False, False
        return counted or timed or stop, stop
