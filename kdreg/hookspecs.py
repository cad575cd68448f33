"""Every extension point of kdreg, as pluggy hook specifications.

A plugin is a module (or object) with functions named after these specs and decorated with
``kdreg.hookimpl``. Register it through the entry-point group ``kdreg`` in your package's
``pyproject.toml``::

    [project.entry-points.kdreg]
    my_plugin = "my_package.kdreg_plugin"

The ``kdreg_register_*`` hooks receive a ``register(name, factory, description="")`` closure.
Call it once per name; a name registered twice (by you or by another plugin) is an error that names
both plugins. Factories are called with keyword arguments taken from the recipe; kdreg checks those
options against the factory's signature and type annotations before calling it, so a factory
should declare every option as a typed keyword parameter with a default where one makes sense, and
raise :class:`kdreg.errors.OptionError` (naming the option in ``key``) for a value out of range.

Built-in plugins live in ``kdreg_plugins`` and are registered exactly this way.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "kdreg"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kdreg_register_backbones(register: Any) -> None:
    """Register flexible backbones.

    ``register(name, factory, description="")`` where ``factory(*, num_classes: int, in_chans: int,
    input_size: tuple[int, int], **options) -> kdreg.FlexibleBackbone``. ``num_classes``,
    ``in_chans`` and ``input_size`` come from the data; the other keyword options come from the
    recipe's ``backbone = { name = ..., ... }`` table. A factory that does not need ``in_chans`` or
    ``input_size`` may accept ``**_`` for them. The returned module's ``forward(x)`` must return the
    list of sub-model logits, smallest sub-model first.

    A factory that builds on a model trained in an earlier stage of the same recipe (for example an
    early-exit wrapper around a frozen teacher) declares a parameter annotated as
    ``kdreg.StageRef``; the engine passes a trainable copy of that stage's backbone, whose weights
    it sets to the stage's trained ones before the new stage trains (freeze it yourself if it must
    stay fixed).
    """


@hookspec
def kdreg_register_graphs(register: Any) -> None:
    """Register teacher graphs.

    ``register(name, factory, description="")`` where ``factory(num_submodels: int, **options) ->
    kdreg.TeacherGraph``. The graph says which sub-model teaches which, with what weight; see
    ``kdreg.graph.TeacherGraph``. Options come from the recipe's ``graph = { name = ..., ... }``.

    A graph may be taught by frozen earlier stages: declare the option annotated as
    ``kdreg.StageRef`` (or ``list[kdreg.StageRef]``); the recipe gives the stage's name and the
    factory receives a ``kdreg.TeacherStage`` (``name``, ``model``, ``submodel_labels``). Its
    outputs are external nodes named by ``stage.node(index)`` (``"teacher:full"``); list them in
    ``TeacherGraph(..., external=...)`` and use them as edge teachers. The engine runs those stages
    in eval mode under ``no_grad`` on the same augmented batch as the student, once per batch, and
    passes their logits to the loss.
    """


@hookspec
def kdreg_register_bridges(register: Any) -> None:
    """Register collaboration bridges (student-teacher collaboration, STC).

    ``register(name, factory, description="")`` where ``factory(*, student, teacher, **options)
    -> kdreg.Bridge``. ``student`` is the stage's ``FlexibleBackbone`` (one sub-model); declare
    ``teacher`` annotated as ``kdreg.StageRef``: it receives the frozen earlier stage as a
    ``kdreg.TeacherStage``. The bridge sets ``teacher`` (the stage's name), ``student_split`` (a
    split point of the student) and ``alpha``; each step the engine takes the student's features
    at ``student_split`` from the forward pass that gives its logits, calls
    ``bridge(features, kdreg.BridgeBatch(labels, teacher_logits, tau))`` for the bridge's loss
    term and trains on ``alpha * L_bridge + (1 - alpha) * L_graph``. The bridge's own parameters
    (an adapter) are trained with the student's; never register the teacher as a submodule.
    Raise ``kdreg.errors.OptionError`` (with ``key``) for an unknown split point or for feature
    shapes no adapter can join: ``kdreg validate`` reports it.
    """


@hookspec
def kdreg_register_datasets(register: Any) -> None:
    """Register data sources.

    ``register(name, factory, description="")`` where ``factory(*, root: pathlib.Path, **options)
    -> kdreg.data.ImageData`` returns decoded images as uint8 tensors ``[N, C, H, W]`` with integer
    labels, the class names and the normalisation statistics. kdreg does the validation split,
    subsetting, batching and augmentation. A missing or malformed folder should raise
    ``kdreg.errors.DataError`` saying what was expected where.

    A data source whose images always have the same shape declares it,
    ``register(name, factory, description, shape=(num_classes, channels, height, width))``, so that
    ``kdreg validate`` can build the recipe's models when the data itself cannot be read.
    """


@hookspec
def kdreg_run_started(run: Any) -> None:
    """A run starts. ``run`` has ``recipe``, ``directory`` (a ``pathlib.Path``), ``device`` and
    ``plans`` (one per stage, in order: ``name``, ``model``, ``graph``, ``teachers``, ``bridge``)."""


@hookspec
def kdreg_epoch_finished(run: Any, stage: str, record: dict[str, Any]) -> None:
    """An epoch of stage ``stage`` finished; ``record`` is the line written to metrics.jsonl."""


@hookspec
def kdreg_stage_finished(run: Any, stage: str, result: dict[str, Any]) -> None:
    """Stage ``stage`` finished; ``result`` is its entry in results.json."""


@hookspec
def kdreg_run_finished(run: Any, results: dict[str, Any]) -> None:
    """The run finished; ``results`` is what was written to results.json."""
