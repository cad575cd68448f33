"""Assembly: a recipe becomes a list of stage plans, in one place, used by `run`, `validate` and
`eval`.

For each stage its plan holds the model (built once, its ``init`` loaded once), the teacher
graph, the divergence of its edges, the frozen earlier stages it learns from and its bridge. Options that
name an earlier stage are resolved here: a backbone factory gets a trainable copy of the stage's
model (its weights are set to the trained ones before the new stage trains); a graph or bridge
factory gets the stage itself, frozen (:class:`kdreg.TeacherStage`).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from kdreg import normalise
from kdreg.backbone import FlexibleBackbone
from kdreg.bridge import Bridge
from kdreg.create import create
from kdreg.data.loading import PROVIDED, source_shape
from kdreg.data.splits import Splits
from kdreg.divergence import Divergence
from kdreg.downloads import no_downloads, weights_from_checkpoints
from kdreg.engine import checkpoint
from kdreg.engine.step import FeatureEdge, LossSettings, Teachers
from kdreg.errors import CheckpointError, DataError, OptionError, RecipeError, UserError
from kdreg.feature_loss import FeatureLoss, FeatureSetup, tokens_of
from kdreg.graph import Node, TeacherGraph, parse_external_node
from kdreg.options import bind
from kdreg.recipe import FeatureLossSpec, PluginSpec, Recipe, StageConfig, TrainConfig
from kdreg.registry import get_registry
from kdreg.stages import TeacherStage
from kdreg.store.checks import recipe_problems
from kdreg.store.format import TeacherStore, open_store, run_depends, teacher_depends
from kdreg.store.replay import StoredStage, StoredTeachers
from kdreg.streams import init_seed


@attrs.frozen
class DataShape:
    """What the models are built for: the class count, the images' channels and size, and the
    data set's statistics (what a model trained here is fed, :mod:`kdreg.normalise`; None when
    unknown, as for a declared shape)."""

    num_classes: int
    in_chans: int = 3
    input_size: tuple[int, int] = (32, 32)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    #: the training set's size and labels (feature losses with a memory of every sample); None
    #: when unknown (validation without the data)
    num_samples: int | None = None
    train_labels: torch.Tensor | None = attrs.field(default=None, eq=False)

    @classmethod
    def of(cls, splits: Splits) -> DataShape:
        return cls(splits.num_classes, splits.in_chans, splits.input_size, splits.mean, splits.std,
                   len(splits.train), splits.train.labels)

    def provided(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "in_chans": self.in_chans,
                "input_size": tuple(self.input_size)}


@attrs.define(eq=False)
class StagePlan:
    """One stage, ready to train: everything the engine needs and nothing it must build again."""

    index: int
    config: StageConfig
    train: TrainConfig
    path: str                                   # its recipe key, e.g. recipe.stages.student
    model: FlexibleBackbone
    graph: TeacherGraph
    #: what is distilled along each edge of the graph
    divergence: Divergence
    #: frozen earlier stages this stage learns from (graph nodes and bridge), by name
    teachers: dict[str, FlexibleBackbone] = attrs.field(factory=dict)
    #: external graph node -> (stage name, sub-model index)
    nodes: dict[str, tuple[str, int]] = attrs.field(factory=dict)
    bridge: Bridge | None = None
    #: (stage name, copy) of earlier stages' models handed to this stage's backbone factory
    copies: list[tuple[str, FlexibleBackbone]] = attrs.field(factory=list)
    #: the feature losses along the graph's edges, one object per (entry, edge)
    features: tuple[FeatureEdge, ...] = ()
    #: external node -> the split points feature losses read from it
    teacher_points: dict[str, tuple[str, ...]] = attrs.field(factory=dict)
    #: the teacher store whose outputs replace its frozen teachers' (``teacher_store``); None: none
    store: StoredTeachers | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def loss(self) -> LossSettings:
        """Every part of the stage's loss (graph, divergence, feature losses, bridge), at fp32; the
        run sets the precision."""
        return LossSettings(self.graph, self.config.lam, self.config.tau, self.divergence,
                            features=self.features, bridge=self.bridge)

    @property
    def frozen(self) -> Teachers | None:
        """The frozen earlier stages the step reads (None: none)."""
        if not self.teachers:
            return None
        return Teachers(self.teachers, self.nodes, self.bridge.teacher if self.bridge is not None else None,
                        self.teacher_points)

    def modules(self) -> list[torch.nn.Module]:
        """What this stage trains: its model, its bridge's and its feature losses' own parameters."""
        return [self.model] + self.loss.trained_modules()

    def to(self, device: torch.device) -> StagePlan:
        for m in self.modules():
            m.to(device)
        return self


def stage_path(stage: StageConfig, index: int) -> str:
    return f"recipe.stages.{stage.name}" if stage.name.isidentifier() else f"recipe.stages[{index}]"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def assemble(recipe: Recipe, shape: DataShape, *, seed: int | None = None,
             download: bool = True, from_checkpoints: bool = False) -> list[StagePlan]:
    """Every stage's plan, in order; raises :class:`RecipeError` with every problem found.

    With ``seed``, the global RNGs are seeded with :func:`kdreg.streams.init_seed` of ``(seed,
    index)`` before stage ``index`` is built, so a stage's initial weights do not depend on the
    stages before it, nor equal another seed's stage's. ``download = False`` (validation) builds
    every stage inside :func:`kdreg.downloads.no_downloads`: no factory fetches weights.
    ``from_checkpoints = True`` (a run's stages about to receive their ``best.pt``: ``kdreg eval``,
    ``kdreg export``) also reads no weights at all, no ``init`` and no pretrained weights, so a
    run directory evaluates offline and without its initial files.
    """
    plans: dict[str, StagePlan] = {}
    failed: set[str] = set()
    problems: list[str] = []
    names = [s.name for s in recipe.stages]
    stores: dict[str, TeacherStore] = {}
    for index, stage in enumerate(recipe.stages):
        if stage.teacher_store is not None and not (stage.teacher_store_views and not
                                                    Path(stage.teacher_store).expanduser().exists()):
            try:
                stores[stage.name] = open_store(stage.teacher_store, f"{stage_path(stage, index)}.teacher_store")
            except UserError as exc:
                problems += exc.problems
                failed.add(stage.name)
    held = {name: holder for holder, store in stores.items() for name in store.stages}
    for index, stage in enumerate(recipe.stages):
        if stage.name in held or stage.name in failed:   # held by a store: never built
            continue
        if seed is not None:
            seed_everything(init_seed(seed, index))
        try:
            with nullcontext() if download and not from_checkpoints else no_downloads(from_checkpoints):
                plans[stage.name] = _plan(recipe, stage, index, shape, plans, failed, names,
                                          stores.get(stage.name), held)
        except UserError as exc:
            problems += exc.problems
            failed.add(stage.name)
    if problems:
        raise RecipeError(problems)
    return list(plans.values())


def _plan(recipe: Recipe, stage: StageConfig, index: int, shape: DataShape,
          plans: Mapping[str, StagePlan], failed: set[str], names: list[str],
          store: TeacherStore | None = None, held: Mapping[str, str] | None = None) -> StagePlan:
    path = stage_path(stage, index)
    train = recipe.stage_train(stage)
    copies: list[tuple[str, FlexibleBackbone]] = []
    held = held or {}

    def earlier(key: str, ref: str, where: str) -> StagePlan:
        if ref in plans:
            return plans[ref]
        if ref in failed:
            raise UserError([])  # that stage's own problems are reported already
        if ref in held:
            raise UserError([f"stage {ref!r} is held by the teacher store of stage {held[ref]!r} and "
                             f"not built; only that stage learns from it @ {where}.{key}"])
        raise UserError([ref_problem(key, ref, names, index, where)])

    def backbone_ref(key: str, ref: str) -> FlexibleBackbone:
        twin = copy.deepcopy(earlier(key, ref, f"{path}.backbone").model)
        twin.requires_grad_(True)
        twin.train()
        copies.append((ref, twin))
        return twin

    def teacher_ref(where: str) -> Callable[[str, str], TeacherStage]:
        def ref_of(key: str, ref: str) -> TeacherStage:
            if store is not None and ref in store.stages:
                return StoredStage.of(ref, store.stages[ref])
            return TeacherStage(ref, earlier(key, ref, where).model)
        return ref_of

    problems: list[str] = []
    model = create("backbone", stage.backbone.name, stage.backbone.options,
                   provided=shape.provided(), path=f"{path}.backbone", refs=backbone_ref)
    model.in_chans, model.input_size = shape.in_chans, shape.input_size
    normalise.attach(model, shape.mean, shape.std)
    if stage.init is not None:
        try:
            if not weights_from_checkpoints():   # else best.pt brings the weights
                checkpoint.load_weights(model, stage.init)
        except CheckpointError as exc:
            problems += [f"{p} @ {path}.init" for p in exc.problems]
    elif train.epochs == 0 and model.pretrained is None:
        problems.append(f"epochs = 0 loads a stage instead of training it: give it init = "
                        f"\"checkpoint.pt\" or a backbone with pretrained weights @ {path}.epochs")
    graph: TeacherGraph | None = None
    try:
        graph = create("graph", stage.graph.name, stage.graph.options,
                       provided={"num_submodels": model.num_train_submodels}, path=f"{path}.graph",
                       refs=teacher_ref(f"{path}.graph"))
    except UserError as exc:
        problems += exc.problems
    divergence: Divergence | None = None
    try:
        divergence = build_divergence(stage.divergence, f"{path}.divergence")
    except UserError as exc:
        problems += exc.problems
    bridge: Bridge | None = None
    if stage.bridge is not None:
        try:
            bridge = _bridge(stage.bridge, model, f"{path}.bridge", teacher_ref(f"{path}.bridge"))
        except UserError as exc:
            problems += exc.problems
    nodes: dict[str, tuple[str, int]] = {}
    if graph is not None:
        for node in graph.external:
            try:
                nodes[node] = _node(node, plans, f"{path}.graph", store)
            except UserError as exc:
                problems += exc.problems
    stored = None
    if stage.teacher_store is not None and store is None:   # a store its run builds first
        problems += recipe_problems(recipe, stage, path)
    if store is not None:
        problems += _store_problems(recipe, stage, store, nodes, model, path)
        stored = StoredTeachers(store, nodes, f"{path}.teacher_store")
        nodes = {}   # the teachers' outputs come from the store: none is run
    teachers = {name: plans[name].model for name, _ in nodes.values()}
    if bridge is not None:
        teachers[bridge.teacher] = plans[bridge.teacher].model
    problems += _class_problems(model, teachers, path)
    features: list[FeatureEdge] = []
    if stage.feature_losses and graph is not None and len(nodes) == len(graph.external):
        for k, spec in enumerate(stage.feature_losses):
            try:
                features += _feature_edges(spec, k, model, graph, nodes, plans, shape, recipe,
                                           f"{path}.feature_losses[{k}]")
            except UserError as exc:
                problems += exc.problems
    if problems or graph is None or divergence is None or (stage.bridge is not None and bridge is None):
        raise UserError(problems)  # empty when only a failed earlier stage is to blame
    teacher_points: dict[str, set[str]] = {}
    for e in features:
        if isinstance(e.teacher, str):
            teacher_points.setdefault(e.teacher, set()).update(e.teacher_points)
    return StagePlan(index=index, config=stage, train=train, path=path, model=model, graph=graph,
                     divergence=divergence, teachers=teachers, nodes=nodes, bridge=bridge,
                     copies=copies, features=tuple(features),
                     teacher_points={n: tuple(sorted(p)) for n, p in teacher_points.items()},
                     store=stored)


def _store_problems(recipe: Recipe, stage: StageConfig, store: TeacherStore,
                    nodes: Mapping[str, tuple[str, int]], model: FlexibleBackbone, path: str) -> list[str]:
    """Why stage ``stage`` cannot learn from ``store``: what the store cannot replay, a graph node
    it does not hold, another class count, or a recipe that differs from it on a dependency."""
    where = f"{path}.teacher_store"
    problems = recipe_problems(recipe, stage, path)
    if stage.teacher_store_views and (store.views, store.topk) != (stage.teacher_store_views,
                                                                   stage.teacher_store_topk):
        problems.append(f"teacher store {stage.teacher_store} holds {store.views} views, top-k "
                        f"{store.topk or 'none (full)'}; this stage asks for {stage.teacher_store_views}, "
                        f"top-k {stage.teacher_store_topk or 'none (full)'}; build the store again for it "
                        f"@ {path}.teacher_store_views")
    for node, key in nodes.items():
        if not store.holds(*key):
            problems.append(f"graph node {node!r} is not in teacher store {stage.teacher_store} (it holds "
                            f"{', '.join(store.outputs_held())}) @ {where}")
    if output_classes(model) != store.classes:
        problems.append(f"teacher store {stage.teacher_store} holds {store.classes} classes but this stage "
                        f"predicts {output_classes(model)} @ {where}")
    actual: dict[str, Any] = {}
    names = [s.name for s in recipe.stages]
    for name in store.stages:
        if name not in names:
            problems.append(f"teacher store {stage.teacher_store} holds stage {name!r}, which this recipe "
                            f"lacks @ {where}")
            continue
        teacher = recipe.stage(name)
        try:
            actual.update(teacher_depends(teacher, recipe.stage_train(teacher),
                                          stage_path(teacher, names.index(name))))
        except UserError as exc:
            problems += exc.problems
    try:
        actual.update(run_depends(recipe, stage.name))
    except UserError as exc:
        problems += exc.problems
    return problems + store.differences(actual, where)


def _feature_edges(spec: FeatureLossSpec, entry: int, model: FlexibleBackbone, graph: TeacherGraph,
                   nodes: Mapping[str, tuple[str, int]], plans: Mapping[str, StagePlan],
                   shape: DataShape, recipe: Recipe, path: str) -> list[FeatureEdge]:
    """One :class:`FeatureEdge` per edge of ``graph`` whose two ends give features at the entry's
    points, each with its own loss object, set up for that edge's feature shapes."""
    registry = get_registry("feature_loss")
    if spec.name not in registry:
        raise UserError([f"{registry.unknown_message(spec.name)} @ {path}.name"])
    student_points, teacher_points = spec.pairs
    student_key = "student_points" if spec.student_points else "points"
    teacher_key = "teacher_points" if spec.teacher_points else "points"
    problems = _point_problems(model, student_points, "the student", f"{path}.{student_key}")
    if model.single_pass and model.num_train_submodels > 1:
        problems.append(f"feature losses distil a network with one sub-model or the widths of a "
                        f"slimmable one; {type(model).__name__} computes {model.num_train_submodels} "
                        f"sub-models in one pass @ {path}")
    needs_indices = getattr(registry.get(spec.name).factory, "needs_indices", False)
    augment = recipe.data.augment
    if needs_indices and (augment.mixup > 0 or augment.cutmix > 0):
        problems.append(f"{spec.name} reads each sample's index in the training set, and mixup / CutMix "
                        f"(data.augment) blend two samples into each image: no index names it @ {path}.name")
    if problems:
        raise UserError(problems)
    own = set(range(model.num_train_submodels)) if len(model.feature_submodels()) > 1 else (
        {model.num_train_submodels - 1} if model.feature_submodels() else set())
    ends: list[tuple[int, Node, float, FlexibleBackbone, int]] = []
    seen_teachers: set[str] = set()
    for e in graph.edges:
        if e.student not in own:
            continue
        if isinstance(e.teacher, int):
            if e.teacher in own:
                ends.append((e.student, e.teacher, e.weight, model, e.teacher))
            continue
        stage, index = nodes[e.teacher]
        teacher = plans[stage].model
        if stage not in seen_teachers:
            seen_teachers.add(stage)
            problems += _point_problems(teacher, teacher_points, f"teacher stage {stage!r}",
                                        f"{path}.{teacher_key}")
        if index in teacher.feature_submodels():
            ends.append((e.student, e.teacher, e.weight, teacher, index))
    if any(isinstance(t, int) for _, t, *_ in ends):
        problems += _point_problems(model, teacher_points, "the student (teaching its smaller widths)",
                                    f"{path}.{teacher_key}")
    if problems:
        raise UserError(problems)
    if not ends:
        raise UserError([f"no edge of graph {graph.name!r} joins two ends that give features at these "
                         f"points (a frozen teacher stage's full model, or the widths of a slimmable "
                         f"student); it has {len(graph.edges)} edge(s) @ {path}"])
    edges = []
    for student, teacher_node, w, teacher, index in ends:
        loss: FeatureLoss = create("feature_loss", spec.name, spec.options, provided={}, path=path)
        try:
            loss.setup(FeatureSetup(_shapes(model, student, student_points),
                                    _shapes(teacher, index, teacher_points),
                                    num_samples=shape.num_samples or 1, num_classes=shape.num_classes,
                                    train_labels=shape.train_labels, student_tokens=tokens_of(model),
                                    teacher_tokens=tokens_of(teacher)))
        except OptionError as exc:
            raise UserError([f"{e} @ {path}" + (f".{e.key}" if e.key else "") for e in exc.each()]) from None
        weight = type(loss).default_weight if spec.weight is None else spec.weight
        edges.append(FeatureEdge(student, teacher_node, weight * w, loss, tuple(student_points),
                                 tuple(teacher_points), entry))
    return edges


def _point_problems(model: FlexibleBackbone, points: Sequence[str], whose: str, where: str) -> list[str]:
    known = model.split_points()
    problems = [f"unknown split point {p!r} of {whose} ({type(model).__name__}); known: "
                f"{', '.join(known) if known else 'none'} @ {where}" for p in points if p not in known]
    if not problems and [known.index(p) for p in points] != sorted(known.index(p) for p in points):
        problems.append(f"split points {list(points)} are not in network order {list(known)} @ {where}")
    return problems


def _shapes(model: FlexibleBackbone, index: int, points: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Feature shapes (without the batch) of sub-model ``index`` of ``model`` at ``points``."""
    feats = model.probe(lambda x: model.forward_features(x, index, points)[0], batch=2)
    return tuple(tuple(f.shape[1:]) for f in feats)


def build_divergence(spec: PluginSpec, path: str) -> Divergence:
    """The stage's divergence from its recipe table (``path``: ``recipe.stages.<stage>.divergence``)."""
    divergence: Divergence = create("divergence", spec.name, spec.options, provided={}, path=path)
    return divergence


def ref_problem(key: str, ref: str, names: list[str], index: int, where: str) -> str:
    """Why option ``key = ref`` of stage ``index`` names no stage it may learn from."""
    if ref in names:
        why = "itself" if names.index(ref) == index else "a later stage"
        return f"{key} = {ref!r} names {why}; a stage learns only from earlier stages @ {where}.{key}"
    known = ", ".join(names[:index]) or "none"
    return f"{key} = {ref!r} names no earlier stage; earlier stages: {known} @ {where}.{key}"


def _bridge(spec: PluginSpec, model: FlexibleBackbone, path: str,
            refs: Callable[[str, str], TeacherStage]) -> Bridge:
    if model.num_submodels != 1:
        raise UserError([f"a bridge joins a student with one sub-model; {type(model).__name__} has "
                         f"{model.num_submodels} @ {path}.name"])
    bridge: Bridge = create("bridge", spec.name, spec.options, provided={"student": model},
                            path=path, refs=refs)
    return bridge


def _node(node: str, plans: Mapping[str, StagePlan], path: str,
          store: TeacherStore | None = None) -> tuple[str, int]:
    stage, label = parse_external_node(node)
    if store is not None and stage in store.stages:
        labels = list(store.stages[stage])
    elif stage not in plans:
        raise UserError([f"external teacher {node!r} of the graph names no earlier stage; earlier "
                         f"stages: {', '.join(plans) or 'none'} @ {path}"])
    else:
        labels = list(plans[stage].model.submodel_labels)
    if label is None:
        return stage, len(labels) - 1
    if label not in labels:
        raise UserError([f"external teacher {node!r}: stage {stage!r} has no sub-model {label!r}; "
                         f"its sub-models: {', '.join(labels)} @ {path}"])
    return stage, labels.index(label)


def _class_problems(model: FlexibleBackbone, teachers: Mapping[str, FlexibleBackbone],
                    path: str) -> list[str]:
    if not teachers:
        return []
    own = output_classes(model)
    return [f"stage {name!r} predicts {theirs} classes but this stage {own}; a teacher and its "
            f"student must classify the same classes @ {path}"
            for name, t in teachers.items() if (theirs := output_classes(t)) != own]


def output_classes(model: FlexibleBackbone) -> int:
    """The width of the full model's logits (one image through it)."""
    return int(model.probe(lambda x: model.forward_submodel(x, model.num_submodels - 1)).shape[-1])


# ----------------------------------------------------------------------------- validation
def validation_shape(recipe: Recipe) -> tuple[DataShape | None, str]:
    """The data's real shape when it can be read, else the dataset's declared one (or None), and
    a line that says which."""
    registry = get_registry("dataset")
    entry = registry.get(recipe.data.dataset) if recipe.data.dataset in registry else None
    try:
        classes, chans, size, mean, std = source_shape(attrs.evolve(recipe.data, download=False))
        return DataShape(classes, chans, size, mean, std), "the data's shape"  # never downloads
    except DataError as exc:
        if (entry is not None and entry.shape is None
                and Path(recipe.data.root).expanduser().exists()):
            raise  # the data is there but malformed: a problem validation can report now
        why = exc.problems[0] if exc.problems else "unreadable"
    if entry is not None and entry.shape is not None:
        classes, chans, h, w = entry.shape
        return DataShape(classes, chans, (h, w)), f"the declared shape of {entry.name!r} ({why})"
    return None, f"no shape: the data cannot be read ({why}) and {recipe.data.dataset!r} declares none"


def check_recipe(recipe: Recipe, shape: DataShape | None = None) -> list[str]:
    """Every problem that can be found without training, one ``what @ key.path`` line each.

    Every stage is assembled (models built, checkpoints loaded, graphs and bridges checked) for
    ``shape``, by default the data's real or declared shape (:func:`validation_shape`); when no
    shape is known, only names, options and stage references are checked.
    """
    if _data_problems(recipe):
        return static_problems(recipe)
    if shape is None:
        shape, _ = validation_shape(recipe)
    if shape is None:
        return static_problems(recipe)
    problems: list[str] = []
    try:
        assemble(recipe, shape, download=False)
    except UserError as exc:
        problems += exc.problems
    return problems


def _data_problems(recipe: Recipe) -> list[str]:
    datasets = get_registry("dataset")
    if recipe.data.dataset not in datasets:
        return [f"{datasets.unknown_message(recipe.data.dataset)} @ recipe.data.dataset"]
    entry = datasets.get(recipe.data.dataset)
    try:
        bind(entry.factory, recipe.data.options, provided={k: None for k in PROVIDED},
             path="recipe.data.options", what=f"dataset {entry.name!r}")
    except UserError as exc:
        return exc.problems
    return []


def static_problems(recipe: Recipe) -> list[str]:
    """Names, option names and types, and stage references, without building anything."""
    from kdreg.options import stage_refs

    problems = _data_problems(recipe)
    names = [s.name for s in recipe.stages]
    for index, stage in enumerate(recipe.stages):
        path = stage_path(stage, index)
        if stage.init is not None and not Path(stage.init).expanduser().is_file():
            problems.append(f"checkpoint {stage.init} does not exist @ {path}.init")
        if stage.teacher_store is not None:
            problems += recipe_problems(recipe, stage, path)
        elif stage.teacher_store_views or stage.teacher_store_topk:
            key = "teacher_store_views" if stage.teacher_store_views else "teacher_store_topk"
            problems.append(f"{key} builds the store teacher_store names, and this stage names none "
                            f"@ {path}.{key}")
        try:  # needs no data: built in full, so that its range checks run too
            build_divergence(stage.divergence, f"{path}.divergence")
        except UserError as exc:
            problems += exc.problems
        registry = get_registry("feature_loss")
        for k, entry in enumerate(stage.feature_losses):
            where = f"{path}.feature_losses[{k}]"
            if entry.name not in registry:
                problems.append(f"{registry.unknown_message(entry.name)} @ {where}.name")
                continue
            try:
                bind(registry.get(entry.name).factory, entry.options, provided={}, path=where,
                     what=f"feature loss {entry.name!r}")
            except UserError as exc:
                problems += exc.problems
        for kind, spec, provided in (("backbone", stage.backbone, DataShape(1).provided()),
                                     ("graph", stage.graph, {"num_submodels": 1}),
                                     ("bridge", stage.bridge, {"student": None})):
            if spec is None:
                continue
            registry = get_registry(kind)
            if spec.name not in registry:
                problems.append(f"{registry.unknown_message(spec.name)} @ {path}.{kind}.name")
                continue
            factory = registry.get(spec.name).factory
            try:
                bind(factory, spec.options, provided=provided, path=f"{path}.{kind}",
                     what=f"{kind} {spec.name!r}")
            except UserError as exc:
                problems += exc.problems
            for key, refs in stage_refs(factory, spec.options).items():
                for ref in refs if isinstance(refs, list) else [refs]:
                    if ref not in names[:index]:
                        problems.append(ref_problem(key, ref, names, index, f"{path}.{kind}"))
    return problems
