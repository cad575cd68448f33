"""Whether a factory may fetch files over the network now.

``kdreg validate`` never downloads: it assembles the recipe's stages inside :func:`no_downloads`,
as it reads the data with ``download = false``. A backbone factory that would fetch weights (the
timm adapter's pretrained weights) asks :func:`downloads_allowed` first and, when it may not,
checks only what it can without the network (the model name and tag, whether the weights exist
and, offline, whether they are in the local cache) and builds the model without them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_ALLOWED: ContextVar[bool] = ContextVar("kdreg_downloads_allowed", default=True)
_FROM_CHECKPOINTS: ContextVar[bool] = ContextVar("kdreg_weights_from_checkpoints", default=False)


def downloads_allowed() -> bool:
    """False inside :func:`no_downloads` (``kdreg validate``), True otherwise."""
    return _ALLOWED.get()


def weights_from_checkpoints() -> bool:
    """True inside ``no_downloads(from_checkpoints=True)``: the models built there receive their
    weights from a run's checkpoints next (``kdreg eval``, ``kdreg export``), so a factory loads
    and checks no weights of its own (pretrained or a file), only builds the network."""
    return _FROM_CHECKPOINTS.get()


@contextmanager
def no_downloads(from_checkpoints: bool = False) -> Iterator[None]:
    """Within the block, :func:`downloads_allowed` is False (and, with ``from_checkpoints``,
    :func:`weights_from_checkpoints` True)."""
    token = _ALLOWED.set(False)
    checkpoints = _FROM_CHECKPOINTS.set(bool(from_checkpoints))
    try:
        yield
    finally:
        _FROM_CHECKPOINTS.reset(checkpoints)
        _ALLOWED.reset(token)
