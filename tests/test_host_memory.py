"""CPU training keeps freed host memory for reuse: a step's allocations stop faulting in pages."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

#: trains the recipe on the CPU (or not), then allocates and frees a step-like sequence of large
#: tensors (4 to 32 MiB) again and again, counting the page faults of each round
SCRIPT = r"""
import json, resource, sys
import torch
from kdreg.engine import host_memory
from kdreg.engine.run import Run

recipe, out = sys.argv[1], sys.argv[2]
if recipe != "-":
    Run.start(recipe, out, progress=False).execute()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(mib << 18) for mib in (24, 8, 16, 32, 4)]
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": host_memory._applied, "faults": faults}))
"""


def _rounds(recipe: str, out: Path, keep: str | None = None) -> dict:  # type: ignore[type-arg]
    env = dict(os.environ)
    env.pop("KDREG_KEEP_HOST_MEMORY", None)
    if keep is not None:
        env["KDREG_KEEP_HOST_MEMORY"] = keep
    proc = subprocess.run([sys.executable, "-c", SCRIPT, recipe, str(out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_after_a_cpu_run_freed_memory_is_reused_without_page_faults(smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = str(smoke_recipe(epochs=1))
    kept = _rounds(recipe, tmp_path / "kept")
    assert kept["kept"] is True
    assert sum(kept["faults"][-4:]) < 100, kept       # the last rounds reuse the first rounds' pages
    # without it (glibc's defaults), every round faults in most of its 84 MiB again
    default = _rounds(recipe, tmp_path / "default", keep="0")
    assert default["kept"] is False                   # asked for and refused: the variable
    assert min(default["faults"][-4:]) > 2000, default


def test_importing_kdreg_leaves_the_allocator_alone(tmp_path: Path) -> None:
    """Only a CPU training stage changes malloc's settings; importing kdreg does not."""
    untouched = _rounds("-", tmp_path / "none")
    assert untouched["kept"] is None
    assert min(untouched["faults"][-4:]) > 2000, untouched
