"""Shared test helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("KDREG_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "kdreg"))

SMOKE = """
name = "smoke"
seed = 0
[data]
dataset = "synthetic"
batch_size = 32
val_split = 64
options = {{ train_size = 320, test_size = 64, num_classes = 4, image_size = 16 }}
[train]
epochs = {epochs}
optimizer = {{ lr = 0.05 }}
schedule = {{ name = "cosine" }}
log_interval = 2
[[stages]]
name = "student"
backbone = {{ name = "{backbone}" }}
graph = {{ name = "{graph}" }}
lam = 0.8
tau = 2.0
"""


@pytest.fixture
def smoke_recipe(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write a small synthetic-data recipe and return its path."""

    def make(epochs: int = 2, backbone: str = "tiny_slimmable", graph: str = "ipkd-ta-m", extra: str = "") -> Path:
        path = tmp_path / f"recipe-{backbone}-{graph}-{epochs}.toml"
        path.write_text(SMOKE.format(epochs=epochs, backbone=backbone, graph=graph) + extra)
        return path

    return make


@pytest.fixture(scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one intra-op thread is faster, and is not slowed down by a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
