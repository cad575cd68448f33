"""The teacher-store figures of ``benchmarks/run.py``: what a KD step from a store costs, what a
store takes on disk, and that a run's memory does not grow with its store.

* ``stored_kd_cost_ratio``: a KD step of a ``resnet20`` student (graph ``kd``, lam 0.9, tau 4)
  whose teacher logits are read from a teacher store on disk (the batch's rows of a full float16
  store of ``images`` images x 2 views, each step other rows) / a plain CE step of the same student
  (graph ``none``), on the same batch, timed alternating in turn (:func:`probes.alternate`);
  ``live_kd_cost_ratio`` (reported beside it): the KD step with the live teacher, a frozen
  ``resnet110`` (about 5.6 times the student's MACs) running forward in the step, / the CE step.
  Each step is the trainer's: ``zero_grad``, :func:`kdreg.engine.step.stage_backward` through the
  stage's runner, the SGD step; each variant has its own student (the same initial weights).
* ``store_bytes_per_view`` / ``store_bytes_per_view_topk`` (reported): the bytes on disk (every
  file, the manifest included) per (image, view) of a store that ``kdreg teach`` builds for 100
  classes, full float16 and top-5 float16; the details give the bytes per view of ImageNet-1k's
  1,000 classes from the same layout.
* ``store_memory_ratio``: peak resident memory (proportional set size) of ``kdreg run`` training
  one epoch of a ``tiny_slimmable`` student from a full float16 store over 8,000 images / over
  2,000 (16x16 images in memory: 4.4 MiB more at 8,000; its store 4 times the smaller one), each size
  ``memory_repeats`` times alternating, the ratio of the medians (:func:`probes.median_ratio`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import NUM_CLASSES, Family, Figure, Job, Settings
from probes import alternate, median, median_ratio, peak_pss
from streaming import kdreg_command

from kdreg.engine.assemble import DataShape, assemble
from kdreg.engine.runner import build_runner
from kdreg.engine.step import stage_backward
from kdreg.recipe import load_recipe, parse_recipe
from kdreg.stages import freeze
from kdreg.store.format import DTYPES, PARAMS_FILE, RawArray, TeacherStore
from kdreg.store.replay import StoredOutputs
from kdreg.store.teach import teach

STEP_RECIPE = """
[[stages]]
name = "teacher"
backbone = "resnet110"
[[stages]]
name = "student"
backbone = "resnet20"
graph = {graph}
lam = 0.9
tau = 4.0
"""
VIEWS = 2


def synthetic_store(directory: Path, images: int, classes: int, seed: int = 0) -> TeacherStore:
    """A full float16 store of random logits (the step reads rows; their values do not matter)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = images * VIEWS
    gen = np.random.default_rng(seed)
    logits = RawArray(directory / "out-0.f16", "float16", [rows, classes])
    for start in range(0, rows, 1 << 16):
        stop = min(rows, start + (1 << 16))
        logits.write(start, gen.standard_normal((stop - start, classes)).astype(DTYPES["float16"][1]))
    params = RawArray(directory / PARAMS_FILE, "int16", [images, VIEWS, 3])
    params.write(0, np.zeros((images, VIEWS, 3), np.int16))
    manifest = {"views": VIEWS, "images": images, "classes": classes, "topk": None, "padding": 4}
    return TeacherStore(directory, manifest, params, {("teacher", 0): (logits, None)})


def kd_steps(device: torch.device, workdir: Path, *, batch: int, size: int, images: int,
             channels_last: bool = True) -> dict[str, Callable[[], Any]]:
    """The three steps (``ce``, ``stored``, ``live``) on one batch, each with its own student."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    store = synthetic_store(workdir / "step-store", images, NUM_CLASSES)
    shape = DataShape(NUM_CLASSES, input_size=(size, size))
    steps: dict[str, Callable[[], Any]] = {}
    for name, graph in (("ce", '"none"'), ("stored", '{ name = "kd", teacher = "teacher" }'),
                        ("live", '{ name = "kd", teacher = "teacher" }')):
        teacher_plan, plan = assemble(parse_recipe(STEP_RECIPE.format(graph=graph)), shape, seed=0)
        freeze(teacher_plan.model.to(device))
        plan.to(device)
        if channels_last:
            plan.model.to(memory_format=torch.channels_last)
        plan.model.train()
        opt = torch.optim.SGD(plan.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        runner = build_runner(plan.model, None, device)
        loss, frozen, nodes = plan.loss, plan.frozen, dict(plan.nodes)
        draws = torch.Generator().manual_seed(1)

        def step(name: str = name, opt: torch.optim.Optimizer = opt, runner: Any = runner,
                 loss: Any = loss, frozen: Any = frozen, nodes: dict[str, Any] = nodes,
                 draws: torch.Generator = draws) -> None:
            teachers = frozen
            if name == "stored":    # this batch's rows: one view of each of `batch` images
                index = torch.randperm(images, generator=draws)[:batch]
                rows = index * VIEWS + torch.randint(0, VIEWS, (batch,), generator=draws)
                teachers = StoredOutputs(store, nodes, rows)
            elif name == "ce":
                teachers = None
            opt.zero_grad(set_to_none=True)
            stage_backward(runner, x, y, loss, teachers)
            opt.step()

        steps[name] = step
    return steps


def kd_cost(s: Settings, workdir: Path) -> tuple[Figure, Figure]:
    """``stored_kd_cost_ratio`` and ``live_kd_cost_ratio``: medians of alternating steps."""
    steps = kd_steps(s.device, workdir, batch=s.batch, size=s.size, images=s.images,
                     channels_last=s.channels_last is not False)
    times = alternate(steps, rounds=s.steps, warmup=s.warmup, device=s.device)
    med = {name: median(t) for name, t in times.items()}
    details: dict[str, Any] = {f"{name}_step_s": value for name, value in med.items()}
    details["setting"] = (f"resnet20 student, batch {s.batch}, {s.size}x{s.size}, kd lam 0.9 tau 4; stored: "
                          f"full float16 logits of {s.images} images x {VIEWS} views read per step; live: "
                          "a frozen resnet110 teacher")
    return (Figure(med["stored"] / med["ce"], details=details),
            Figure(med["live"] / med["ce"], details=details))


STORE_RECIPE = """
name = "store-bench"
seed = 0
[data]
dataset = "synthetic"
batch_size = {batch}
val_split = 0
options = {{ train_size = {images}, test_size = 16, num_classes = {classes}, image_size = {size} }}
[train]
epochs = 1
log_interval = 1000
optimizer = {{ lr = 0.05 }}
[[stages]]
name = "teacher"
backbone = {{ name = "tiny_slimmable", widths = [1.0] }}
init = "{init}"
epochs = 0
[[stages]]
name = "student"
backbone = {{ name = "tiny_slimmable", widths = [1.0], channels = 8 }}
graph = {{ name = "kd", teacher = "teacher" }}
{store}
"""


def store_recipe(workdir: Path, name: str, *, images: int, classes: int, size: int, batch: int,
                 store: Path | None = None) -> Path:
    """A recipe whose teacher is a ``tiny_slimmable`` with saved random weights (loaded, not trained)."""
    from kdreg.create import create

    init = workdir / f"teacher-{classes}.pt"
    if not init.exists():
        torch.manual_seed(0)
        model = create("backbone", "tiny_slimmable", {"widths": [1.0]},
                       provided={"num_classes": classes, "in_chans": 3, "input_size": (size, size)}, path="t")
        torch.save(model.state_dict(), init)
    path = workdir / f"{name}.toml"
    path.write_text(STORE_RECIPE.format(batch=batch, images=images, classes=classes, size=size, init=init,
                                        store=f'teacher_store = "{store}"' if store else ""))
    return path


def bytes_per_view(s: Settings, workdir: Path) -> tuple[Figure, Figure]:
    """``store_bytes_per_view`` (full float16) and ``store_bytes_per_view_topk`` (top-5 float16)
    of stores ``kdreg teach`` builds for 100 classes."""
    images, classes = 256, 100
    recipe = load_recipe(store_recipe(workdir, "bytes", images=images, classes=classes, size=8, batch=64))
    figures = []
    for topk in (0, 5):
        out = teach(recipe, "student", VIEWS, workdir / f"bytes-top{topk}", topk=topk, progress=False)
        files = {p.name: p.stat().st_size for p in out.iterdir()}
        per_view = sum(files.values()) / (images * VIEWS)
        manifest = json.loads((out / "manifest.json").read_text())
        data = sum(size for name, size in files.items() if name != "manifest.json") / (images * VIEWS)
        imagenet = 6 + (2 * (topk + 1) + 2 * topk if topk else 2 * 1000)
        figures.append(Figure(round(per_view, 2), details={
            "classes": classes, "images": images, "views": VIEWS, "topk": topk or None, "files": files,
            "data_bytes_per_view": data, "imagenet_bytes_per_view": imagenet,
            "imagenet_gb_per_view": round(1_281_167 * imagenet / 1e9, 3), "dtype": manifest["dtype"]}))
    return figures[0], figures[1]


def memory_ratio(s: Settings, workdir: Path) -> Figure:
    """``store_memory_ratio``: ``kdreg run`` from a store over the larger / the smaller number of
    images (:func:`probes.median_ratio` of peak proportional set sizes)."""
    small, large = s.memory_images[0], s.memory_images[1]
    batch = min(s.batch, 64)
    recipes: dict[int, Path] = {}
    for n in (small, large):
        plain = store_recipe(workdir, f"memory-teach-{n}", images=n, classes=NUM_CLASSES, size=16, batch=batch)
        store = teach(load_recipe(plain), "student", VIEWS, workdir / f"memory-store-{n}", progress=False)
        recipes[n] = store_recipe(workdir, f"memory-{n}", images=n, classes=NUM_CLASSES, size=16, batch=batch,
                                  store=store)
    seconds: dict[int, list[float]] = {small: [], large: []}

    def peak(n: int) -> float:
        run_dir = workdir / f"memory-run-{n}-{len(seconds[n])}"   # a fresh run directory each time
        pss, took = peak_pss(kdreg_command("run", str(recipes[n]), "--out", str(run_dir), "--no-progress"))
        seconds[n].append(round(took, 1))
        return pss

    ratio, readings = median_ratio(peak, (small, large), s.memory_repeats)
    details: dict[str, Any] = {"batch": batch, "views": VIEWS, "image_size": 16, "repeats": s.memory_repeats}
    for n in (small, large):
        details[str(n)] = {"peak_pss_bytes": median(readings[n]), "readings": readings[n], "seconds": seconds[n],
                           "store_bytes": sum(p.stat().st_size for p in (workdir / f"memory-store-{n}").iterdir())}
    return Figure(ratio, details=details)


FAMILY = Family(
    jobs=(Job(("stored_kd_cost_ratio", "live_kd_cost_ratio"), kd_cost),
          Job(("store_bytes_per_view", "store_bytes_per_view_topk"), bytes_per_view),
          Job(("store_memory_ratio",), memory_ratio)),
    targets={"stored_kd_cost_ratio": ("<=", 1.05), "store_memory_ratio": ("<=", 1.10)},
)
