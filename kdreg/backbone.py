"""The flexible backbone: what the engine needs to know about a model and no more.

A flexible model holds ``n`` sub-models ordered by size, index 0 the smallest and ``n - 1`` the
full model. Slimmable widths are multi-pass (each width needs its own forward); early-exit
networks are single-pass (one forward yields every exit); a plain network is a flexible model with
``n = 1``.

This module holds the contract (:class:`FlexibleBackbone`, :func:`backbone_problems`) and
:func:`segment_range`; measuring a model (MACs, the parameters its outputs depend on) is
:mod:`kdreg.measure`, copying a sub-model or a front for export is :mod:`kdreg.pruning`, and
split points named by modules are :mod:`kdreg.module_splits`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from kdreg.errors import ExportError, OptionError
from kdreg.measure import count_macs, device_of, macs_depended_on, params_depended_on
from kdreg.pruning import FrontModule, SubmodelModule, pruned_copy

T = TypeVar("T")


class FlexibleBackbone(nn.Module):
    """Base class of every backbone kdreg trains.

    Subclasses set :attr:`submodel_labels` and :attr:`single_pass` and implement
    :meth:`forward_submodel` (multi-pass models) or :meth:`forward` (single-pass models).
    ``forward(x)`` always returns the list of sub-model logits, smallest first.
    """

    #: One label per sub-model, smallest first (``x0.25`` for a width, ``exit3`` for an exit).
    submodel_labels: tuple[str, ...] = ("full",)
    #: True when one forward pass yields every sub-model's logits (early exits, plain networks).
    single_pass: bool = True
    #: Number of input channels and the input resolution the model was built for.
    in_chans: int = 3
    input_size: tuple[int, int] = (32, 32)
    #: The per-channel mean and std (of images in [0, 1]) this model's weights expect, e.g. a
    #: pretrained model's ``pretrained_cfg``; None: the data set's statistics (a model trained here).
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None
    #: Where the model's pretrained weights come from (a timm model and tag, a weights file); None
    #: for a model initialised at random. A stage whose model has them may have ``epochs = 0``
    #: without ``init``: it is evaluated (and may teach later stages), not trained.
    pretrained: str | None = None

    #: Labels of the sub-models one training step trains, when they are not the evaluated ones
    #: (a universally slimmable backbone trains the sandwich of its smallest width, widths drawn
    #: per step and its largest); None: the evaluated ones. In training mode, sub-model ``i`` of
    #: :meth:`forward_submodel` is then the step's ``i``-th, drawn by :meth:`begin_step`.
    train_labels: tuple[str, ...] | None = None

    @property
    def num_submodels(self) -> int:
        return len(self.submodel_labels)

    @property
    def num_train_submodels(self) -> int:
        """Sub-models one training step trains (the teacher graph's nodes): ``train_labels``'s
        count, by default :attr:`num_submodels`."""
        return len(self.train_labels) if self.train_labels is not None else self.num_submodels

    def begin_step(self, seed: int) -> None:
        """Called before each training step with a seed drawn from the stage's streams (the same
        for a step on every process, and again when the run resumes): a backbone whose trained
        sub-models vary per step draws them here from a generator seeded with ``seed``. The
        default trains the same sub-models every step and does nothing."""

    def needs_calibration(self) -> bool:
        """Whether normalisation statistics of the evaluated sub-models must be recomputed on
        training images before they are evaluated (widths trained only as part of a range, whose
        BatchNorm statistics no step kept). The default: False."""
        return False

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every sub-model, smallest first."""
        return [self.forward_submodel(x, i) for i in range(self.num_submodels)]

    def forward_submodel(self, x: Tensor, index: int) -> Tensor:
        """Logits of sub-model ``index`` alone.

        Single-pass models inherit this default, which runs the whole forward pass; multi-pass
        models override it to run only the chosen sub-model.
        """
        if self.single_pass and type(self).forward is not FlexibleBackbone.forward:
            return self.forward(x)[self.check_index(index)]
        raise TypeError(f"{type(self).__name__} must implement forward_submodel or forward")

    def check_index(self, index: int) -> int:
        if not -self.num_submodels <= index < self.num_submodels:
            raise IndexError(
                f"sub-model index {index} out of range: {type(self).__name__} has "
                f"{self.num_submodels} sub-models (0..{self.num_submodels - 1})"
            )
        return index % self.num_submodels

    # ----------------------------------------------------------------- split points (STC, heads)
    def split_points(self) -> tuple[str, ...]:
        """Names of the full model's stage boundaries, input side first (``layer1``, ``layer2``).

        A backbone that names split points implements :meth:`forward_segment`; the front, the back
        and the per-stage features (used by STC and by early-exit heads) derive from it.
        """
        return ()

    def check_split(self, split: str) -> str:
        points = self.split_points()
        if split not in points:
            known = ", ".join(points) if points else "none"
            raise OptionError(
                f"unknown split point {split!r} for {type(self).__name__}; known: {known}"
            )
        return split

    def forward_segment(self, h: Tensor, start: str | None, end: str | None) -> Tensor:
        """Run the full model from split point ``start`` (None: the input image) to ``end``
        (None: the logits). ``start`` must come before ``end``."""
        raise TypeError(f"{type(self).__name__} names no split points")

    def forward_front(self, x: Tensor, split: str) -> Tensor:
        """Features of the full model at split point ``split``."""
        return self.forward_segment(x, None, self.check_split(split))

    def forward_back(self, features: Tensor, split: str) -> Tensor:
        """Logits of the full model computed from the features at ``split`` onwards."""
        return self.forward_segment(features, self.check_split(split), None)

    def ordered_points(self, points: Sequence[str] | None = None) -> list[str]:
        """``points`` (default: every split point), checked to be known and in network order."""
        order = self.split_points()
        wanted = list(order if points is None else points)
        for p in wanted:
            self.check_split(p)
        if [order.index(p) for p in wanted] != sorted(order.index(p) for p in wanted):
            raise OptionError(f"split points {wanted} are not in network order {list(order)}")
        return wanted

    def forward_stages(self, x: Tensor, points: Sequence[str] | None = None) -> tuple[list[Tensor], Tensor]:
        """Features at each of ``points`` (default: every split point) and the full model's logits,
        from one forward pass."""
        return walk_segments(self.forward_segment, x, self.ordered_points(points))

    def feature_submodels(self) -> tuple[int, ...]:
        """Sub-models whose features at the split points :meth:`forward_features` gives (feature
        losses follow the graph edges between them): by default the full model, when the
        backbone names split points; a slimmable backbone gives every width."""
        return (self.num_submodels - 1,) if self.split_points() else ()

    def forward_features(self, x: Tensor, index: int, points: Sequence[str]) -> tuple[list[Tensor], Tensor]:
        """Features of sub-model ``index`` at ``points`` (network order) and its logits, from one
        forward pass. The default serves the full model (:meth:`forward_stages`)."""
        if self.check_index(index) != self.num_submodels - 1:
            raise TypeError(f"{type(self).__name__} gives features of its full model only, "
                            f"not of sub-model {index}")
        return self.forward_stages(x, points)

    def feature_shapes(self, input_size: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
        """Shape ``(C, H, W)`` (or ``(tokens, C)``) of the features at every split point."""
        feats = self.probe(lambda x: self.forward_stages(x)[0], input_size, batch=2)
        return {p: tuple(f.shape[1:]) for p, f in zip(self.split_points(), feats)}

    def probe(self, fn: Callable[[Tensor], T], input_size: Sequence[int] | None = None, batch: int = 1) -> T:
        """``fn(zeros)`` on a zero batch at ``input_size`` (default: the model's), in eval mode
        without gradients, restoring the training mode after; for counting and shape checks."""
        h, w = input_size or self.input_size
        x = torch.zeros(batch, self.in_chans, h, w, device=device_of(self))
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn(x)
        finally:
            self.train(was_training)

    # ----------------------------------------------------------------- counting
    def count_params(self) -> list[int]:
        """Parameters each sub-model uses at inference (for early exits: cumulative).

        The default suits a plain network (every parameter belongs to its only sub-model) and any
        single-pass model: sub-model ``i`` counts the parameters its logits depend on, read from
        the autograd graph of one forward pass on a probe batch (see
        :func:`kdreg.measure.params_depended_on`). Multi-pass models with several sub-models
        override it (a width uses a slice of a shared weight, which the graph does not show), and
        so does a single-pass model that runs part of its forward under ``no_grad`` (or that
        counts earlier exits' heads too, as MSDNet does).
        """
        if self.num_submodels == 1:
            return [sum(p.numel() for p in self.parameters())]
        if not self.single_pass:
            raise TypeError(f"{type(self).__name__} is multi-pass with {self.num_submodels} "
                            "sub-models and must implement count_params")
        return params_depended_on(self, self.forward)

    def count_macs(self, input_size: Sequence[int] | None = None) -> list[int]:
        """Multiply-accumulates of one image through each sub-model (cumulative for exits).

        The default runs :meth:`forward_submodel` once per sub-model; for a single-pass model that
        only implements :meth:`forward`, sub-model ``i`` counts the operations its logits depend
        on in one forward pass (see :func:`kdreg.measure.macs_depended_on`).
        """
        if (self.single_pass and self.num_submodels > 1
                and type(self).forward_submodel is FlexibleBackbone.forward_submodel):
            return macs_depended_on(self, self.forward, input_size)
        return self.probe(lambda x: [count_macs(lambda i=i: self.forward_submodel(x, i))
                                     for i in range(self.num_submodels)], input_size)

    # ----------------------------------------------------------------- export
    def export_submodel(self, index: int) -> nn.Module:
        """Sub-model ``index`` as a standalone network (``kdreg export``): an ``nn.Module`` in
        eval mode whose ``forward(x)`` returns that sub-model's logits, as
        ``forward_submodel(x, index)`` does, and that holds the parameters
        ``count_params()[index]`` counts (for an early exit: everything up to it, the earlier
        exits' heads included, though only its own head runs).

        The default serves a model with one sub-model: a deep copy of itself
        (:class:`kdreg.pruning.SubmodelModule`). A single-pass model whose ``forward_submodel``
        runs only up to the chosen exit returns :func:`kdreg.pruning.truncated_copy`; the
        slimmable backbones build plain layers holding their width's slices. Any other model
        raises :class:`kdreg.errors.ExportError`.
        """
        index = self.check_index(index)
        if self.num_submodels == 1:
            return SubmodelModule(copy.deepcopy(self), index).eval()
        raise ExportError(
            f"{type(self).__name__} cannot export one of its {self.num_submodels} sub-models as a "
            "standalone network: it does not implement export_submodel(index)")

    def export_front(self, split: str) -> nn.Module:
        """The full model up to split point ``split`` as a standalone module in eval mode whose
        ``forward(x)`` returns the features there, as ``forward_front(x, split)`` does, holding
        only what they use (the ``exits`` backbone exports an exit as its trunk's front and the
        exit's head). The default is a copy with the modules after ``split`` left out
        (:func:`kdreg.pruning.pruned_copy`)."""
        self.check_split(split)
        return FrontModule(pruned_copy(self, lambda m, x: m.forward_front(x, split)), split).eval()


def backbone_problems(model: FlexibleBackbone) -> list[str]:
    """What ``model`` lacks of the backbone contract (hook ``kdreg_register_backbones``), one line
    per problem; empty when kdreg can train, evaluate and count it."""
    cls = type(model)
    base = FlexibleBackbone
    problems = []
    labels = getattr(model, "submodel_labels", None)
    if (not isinstance(labels, tuple) or not labels
            or not all(isinstance(label, str) and label for label in labels)):
        problems.append(f"submodel_labels must be a non-empty tuple of strings, got {labels!r}")
    elif len(set(labels)) != len(labels) or any(":" in label for label in labels):
        problems.append(f"submodel_labels {labels!r} must be distinct and contain no ':' "
                        "(external teacher nodes are named 'stage:label')")
    single = getattr(model, "single_pass", None)
    if not isinstance(single, bool):
        problems.append(f"single_pass must be True or False, got {single!r}")
    elif single and cls.forward is base.forward and cls.forward_submodel is base.forward_submodel:
        problems.append("a single-pass backbone must implement forward(x) (the list of every "
                        "sub-model's logits, smallest first)")
    elif not single and cls.forward_submodel is base.forward_submodel:
        problems.append("a multi-pass backbone must implement forward_submodel(x, index)")
    elif (not single and isinstance(labels, tuple) and len(labels) > 1
          and cls.count_params is base.count_params):
        problems.append("a multi-pass backbone with several sub-models must implement "
                        "count_params() (parameters per sub-model, smallest first)")
    try:
        points = model.split_points()
    except Exception as exc:  # noqa: BLE001 - the plugin's code; reported, not raised
        problems.append(f"split_points() raised {type(exc).__name__}: {exc}")
    else:
        if points and cls.forward_segment is base.forward_segment:
            problems.append(f"it names split points {tuple(points)} but does not implement "
                            "forward_segment(h, start, end)")
    return problems


def walk_segments(segment: Callable[[Tensor, str | None, str | None], Tensor], x: Tensor,
                  points: Sequence[str]) -> tuple[list[Tensor], Tensor]:
    """The features at ``points`` (in network order) and the logits, from one pass of
    ``segment(h, start, end)`` from the image (``start`` None) through each point to the logits
    (``end`` None)."""
    feats, h, start = [], x, None
    for p in points:
        h = segment(h, start, p)
        feats.append(h)
        start = p
    return feats, segment(h, start, None)


def segment_range(points: Sequence[str], start: str | None, end: str | None) -> tuple[int, int]:
    """Stage indices ``[i, j)`` to run from split point ``start`` to ``end`` (None: input/logits).

    Stage ``k`` produces the features at ``points[k]``; ``start`` must come before ``end``.
    """
    for p in (start, end):
        if p is not None and p not in points:
            raise OptionError(f"unknown split point {p!r}; known: {', '.join(points)}")
    i = 0 if start is None else points.index(start) + 1
    j = len(points) if end is None else points.index(end) + 1
    if end is not None and j <= i:
        raise OptionError(f"split point {start!r} does not come before {end!r}")
    return i, j
