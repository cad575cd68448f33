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


def downloads_allowed() -> bool:
    """False inside :func:`no_downloads` (``kdreg validate``), True otherwise."""
    return _ALLOWED.get()


@contextmanager
def no_downloads() -> Iterator[None]:
    """Within the block, :func:`downloads_allowed` is False."""
    token = _ALLOWED.set(False)
    try:
        yield
    finally:
        _ALLOWED.reset(token)
