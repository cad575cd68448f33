"""``kdreg teach``: a student stage's frozen teachers run once over K augmented views of every
training image, their outputs written to a teacher store (:mod:`kdreg.store.format`).

In memory, the views' crops and flips are drawn from ``stream_seed(seed, "store", "views")`` with
the live loader's distribution (offsets uniform over the reflect-padded positions, flip with
p = 0.5); streamed, that stream gives each (image, view) a seed at which the loader's workers draw
its RandomResizedCrop box and flip as the live transform does (:mod:`kdreg.store.streamed`). The
teachers run exactly as a live step runs them (eval mode, each with its own input statistics, at
the student stage's precision, in its memory format) on batches of ``batch_size`` rows, the last
one padded to that size: on a CPU a network's float32 output depends on the batch size and the
memory format in its last bits, so a float32 store built at a run's per-process batch size
reproduces the live teacher bit for bit.

The store is written into a temporary sibling directory and renamed into place once its manifest
is written: an interrupted or failed teach leaves no directory at ``out`` at all.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from tqdm import tqdm

from kdreg.data.batches import BatchLoader
from kdreg.data.loading import load_data
from kdreg.data.splits import StreamSet, TensorSet
from kdreg.engine.assemble import DataShape, assemble, stage_path
from kdreg.engine.device import resolve_device, resolve_precision
from kdreg.engine.trainer import stderr_is_terminal
from kdreg.errors import RecipeError, UserError
from kdreg.recipe import Recipe
from kdreg.store.checks import recipe_problems
from kdreg.store.format import (
    CROPS,
    CROPS_FILE,
    DTYPES,
    FORMAT,
    MANIFEST,
    PARAMS,
    PARAMS_FILE,
    VERSION,
    RawArray,
    data_depends,
    run_depends,
    teacher_depends,
    topk_row,
)
from kdreg.store.streamed import ViewMaker, stream_depends, teach_views
from kdreg.streams import stream_seed


def teach(recipe: Recipe, stage: str, views: int, out: str | Path, *, topk: int = 0,
          dtype: str = "float16", batch_size: int | None = None, seed: int | None = None,
          progress: bool = True) -> Path:
    """Build the teacher store of stage ``stage`` of ``recipe`` at ``out`` (see the module
    docstring); ``batch_size``: the teachers' batch (default the recipe's per-process training
    batch, ``data.batch_size``); ``seed``: the views' seed (default the recipe's). Returns
    ``out``. Every refusal is a :class:`UserError` raised before anything is written."""
    out = Path(out)
    names = [s.name for s in recipe.stages]
    if stage not in names:
        raise UserError(f"recipe {recipe.name!r} has no stage {stage!r}; its stages: {', '.join(names)} @ --stage")
    index = names.index(stage)
    config = recipe.stages[index]
    path = stage_path(config, index)
    problems = []
    if views < 1:
        problems.append(f"--views takes a number of views >= 1, got {views} @ --views")
    if topk < 0:
        problems.append(f"--topk takes a number of classes >= 1 (0: full logits), got {topk} @ --topk")
    if dtype not in DTYPES:
        problems.append(f"--dtype takes {' or '.join(DTYPES)}, got {dtype!r} @ --dtype")
    if out.exists():
        problems.append(f"{out} exists; a store is never written over: choose another --out or remove it @ --out")
    problems += recipe_problems(recipe, config, path)
    if problems:
        raise UserError(problems)
    # the recipe a run reads the store with may name it already: the teachers are built here
    live = attrs.evolve(recipe, stages=tuple(attrs.evolve(s, teacher_store=None) if s.name == stage else s
                                             for s in recipe.stages))
    splits = load_data(live.data)
    maker = None
    if splits.streaming is not None:     # refused before any teacher is built
        maker = ViewMaker.of(splits.streaming, f"{path}.teacher_store")
    try:
        plans = assemble(live, DataShape.of(splits), seed=live.seed)
    except RecipeError as exc:
        raise RecipeError([f"{recipe.name}: {p}" for p in exc.problems]) from None
    plan = plans[index]
    frozen = plan.frozen
    if frozen is None:
        raise UserError(f"stage {stage!r} learns from no frozen earlier stage (its graph {config.graph.name!r} "
                        f"names none): there is nothing to store @ {path}.graph")
    depends: dict[str, Any] = {}
    stages: dict[str, list[str]] = {}
    for name in frozen.wanted:
        teacher = recipe.stage(name)
        where = stage_path(teacher, names.index(name))
        train = recipe.stage_train(teacher)
        if train.epochs != 0:
            problems.append(f"stage {name!r} trains in this recipe (epochs = {train.epochs}); a teacher store "
                            f"holds a frozen teacher's outputs: train it first, then give its best.pt as "
                            f"init with epochs = 0 @ {where}.epochs")
            continue
        depends.update(teacher_depends(teacher, train, where))
        stages[name] = list(plans[names.index(name)].model.submodel_labels)
    classes = splits.num_classes
    if topk and topk >= classes:
        problems.append(f"--topk {topk} keeps every one of the {classes} classes; store full logits "
                        f"(--topk 0) instead @ --topk")
    if problems:
        raise UserError(problems)
    device = resolve_device(recipe.train.device)
    precision = resolve_precision(recipe.stage_train(config).precision, device)
    train_set = splits.train
    n, k = len(train_set), int(views)
    gen = torch.Generator().manual_seed(stream_seed(recipe.seed if seed is None else seed, "store", "views"))
    batch = int(batch_size or recipe.data.batch_size)
    params_file, padding = PARAMS_FILE, 0
    if maker is not None:   # each (image, view)'s seed; its box and flip drawn by the workers
        assert isinstance(train_set, StreamSet) and splits.streaming is not None
        depends.update(stream_depends(recipe.data.dataset, train_set, splits.streaming, classes, maker))
        seeds = torch.randint(0, 2**62, (n, k), generator=gen)
        params_file = CROPS_FILE
    else:
        assert isinstance(train_set, TensorSet)
        loader = BatchLoader(train_set.images, train_set.labels, batch_size=1, device=device, train=True,
                             seed=0)
        padding = loader.padding
        depends.update(data_depends(recipe.data.dataset, train_set.images, train_set.labels, classes, padding))
        offsets = torch.randint(0, 2 * padding + 1, (n, k, 2), generator=gen)
        flips = torch.rand(n, k, generator=gen) < 0.5
        params = torch.cat([offsets, flips[..., None].long()], dim=2).to(torch.int16)
    depends.update(run_depends(recipe, stage))

    def views_in_order() -> Any:
        """``(first row, rows, float32 pixels padded to ``batch`` rows)`` in store row order."""
        if maker is not None:
            assert isinstance(train_set, StreamSet) and splits.streaming is not None
            crops = RawArray(tmp / CROPS_FILE, "int32", [n * k, len(CROPS)])   # a row per (image, view)
            start = 0
            for x, drawn in teach_views(train_set, splits.streaming, maker, seeds, batch):
                crops.write(start, drawn.numpy())
                x = x.to(device).float().div_(255.0)
                x = torch.cat([x, x.new_zeros(batch - len(x), *x.shape[1:])])
                yield start, len(drawn), x
                start += len(drawn)
            crops.sync()
            crops.close()
            return
        arrays[PARAMS_FILE].write(0, params.numpy())
        flat_offsets, flat_flips = offsets.view(n * k, 2), flips.view(n * k)
        for start in range(0, n * k, batch):
            rows = torch.arange(start, min(start + batch, n * k))
            padded = torch.cat([rows, rows.new_zeros(batch - len(rows))])  # one batch size throughout
            yield start, len(rows), loader._augment((padded // k).to(device), flat_offsets[padded].to(device),
                                                    flat_flips[padded].to(device))

    channels_last = recipe.stage_train(config).channels_last
    for m in frozen.models.values():
        m.to(device).eval()
    keys = [(s, i) for s, indices in frozen.wanted.items() for i in indices]
    outputs: list[dict[str, Any]] = []
    for name, i in keys:
        node = next((node for node, key in plan.nodes.items() if key == (name, i)),
                    f"{name}:{stages[name][i]}")
        outputs.append({"node": node, "stage": name, "index": i, "label": stages[name][i]})
    suffix, np_dtype = DTYPES[dtype]
    files: dict[str, dict[str, Any]] = (
        {CROPS_FILE: {"dtype": "int32", "shape": [n, k, len(CROPS)]}} if maker is not None else
        {PARAMS_FILE: {"dtype": "int16", "shape": [n, k, 3]}})
    for j, o in enumerate(outputs):
        width = topk + 1 if topk else classes
        o["values"] = f"out-{j}.values.{suffix}" if topk else f"out-{j}.{suffix}"
        files[o["values"]] = {"dtype": dtype, "shape": [n * k, width]}
        if topk:   # int16 class indices for up to 32,767 classes (ImageNet-21k's 21,841 included)
            small = classes <= 2**15 - 1
            o["indices"] = f"out-{j}.indices.{'i16' if small else 'i32'}"
            files[o["indices"]] = {"dtype": "int16" if small else "int32", "shape": [n * k, topk]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arrays: dict[str, RawArray] = {}
    try:
        arrays.update({name: RawArray(tmp / name, spec["dtype"], spec["shape"]) for name, spec in files.items()})
        for a in arrays.values():
            a.write(0, np.zeros((0, *a.shape[1:])))    # every file exists, an empty one included
        bar = tqdm(total=n * k, desc=f"teach {stage}", unit="view", leave=False, file=sys.stderr,
                   dynamic_ncols=True, disable=not (progress and stderr_is_terminal()))
        for start, count, x in views_in_order():
            if channels_last:     # the memory format a step hands its teachers
                x = x.contiguous(memory_format=torch.channels_last)
            logits, _ = frozen.outputs(x, precision)
            for o in outputs:
                z = logits[(o["stage"], o["index"])][:count].float().cpu()
                if topk:
                    values, indices = topk_row(z, topk)
                    arrays[o["indices"]].write(start, indices.numpy())
                    z = values
                arrays[o["values"]].write(start, z.numpy().astype(np_dtype))
            bar.update(count)
        bar.close()
        for a in arrays.values():
            a.sync()
            a.close()
        manifest = {"format": FORMAT, "version": VERSION, "complete": True, "views": k, "images": n,
                    "classes": classes, "dtype": dtype, "topk": topk or None, "padding": padding,
                    "path": "streamed" if maker is not None else "in memory", "params_file": params_file,
                    "params": list(CROPS if maker is not None else PARAMS), "batch_size": batch,
                    "channels_last": channels_last, "seed": recipe.seed if seed is None else seed,
                    "stage": stage, "stages": stages, "outputs": outputs, "files": files, "depends": depends}
        with open(tmp / MANIFEST, "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if out.exists():
            raise UserError(f"{out} appeared while the store was written; it is left as it is and this "
                            "store discarded @ --out")
        tmp.rename(out)
    finally:
        for a in arrays.values():
            a.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out



def build_missing_stores(recipe: Recipe, progress: bool = True) -> list[Path]:
    """Build every store a stage names in ``teacher_store`` with ``teacher_store_views > 0`` that
    does not exist yet (rank 0 builds, the other processes wait): what ``kdreg run`` and every
    point of ``kdreg sweep`` do first. Returns the stores built."""
    from kdreg.engine import distributed

    built = []
    for stage in recipe.stages:
        if stage.teacher_store is None or stage.teacher_store_views == 0:
            continue
        path = Path(stage.teacher_store).expanduser()
        if path.exists():
            continue
        if distributed.is_main():
            print(f"teacher store {stage.teacher_store}: building it ({stage.teacher_store_views} views of every "
                  f"training image, stage {stage.name!r}'s teachers)", flush=True)
            teach(recipe, stage.name, stage.teacher_store_views, path, topk=stage.teacher_store_topk,
                  progress=progress)
            built.append(path)
        distributed.barrier()
    return built
