"""An example kdreg plugin: one backbone, one teacher graph, one divergence and one feature loss.

kdreg finds this module through the entry point ``kdreg_example`` (group ``kdreg``) of the
distribution ``kdreg-example-plugin`` and calls its ``@kdreg.hookimpl`` functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import kdreg
from kdreg.errors import OptionError
from kdreg.feature_loss import FeatureBatch, FeatureLoss, FeatureSetup
from kdreg.hookspecs import Register


class TwoExitMLP(kdreg.FlexibleBackbone):
    """A two-exit MLP: ``early`` reads the first hidden layer, ``final`` the second.

    It implements only what the backbone hook spec asks of a single-pass model:
    ``submodel_labels``, ``single_pass = True`` and ``forward`` returning the logits of every
    sub-model, smallest first. kdreg derives its parameter and MAC counts per exit.
    """

    submodel_labels = ("early", "final")
    single_pass = True

    def __init__(self, num_classes: int, features: int, hidden: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU())
        self.early = nn.Linear(hidden, num_classes)
        self.body = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.final = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.stem(x)
        return [self.early(h), self.final(self.body(h))]


def two_exit_mlp(*, num_classes: int, in_chans: int, input_size: tuple[int, int],
                 hidden: int = 64) -> TwoExitMLP:
    """A two-exit MLP (early, final) on the flattened image."""
    if hidden < 1:
        raise OptionError(f"hidden must be at least 1, got {hidden}", key="hidden")
    features = in_chans * input_size[0] * input_size[1]
    return TwoExitMLP(num_classes, features, hidden)


def from_final(num_submodels: int, weight: float = 1.0) -> kdreg.TeacherGraph:
    """Every sub-model taught by the final (largest) one."""
    if weight <= 0:
        raise OptionError(f"weight must be positive, got {weight}", key="weight")
    n = num_submodels
    edges = tuple(kdreg.Edge(i, n - 1, weight) for i in range(n - 1))
    return kdreg.TeacherGraph(n, edges, name="example-from-final")


class JensenShannon(kdreg.Divergence):
    """tau^2 JS(p_t, p_s): the Jensen-Shannon divergence of the softened distributions, batch mean.

    It implements the divergence hook spec's ``__call__``; ``labels`` and ``epoch`` go unused.
    """

    def __call__(self, student: Tensor, teacher: Tensor, *, tau: float, labels: Tensor,
                 epoch: int | None = None) -> Tensor:
        log_ps, log_pt = (student / tau).log_softmax(-1), (teacher / tau).log_softmax(-1)
        log_m = torch.logaddexp(log_ps, log_pt) - math.log(2.0)     # log of their mean
        kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
        kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
        return tau * tau * (0.5 * (kl_t + kl_s)).mean()


def jensen_shannon() -> JensenShannon:
    """tau^2 Jensen-Shannon divergence between teacher and student."""
    return JensenShannon()


class PooledCosine(FeatureLoss):
    """``mean_b (1 - cos(W s_b, t_b))``: the student's globally pooled features, mapped to the
    teacher's width by a linear connector of its own, pointed the teacher's way (one point).

    It implements the feature-loss hook spec: ``setup`` builds the connector from the feature
    shapes (so it trains with the student and is saved with it), ``forward`` returns the scalar.
    """

    default_weight = 1.0

    def setup(self, info: FeatureSetup) -> None:
        if len(info.student) != 1:
            raise OptionError(f"example-cosine reads one point, got {len(info.student)}")
        self.connector = nn.Linear(info.student[0][0], info.teacher[0][0], bias=False)

    def forward(self, student: list[Tensor], teacher: list[Tensor], batch: FeatureBatch) -> Tensor:
        s = self.connector(student[0].flatten(2).mean(-1))
        t = teacher[0].flatten(2).mean(-1)
        return (1.0 - torch.nn.functional.cosine_similarity(s, t, dim=1)).mean()


def pooled_cosine() -> PooledCosine:
    """1 - cosine similarity of globally pooled features, through a linear connector."""
    return PooledCosine()


@kdreg.hookimpl
def kdreg_register_backbones(register: Register) -> None:
    register("example_two_exit_mlp", two_exit_mlp)


@kdreg.hookimpl
def kdreg_register_graphs(register: Register) -> None:
    register("example-from-final", from_final)


@kdreg.hookimpl
def kdreg_register_divergences(register: Register) -> None:
    register("example-js", jensen_shannon)


@kdreg.hookimpl
def kdreg_register_feature_losses(register: Register) -> None:
    register("example-cosine", pooled_cosine)
