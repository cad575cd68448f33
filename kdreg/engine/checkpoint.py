"""Checkpoints: the model, the optimizer and everything needed to resume a stage exactly."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdreg.errors import CheckpointError

FORMAT = "kdreg-checkpoint-1"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, **content: Any) -> None:
    """Write atomically (a crash never leaves a half-written checkpoint behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT, **content}, tmp)
    os.replace(tmp, path)


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's problem
        raise CheckpointError(f"checkpoint {path} is not readable: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, not a state dict")
    return data


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
