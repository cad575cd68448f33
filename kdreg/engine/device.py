"""Device and precision selection: CUDA when present, CPU otherwise."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kdreg.errors import UserError


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} asked for, but CUDA is not available here @ recipe.train.device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"device {spec!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist @ recipe.train.device"
            )
    return device


def resolve_precision(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). ``auto``: bf16 on CUDA, fp32 on CPU. ``fp16``
    needs CUDA (it trains with a gradient scaler there); on the CPU it is an error."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if spec == "fp16" and device.type != "cuda":
        raise UserError(f"precision 'fp16' needs a CUDA device (this run is on {device}); use 'bf16' "
                        "or 'fp32' on the CPU @ recipe.train.precision")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec]


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """The gradient scaler fp16 training needs (None for fp32 and bf16)."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
