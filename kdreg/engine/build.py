"""Building a stage's model and teacher graph from the recipe (shared by `validate` and `run`)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import attrs

from kdreg.backbone import FlexibleBackbone
from kdreg.engine import checkpoint
from kdreg.errors import CheckpointError, RecipeError, UserError
from kdreg.graph import TeacherGraph
from kdreg.options import bind, call, stage_refs
from kdreg.recipe import PluginSpec, Recipe, StageConfig
from kdreg.registry import get_registry


@attrs.frozen
class DataShape:
    num_classes: int
    in_chans: int = 3
    input_size: tuple[int, int] = (32, 32)


def stage_path(stage: StageConfig, index: int) -> str:
    return f"recipe.stages.{stage.name}" if stage.name.isidentifier() else f"recipe.stages[{index}]"


def _resolve_refs(spec: PluginSpec, factory, kwargs: dict, models: Mapping[str, FlexibleBackbone],
                  path: str) -> None:
    for key, ref in stage_refs(factory, spec.options).items():
        if ref not in models:
            known = ", ".join(models) or "none"
            raise RecipeError([f"{key} = {ref!r} names no earlier stage; earlier stages: {known} @ {path}.{key}"])
        kwargs[key] = copy.deepcopy(models[ref])  # later stages never alter an earlier one


def build_model(stage: StageConfig, index: int, shape: DataShape,
                models: Mapping[str, FlexibleBackbone], *, load_init: bool = True) -> FlexibleBackbone:
    """The stage's backbone; options naming earlier stages get those stages' models.

    ``load_init=False`` only checks that the ``init`` checkpoint is readable (the data's shape,
    which the classifier's weights depend on, is not known yet)."""
    path = f"{stage_path(stage, index)}.backbone"
    registry = get_registry("backbone")
    if stage.backbone.name not in registry:
        raise RecipeError([f"{registry.unknown_message(stage.backbone.name)} @ {path}.name"])
    entry = registry.get(stage.backbone.name)
    provided = {"num_classes": shape.num_classes, "in_chans": shape.in_chans, "input_size": shape.input_size}
    kwargs = bind(entry.factory, stage.backbone.options, provided=provided, path=path,
                  what=f"backbone {entry.name!r}")
    _resolve_refs(stage.backbone, entry.factory, kwargs, models, path)
    model = call(entry.factory, kwargs, path=path)
    if not isinstance(model, FlexibleBackbone):
        raise RecipeError([f"backbone {entry.name!r} of plugin {entry.plugin!r} did not return a "
                           f"kdreg.FlexibleBackbone @ {path}.name"])
    model.in_chans, model.input_size = shape.in_chans, tuple(shape.input_size)  # type: ignore[assignment]
    if stage.init is not None:
        try:
            if load_init:
                checkpoint.load_weights(model, stage.init)
            else:
                checkpoint.load(stage.init)
        except CheckpointError as exc:
            raise RecipeError([f"{p} @ {stage_path(stage, index)}.init" for p in exc.problems]) from None
    return model


def build_graph(stage: StageConfig, index: int, num_submodels: int) -> TeacherGraph:
    path = f"{stage_path(stage, index)}.graph"
    registry = get_registry("graph")
    if stage.graph.name not in registry:
        raise RecipeError([f"{registry.unknown_message(stage.graph.name)} @ {path}.name"])
    entry = registry.get(stage.graph.name)
    kwargs = bind(entry.factory, stage.graph.options, provided={"num_submodels": num_submodels},
                  path=path, what=f"graph {entry.name!r}")
    graph = call(entry.factory, kwargs, path=path)
    if not isinstance(graph, TeacherGraph):
        raise RecipeError([f"graph {entry.name!r} of plugin {entry.plugin!r} did not return a TeacherGraph @ {path}.name"])
    return graph


def check_recipe(recipe: Recipe, shape: DataShape | None = None,
                 models: dict[str, FlexibleBackbone] | None = None) -> list[str]:
    """Every problem that can be found without training, one ``what @ key.path`` line each.

    Models are built (untrained) to learn their sub-model counts, into ``models`` when given;
    without the data's shape, 10 classes of 3x32x32 images are assumed.
    """
    problems: list[str] = []
    datasets = get_registry("dataset")
    if recipe.data.dataset not in datasets:
        problems.append(f"{datasets.unknown_message(recipe.data.dataset)} @ recipe.data.dataset")
    else:
        entry = datasets.get(recipe.data.dataset)
        try:
            bind(entry.factory, recipe.data.options, provided={"root": Path(), "download": False},
                 path="recipe.data.options", what=f"dataset {entry.name!r}")
        except UserError as exc:
            problems += exc.problems
    known_shape = shape is not None
    shape = shape or DataShape(10)
    models = {} if models is None else models
    for i, stage in enumerate(recipe.stages):
        try:
            model = build_model(stage, i, shape, models, load_init=known_shape)
        except UserError as exc:
            problems += exc.problems
            continue
        models[stage.name] = model
        try:
            build_graph(stage, i, model.num_submodels)
        except UserError as exc:
            problems += exc.problems
    return problems
