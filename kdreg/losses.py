"""Cross-entropy, knowledge distillation and the teacher-graph loss (ipkd-ta eq. 1-7).

    L   = sum_i L_i
    L_i = CE(a_i, y)                                                   if i has no teachers
    L_i = (1 - lam) CE(a_i, y) + lam sum_{(t, w) in T_i} w D(a_i, sg(a_t))   otherwise

``D`` is the stage's divergence (:class:`kdreg.divergence.Divergence`, a registered name or
object). The built-in ``kl`` and ``ce`` are :class:`SoftmaxKD`:
``KD_kl = tau^2 KL(softmax(a_t/tau) || softmax(a_s/tau))`` and
``KD_ce = tau^2 H(softmax(a_t/tau), softmax(a_s/tau))``, computed for every internal edge at once
(one einsum); any other divergence is called once per edge. Every per-sample term is averaged
over the batch (batch mean), never over classes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdreg.create import create
from kdreg.divergence import Divergence, standardise
from kdreg.graph import TeacherGraph
from kdreg.registry import Registry, get_registry

DIVERGENCES = ("kl", "ce")


@contextlib.contextmanager
def fp32(like: Tensor) -> Iterator[None]:
    """Autocast off on ``like``'s device: a loss is computed in fp32 whatever the step's precision
    (under bf16 autocast an einsum or a matmul would otherwise run in bf16)."""
    with torch.autocast(device_type=like.device.type, enabled=False):
        yield


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """CE(a, y), batch mean (ipkd-ta eq. 1), in fp32; ``labels`` are class indices ``[B]`` or
    soft targets ``[B, C]`` (mixup / CutMix)."""
    with fp32(logits):
        return batch_cross_entropy(logits.float()[None], labels)[0]


def batch_cross_entropy(a: Tensor, labels: Tensor) -> Tensor:
    """``[n]``: CE of each of ``n`` sub-models' logits ``a`` ``[n, B, C]``, batch means. The graph
    loss and a single sub-model's loss both compute CE here, in the same operations, so that one
    sub-model trained either way gives the same bits on every CPU (``reduction="mean"`` sums in
    another order than the mean of the per-sample terms, and rounds differently on AVX2 and AVX-512)."""
    n, batch = a.shape[:2]
    targets = labels.repeat(n) if labels.dim() == 1 else labels.float().repeat(n, 1)  # mixed: [B, C]
    return F.cross_entropy(a.flatten(0, 1), targets, reduction="none").view(n, batch).mean(1)


def kd_loss(student: Tensor, teacher: Tensor, *, tau: float, divergence: str = "kl") -> Tensor:
    """tau^2 KL(p_t || p_s) (``kl``) or tau^2 H(p_t, p_s) (``ce``), batch mean.

    The teacher's logits are used as given; detach them to stop gradients (the graph loss does).
    """
    _check_divergence(divergence)
    with fp32(student):
        log_ps = F.log_softmax(student.float() / tau, dim=-1)
        log_pt = F.log_softmax(teacher.float() / tau, dim=-1)
        pt = log_pt.exp()
        per_sample = (pt * ((log_pt if divergence == "kl" else 0.0) - log_ps)).sum(-1)
        return tau * tau * per_sample.mean()


class SoftmaxKD(Divergence):
    """``kl``: tau^2 KL(p_t || p_s); ``ce``: tau^2 H(p_t, p_s); batch mean, p = softmax(a / tau).

    With ``standardise``, both logits are z-scored per sample first (logit standardisation, Sun
    et al. CVPR 2024: :func:`kdreg.divergence.standardise`), then divided by ``tau``. The graph loss
    computes it for every internal edge at once.
    """

    def __init__(self, kind: str = "kl", *, standardise: bool = False):
        _check_divergence(kind)
        self.kind = kind
        self.standardise = standardise

    def __call__(self, student: Tensor, teacher: Tensor, *, tau: float, labels: Tensor | None = None,
                 epoch: int | None = None) -> Tensor:
        if self.standardise:
            with fp32(student):
                student, teacher = standardise(student), standardise(teacher)
        return kd_loss(student, teacher, tau=tau, divergence=self.kind)

    def __repr__(self) -> str:
        return f"SoftmaxKD({self.kind!r}, standardise={self.standardise})"


_defaults: dict[str, tuple[Registry, Divergence]] = {}


def as_divergence(divergence: str | Divergence) -> Divergence:
    """``divergence`` itself, or the registered divergence of that name built with its defaults
    (raises :class:`kdreg.registry.UnknownNameError` for an unknown name)."""
    if isinstance(divergence, Divergence):
        return divergence
    if not isinstance(divergence, str):
        raise TypeError(f"divergence must be a registered name or a kdreg.divergence.Divergence, "
                        f"got {type(divergence).__name__}")
    registry = get_registry("divergence")
    cached = _defaults.get(divergence)
    if cached is not None and cached[0] is registry:
        return cached[1]
    built: Divergence = create("divergence", divergence, {}, provided={}, path="divergence")
    _defaults[divergence] = (registry, built)
    return built


def edge_loss(divergence: Divergence, student: Tensor, teacher: Tensor, *, tau: float,
              labels: Tensor, epoch: int | None) -> Tensor:
    """``D(a_s, sg(a_t))`` of one edge, in fp32 (the teacher detached)."""
    with fp32(student):
        return divergence(student.float(), teacher.detach().float(), tau=tau, labels=labels, epoch=epoch)


def submodel_loss(
    index: int,
    logits: Tensor,
    labels: Tensor,
    graph: TeacherGraph,
    teachers: Mapping[int | str, Tensor],
    *,
    lam: float,
    tau: float,
    divergence: str | Divergence = "kl",
    epoch: int | None = None,
) -> Tensor:
    """L_i of one sub-model; ``teachers`` holds (detached) teacher logits by node; ``epoch`` (the
    1-based epoch being trained) reaches divergences with a warm-up."""
    div = as_divergence(divergence)
    edges = graph.teachers_of(index)
    ce = cross_entropy(logits, labels)
    if not edges:
        return ce
    kd = sum(w * edge_loss(div, logits, teachers[t], tau=tau, labels=labels, epoch=epoch) for t, w in edges)
    return (1.0 - lam) * ce + lam * kd


def distillation_loss(
    logits: Sequence[Tensor],
    labels: Tensor,
    graph: TeacherGraph,
    *,
    lam: float,
    tau: float,
    divergence: str | Divergence = "kl",
    external: Mapping[str, Tensor] | None = None,
    epoch: int | None = None,
) -> Tensor:
    """The scalar L of the teacher graph over all sub-models, vectorised over edges for ``kl`` and
    ``ce``.

    ``logits`` is ordered smallest -> largest, each ``[B, C]``; ``external`` holds the logits of
    frozen teachers by node name. Teachers are detached: no KD term sends gradient into them.
    ``divergence`` names a registered divergence (built with its defaults) or is one
    (:class:`kdreg.divergence.Divergence`); ``epoch``, the 1-based epoch being trained, reaches
    divergences with a warm-up (None: warmed up).
    """
    div = as_divergence(divergence)
    n = len(logits)
    if n != graph.num_submodels:
        raise ValueError(f"{n} logits given for a graph over {graph.num_submodels} sub-models")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    with fp32(logits[0]):
        return _graph_loss(logits, labels, graph, lam=lam, tau=tau, divergence=div,
                           external=external, epoch=epoch)


def _graph_loss(logits: Sequence[Tensor], labels: Tensor, graph: TeacherGraph, *, lam: float,
                tau: float, divergence: Divergence, external: Mapping[str, Tensor] | None,
                epoch: int | None) -> Tensor:
    a = torch.stack([t.float() for t in logits])                      # [n, B, C]
    batch = a.shape[1]
    has_teacher, w = _graph_tensors(graph, a.device)
    ce = batch_cross_entropy(a, labels)
    total = torch.where(has_teacher, 1.0 - lam, 1.0).mul(ce).sum()
    if w is not None and isinstance(divergence, SoftmaxKD):         # every internal edge at once
        z = standardise(a) if divergence.standardise else a
        log_ps = F.log_softmax(z / tau, dim=-1)                       # [n, B, C]
        log_pt = log_ps.detach()
        pt = log_pt.exp()
        # cross[s, t] = mean_b sum_c p_t log p_s ; negent[t] = mean_b sum_c p_t log p_t
        cross = torch.einsum("sbc,tbc->st", log_ps, pt) / batch
        kd = -cross
        if divergence.kind == "kl":
            kd = kd + (pt * log_pt).sum(-1).mean(-1)[None, :]
        total = total + lam * tau * tau * (w * kd).sum()
    elif w is not None:                                               # one call per internal edge
        for e in graph.edges:
            if isinstance(e.teacher, int):
                total = total + lam * e.weight * edge_loss(divergence, a[e.student], a[e.teacher], tau=tau,
                                                           labels=labels, epoch=epoch)
    for e in graph.external_edges():
        if external is None or e.teacher not in external:
            raise KeyError(f"external teacher {e.teacher!r} has no logits in `external`")
        teacher = external[e.teacher]  # type: ignore[index]
        total = total + lam * e.weight * edge_loss(divergence, a[e.student], teacher, tau=tau,
                                                   labels=labels, epoch=epoch)
    return total


@functools.lru_cache(maxsize=64)
def _graph_tensors(graph: TeacherGraph, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The graph's constants on ``device``, made once (no host-device traffic in a step): which
    sub-models have teachers, and the internal weight matrix (None when no internal edge)."""
    n = graph.num_submodels
    has_teacher = torch.tensor([graph.has_teachers(i) for i in range(n)], device=device)
    internal = any(isinstance(e.teacher, int) for e in graph.edges)
    return has_teacher, graph.weight_matrix().to(device) if internal else None


def _check_divergence(divergence: str) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
