"""Checkpoints: the model, the optimizer and everything needed to resume a stage exactly.

Every checkpoint kdreg reads is read **weights-only**: PyTorch's restricted unpickler accepts
tensors, numbers, strings, lists, tuples and dicts and refuses anything else, so a file can never
run code when it is read. kdreg's own checkpoints hold nothing else (the RNG states are stored as
tensors and plain numbers). A plain state dict may also be a ``.safetensors`` file. A file that is
not weights-only is refused with a :class:`CheckpointError` naming what it would have imported,
unless the user opted in with ``--trust-checkpoints`` (:func:`trust_checkpoints`), which reads it
with Python's full unpickler: that can run any code the file holds.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import random
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdreg.errors import CheckpointError, CheckpointWriteError

FORMAT = "kdreg-checkpoint-1"
SAFETENSORS_SUFFIX = ".safetensors"
TRUST_FLAG = "--trust-checkpoints"

_trusted = False


def trust_checkpoints(trusted: bool = True) -> None:
    """Read checkpoints that are not weights-only with Python's full unpickler (``--trust-checkpoints``).

    Only for files one trusts: unpickling can run any code the file holds. Checkpoints written by
    earlier kdreg versions (numpy arrays in their RNG state) need it.
    """
    global _trusted
    _trusted = bool(trusted)


# --------------------------------------------------------------------------------------------
# RNG state, in types the weights-only unpickler accepts


def rng_state() -> dict[str, Any]:
    """The torch, Python and numpy RNG states as tensors, numbers and strings."""
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (or the tuples an earlier kdreg stored)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    else:
        random.setstate(py)
    npy = state["numpy"]
    if isinstance(npy, dict):
        np.random.set_state((npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"],
                             npy["has_gauss"], npy["cached_gaussian"]))
    else:
        np.random.set_state(npy)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Writing and reading


def save(path: Path, **content: Any) -> None:
    """Write atomically: the whole file beside its target, flushed to the disk, then renamed over
    it, so that a crash never leaves a half-written checkpoint behind. A failed write (a full disk,
    a file-size limit) removes the partial file, leaves the previous checkpoint as it was and
    raises :class:`CheckpointWriteError`."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **content}, buffer)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise CheckpointWriteError(f"cannot write the checkpoint {path} ({buffer.tell():,} bytes): "
                                   f"{exc.strerror or exc}; {kept}") from None


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint's content, read weights-only (or a ``.safetensors`` state dict).

    A file that is not weights-only raises :class:`CheckpointError` naming the globals it would
    import; with :func:`trust_checkpoints` on it is read in full instead, with a warning.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _load_safetensors(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4 ..."
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        data = _load_untrusted(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's problem
        raise CheckpointError(f"checkpoint {path} is not readable: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, not a state dict")
    return data


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}") from None


def _load_untrusted(path: Path) -> Any:
    """A file the weights-only unpickler refused: an error, or (trusted) the full unpickler."""
    found = unsafe_globals(path)
    what = (f"it would import {', '.join(found)} when read" if found else
            "it holds objects other than tensors, numbers, strings, lists, tuples and dicts")
    if not _trusted:
        raise CheckpointError(
            f"checkpoint {path} is not weights-only: {what}; kdreg never runs code from a "
            f"checkpoint (pass {TRUST_FLAG} only if you trust the file: it lets the file run any "
            f"code)") from None
    print(f"warning: {TRUST_FLAG}: reading {path} with Python's full unpickler ({what}); "
          f"it can run any code the file holds", file=sys.stderr)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as full:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} is not readable: {type(full).__name__}: {full}") from None


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals (``module.name``) a pickle or torch checkpoint would import that PyTorch's
    weights-only unpickler does not allow; found by reading its opcodes, never by unpickling."""
    try:
        allowed = set(torch.serialization.get_safe_globals_names()) if hasattr(
            torch.serialization, "get_safe_globals_names") else set()
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed |= set(_get_allowed_globals())
    except (ImportError, AttributeError):
        allowed = set()
    found: list[str] = []
    for blob in _pickles(Path(path)):
        for name in _globals(blob):
            if name not in allowed and not name.startswith("torch.") and name not in found:
                found.append(name)
    return found


def _pickles(path: Path) -> Iterator[bytes]:
    """The pickle streams of a file: each ``*.pkl`` of a torch zip archive, or the file itself."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    if name.endswith(".pkl"):
                        yield zf.read(name)
            return
        yield path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


def _globals(blob: bytes) -> list[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL / INST opcode of one pickle stream."""
    names: list[str] = []
    strings: list[str] = []          # the most recent string pushes (for STACK_GLOBAL)
    memo: dict[int, str] = {}
    last: str | None = None
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(blob)):
            kind = op.name
            if kind in _STRING_OPS:
                last = arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
                strings.append(last)
                continue
            if kind == "MEMOIZE" and last is not None:
                memo[len(memo)] = last
            elif kind in _PUT_OPS and last is not None:
                memo[int(str(arg))] = last
            elif kind in _GET_OPS and int(str(arg)) in memo:
                last = memo[int(str(arg))]
                strings.append(last)
                continue
            elif kind in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif kind == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            if kind not in ("MEMOIZE", *_PUT_OPS, "FRAME"):
                last = None
    except (ValueError, EOFError, pickle.UnpicklingError):
        pass  # a damaged stream: report what was found before the damage
    return names


def model_state(data: dict[str, Any]) -> dict[str, Any]:
    """The model weights of a kdreg checkpoint, or of a plain ``state_dict`` file."""
    return data["model"] if data.get("format") == FORMAT else data


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load the model weights of ``path`` into ``model``; a mismatch names the keys."""
    state = model_state(load(path))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"checkpoint {path} lacks {len(missing)} weight(s) of the model, e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"checkpoint {path} has {len(unexpected)} weight(s) the model lacks, e.g. {', '.join(unexpected[:3])}")
    if shapes:
        problems.append(f"checkpoint {path} has weights of other shapes (checkpoint vs model): {'; '.join(shapes[:3])}")
    if problems:
        raise CheckpointError(problems)
    model.load_state_dict(state)
