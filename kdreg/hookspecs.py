"""Every extension point of kdreg, as pluggy hook specifications.

A plugin is a module (or object) with functions named after these specs and decorated with
``kdreg.hookimpl``. Register it through the entry-point group ``kdreg`` in your package's
``pyproject.toml``::

    [project.entry-points.kdreg]
    my_plugin = "my_package.kdreg_plugin"

The ``kdreg_register_*`` hooks receive a :class:`Register` callable,
``register(name, factory, description="", *, shape=None)``. Call it once per name; a name
registered twice (by you or by another plugin) is an error that names both plugins. Factories are
called with keyword arguments taken from the recipe; kdreg checks those options against the
factory's signature and type annotations before calling it, so a factory should declare every
option as a typed keyword parameter with a default where one makes sense, and raise
:class:`kdreg.errors.OptionError` (naming the option in ``key``) for a value out of range. What a
factory returns is checked too: a wrong type or a broken contract is reported with the plugin
and its distribution.

A decorated function whose name matches no spec here (a misspelled hook) is an error, as is an
undecorated function named like a hook. The run events receive a :class:`RunInfo`.

Besides these contracts a plugin may use :mod:`kdreg.process` (rank, world size, ``is_main``,
``broadcast`` and the other collectives under torchrun), :mod:`kdreg.pointwise` (the strided 1x1
convolution that avoids a broken CPU kernel) and :mod:`kdreg.weight_decay` (which parameters
weight decay exempts); never ``kdreg.engine``, whose internals are not part of the contract.

Built-in plugins live in ``kdreg_plugins`` and are registered exactly this way. The plugin
author's guide is ``docs/plugins.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    import torch

    from kdreg.backbone import FlexibleBackbone
    from kdreg.bridge import Bridge
    from kdreg.divergence import Divergence
    from kdreg.graph import TeacherGraph
    from kdreg.recipe import Recipe

PROJECT = "kdreg"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """What the ``kdreg_register_*`` hooks receive: records one factory under a name."""

    def __call__(self, name: str, factory: Callable[..., Any], description: str = "", *,
                 shape: tuple[int, int, int, int] | None = None) -> None:
        """Register ``factory`` as ``name``.

        ``description`` is the one line ``kdreg list`` shows (default: the first line of the
        factory's docstring). ``shape`` is for datasets only: ``(num_classes, channels, height,
        width)`` of their images.
        """


class StageInfo(Protocol):
    """One stage of a run, as run events see it (read it, do not change it)."""

    @property
    def name(self) -> str: ...

    @property
    def model(self) -> FlexibleBackbone: ...

    @property
    def graph(self) -> TeacherGraph: ...

    @property
    def teachers(self) -> Mapping[str, FlexibleBackbone]:
        """The frozen earlier stages this stage learns from, by name."""

    @property
    def bridge(self) -> Bridge | None: ...

    @property
    def divergence(self) -> Divergence:
        """What is distilled along each edge of the stage's graph."""


class RunInfo(Protocol):
    """A run, as run events see it (read it, do not change it)."""

    @property
    def recipe(self) -> Recipe:
        """The resolved recipe (``kdreg.recipe.Recipe``: ``name``, ``seed``, ``data``, ``train``,
        ``stages``)."""

    @property
    def directory(self) -> Path:
        """The run directory (``recipe.toml``, ``results.json``, ``checkpoints/`` and what the
        loggers write, ``metrics.jsonl`` by default)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def plans(self) -> Sequence[StageInfo]:
        """Every stage, in recipe order."""


@hookspec
def kdreg_register_backbones(register: Register) -> None:
    """Register flexible backbones.

    ``register(name, factory, description="")`` where ``factory(*, num_classes: int, in_chans: int,
    input_size: tuple[int, int], **options) -> kdreg.FlexibleBackbone``. ``num_classes``,
    ``in_chans`` and ``input_size`` come from the data; the other keyword options come from the
    recipe's ``backbone = { name = ..., ... }`` table. A factory that does not need ``in_chans`` or
    ``input_size`` may accept ``**_`` for them. kdreg sets the model's ``in_chans`` and
    ``input_size`` attributes to those values after the factory returns.

    The returned model is an ``nn.Module`` subclassing ``kdreg.FlexibleBackbone`` with

    - ``submodel_labels``: a non-empty tuple of distinct strings without ``:``, one per sub-model,
      smallest first (``("x0.5", "x1.0")``, ``("exit1", "final")``); a class attribute or set in
      ``__init__``;
    - ``single_pass``: ``True`` when one forward pass yields every sub-model's logits (early exits,
      a plain network), ``False`` when each sub-model needs its own pass (slimmable widths);
    - a single-pass model implements ``forward(x)``, returning the list of every sub-model's
      logits (``[batch, num_classes]`` each), smallest first; it may also implement
      ``forward_submodel(x, index)`` to run one sub-model alone;
    - a multi-pass model implements ``forward_submodel(x, index)`` (the logits of sub-model
      ``index`` alone), and, with more than one sub-model, ``count_params()``: the parameters
      each sub-model uses, smallest first.

    Everything else has a default. ``count_params()`` of a single-pass model counts, per
    sub-model, the parameters its logits depend on (read from the autograd graph of one forward
    pass on a probe batch); ``count_macs()`` counts the multiply-accumulates the same way (or by
    running ``forward_submodel`` where the model implements it). Override them for another
    convention (MSDNet counts every earlier exit's head) or when part of the forward runs under
    ``no_grad``. A backbone that names split points (``split_points()``, for bridges and the
    ``exits`` backbone) implements ``forward_segment(h, start, end)``. kdreg checks all this when
    the factory returns and reports what is missing with the plugin and its distribution.

    ``kdreg export`` asks the model for ``export_submodel(index)``: sub-model ``index`` as a
    standalone ``nn.Module`` in eval mode whose ``forward(x)`` returns that sub-model's logits and
    that holds the parameters ``count_params()[index]`` counts (it must trace with
    ``torch.export``). The default serves a model with one sub-model (a deep copy of itself) and
    raises ``kdreg.errors.ExportError`` for others; an early-exit model whose
    ``forward_submodel`` stops at the chosen exit returns
    ``kdreg.pruning.truncated_copy(self, index)`` (with a ``run`` that evaluates every exit up to
    ``index`` where it counts earlier heads, as MSDNet does); the slimmable backbones build
    plain layers holding their width's slices. A trunk's ``export_front(split)`` (the features at a split point,
    for exits on it) defaults to a copy without the modules after ``split``.

    A factory that builds on a model trained in an earlier stage of the same recipe (for example an
    early-exit wrapper around a frozen teacher) declares a parameter annotated as
    ``kdreg.StageRef``; the engine passes a trainable copy of that stage's backbone, whose weights
    it sets to the stage's trained ones before the new stage trains (freeze it yourself if it must
    stay fixed).
    """


@hookspec
def kdreg_register_graphs(register: Register) -> None:
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
def kdreg_register_bridges(register: Register) -> None:
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
def kdreg_register_datasets(register: Register) -> None:
    """Register data sources.

    ``register(name, factory, description="")`` where ``factory(*, root: pathlib.Path, **options)``
    returns one of two things:

    - ``kdreg.data.ImageData``: decoded images as uint8 tensors ``[N, C, H, W]`` with integer
      labels, the class names and the normalisation statistics (the in-memory path: the images
      move to the training device once and are augmented there; for small sets of one size);
    - ``kdreg.data.ImageStream``: readers of encoded images (timm's dataset reader interface:
      ``len(reader)``, ``reader[i] -> (path, open file, bytes or PIL image, label)``, optionally
      ``reader.filename(i)``) for ``train`` and ``test``, every image's label in reader order, the
      class names, the statistics (default ImageNet's), and optionally ``decode`` (the whole set
      as ``ImageData``) and ``image_size`` (when all images have one size). The streamed path
      opens one image at a time in DataLoader worker processes, each torchrun process its own
      shard; images may have any size.

    kdreg does the validation split, subsetting, batching, augmentation and normalisation (each
    model normalises its own input). A missing or malformed folder should raise
    ``kdreg.errors.DataError`` saying what was expected where. A factory that declares
    ``in_memory`` learns the recipe's ``data.in_memory`` (``True``, ``False`` or ``"auto"``;
    ``False`` when the recipe's augmentation needs the streamed path) and may decode only when it
    is not ``False``.

    A data source whose images always have the same shape declares it,
    ``register(name, factory, description, shape=(num_classes, channels, height, width))``, so that
    ``kdreg validate`` can build the recipe's models when the data itself cannot be read.
    """


@hookspec
def kdreg_register_divergences(register: Register) -> None:
    """Register divergences: what is distilled along each edge of a teacher graph.

    ``register(name, factory, description="")`` where ``factory(**options) ->
    kdreg.divergence.Divergence``. Options come from the recipe's ``divergence = { name = ...,
    ... }`` (a stage's ``divergence = "name"`` gives none); declare each as a typed keyword
    parameter with a default, and raise ``kdreg.errors.OptionError`` (with ``key``) for a weight
    or other value out of range: ``kdreg validate`` reports it as ``... @
    recipe.stages.<stage>.divergence.<key>``.

    The returned object subclasses ``kdreg.divergence.Divergence`` and implements

    ``__call__(student, teacher, *, tau, labels, epoch=None) -> Tensor``

    - ``student``: the student sub-model's logits ``[B, C]``, fp32 (autocast is off);
    - ``teacher``: the teacher's logits ``[B, C]``, fp32, detached (an internal sub-model or a
      frozen earlier stage; the loss never sends gradient into a teacher);
    - ``tau``: the stage's temperature (``tau`` of the recipe's stage), > 0;
    - ``labels``: the batch's targets, class indices ``[B]`` or soft targets ``[B, C]`` under
      mixup / CutMix (``kdreg.divergence.hard_targets`` gives the dominant class);
    - ``epoch``: the 1-based epoch being trained (constant within an epoch), or None outside
      training (evaluate the method at full strength: a warm-up counts as over);

    and returns the edge's loss: a scalar tensor, the batch mean of a per-sample term (or, for a
    method defined on the batch, its value over this process's batch), that depends on
    ``student``. kdreg calls the factory's result once on a probe batch when it is built and
    reports a wrong type, a non-scalar, a non-finite value or one without gradient.

    The stage's loss puts it inside one rule, for every edge ``(t, w)`` of sub-model ``i``:
    ``L_i = (1 - lam) CE(a_i, y) + lam * sum_(t, w) w * D(a_i, sg(a_t))``. A method whose paper
    adds its own cross-entropy keeps that term out of ``D`` (the rule has it, weighted by ``1 -
    lam``); its own weights between its terms (DKD's alpha and beta, DIST's beta and gamma) and
    schedules (DKD's warm-up) belong to ``D``. The same object serves every edge of a stage: keep
    no state between calls.

    The built-in ``kl`` and ``ce`` (``kdreg.losses.SoftmaxKD``) are computed for all internal
    edges at once; every other divergence is called once per edge.
    """


@hookspec
def kdreg_register_feature_losses(register: Register) -> None:
    """Register feature losses: what is distilled between features at split points.

    ``register(name, factory, description="")`` where ``factory(**options) ->
    kdreg.feature_loss.FeatureLoss``. A stage names them in ``feature_losses = [{ name = ...,
    points = [...], weight = ..., <options> }]``; every key but ``name``, ``points``,
    ``student_points``, ``teacher_points`` and ``weight`` is passed to the factory. Declare each
    option as a typed keyword parameter with a default, and raise ``kdreg.errors.OptionError``
    (with ``key``) for a value out of range: ``kdreg validate`` reports it as ``... @
    recipe.stages.<stage>.feature_losses[k].<key>``.

    The factory is called once per teacher-graph edge the entry follows (an edge whose student
    and teacher both expose features at the points). The returned object subclasses
    ``kdreg.feature_loss.FeatureLoss`` (an ``nn.Module``) and implements

    - ``setup(info)``, called once before training with a ``kdreg.feature_loss.FeatureSetup``:
      ``student`` and ``teacher``, the feature shapes at the paired points (without the batch
      dimension), ``num_samples`` and ``train_labels`` of the training set, ``num_classes``.
      Build the parameters and buffers the method owns here (a connector, embeddings, a memory
      bank); raise ``kdreg.errors.OptionError`` for shapes it cannot join (e.g. channels that
      differ, for a method without a connector);
    - ``forward(student, teacher, batch) -> Tensor``: ``student`` and ``teacher`` are lists of
      ``[B, ...]`` fp32 features (autocast is off), one per paired point, the teacher's detached;
      ``batch`` is a ``kdreg.feature_loss.FeatureBatch`` (``labels``, ``indices``, ``epoch``).
      It returns the edge's loss, a scalar that depends on ``student``, without the entry's
      weight.

    Class attributes: ``default_weight`` (the entry's ``weight`` when the recipe gives none: the
    paper's) and ``needs_indices`` (True when ``forward`` reads ``batch.indices``, each sample's
    index in the training set; a data source that cannot give them is refused).

    The term enters the student's loss as ``weight * w * F(phi_s, sg(phi_t))`` for every edge
    ``(t, w)`` the entry follows, beside the rule ``(1 - lam) CE + lam * sum w * D``. Its
    parameters train with the student, are saved and resumed with it and are never exported.
    """


@hookspec
def kdreg_run_started(run: RunInfo) -> None:
    """A run starts. ``run`` has ``recipe``, ``directory`` (a ``pathlib.Path``), ``device`` and
    ``plans`` (one per stage, in order: ``name``, ``model``, ``graph``, ``teachers``, ``bridge``,
    ``divergence``)."""


@hookspec
def kdreg_epoch_finished(run: RunInfo, stage: str, record: dict[str, Any]) -> None:
    """An epoch of stage ``stage`` finished and its checkpoint is saved; ``record`` holds the
    epoch's metrics (``epoch``, ``train_loss``, ``lr``, ``train_accuracy`` and ``val_accuracy`` per
    sub-model, ``mean_val_accuracy``, ``best_epoch``, ``seconds``...). The built-in loggers write it
    (``metrics.jsonl``, CSV, TensorBoard); a stage that resumes sends the epochs after its
    checkpoint again."""


@hookspec
def kdreg_stage_finished(run: RunInfo, stage: str, result: dict[str, Any]) -> None:
    """Stage ``stage`` finished; ``result`` is its entry in results.json."""


@hookspec
def kdreg_run_finished(run: RunInfo, results: dict[str, Any]) -> None:
    """The run finished; ``results`` is what was written to results.json."""
