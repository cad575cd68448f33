"""Built-in divergences: kl and ce (with logit standardisation as an option), hard (DeiT's hard
distillation), dkd (decoupled KD) and dist (DIST). Registered exactly as a third-party plugin registers its own.

Each is ``D(a_s, sg(a_t))`` of one graph edge, inside the stage's rule
``L_i = (1 - lam) CE + lam * sum_(t, w) w * D``: a paper's own cross-entropy term is the rule's
(weighted ``1 - lam``), its weights between its own terms and its schedules are the divergence's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdreg.divergence import Divergence, hard_targets, warmup_factor
from kdreg.errors import OptionError
from kdreg.hookspecs import Register, hookimpl
from kdreg.losses import SoftmaxKD


def kl(*, standardise: bool = False) -> SoftmaxKD:
    """tau^2 KL(p_t || p_s) (Hinton et al. 2015); standardise: z-score logits first (Sun et al. CVPR 2024)."""
    return SoftmaxKD("kl", standardise=standardise)


def ce(*, standardise: bool = False) -> SoftmaxKD:
    """tau^2 H(p_t, p_s), soft-target cross-entropy: KL plus the teacher's entropy (same gradient)."""
    return SoftmaxKD("ce", standardise=standardise)


class Hard(Divergence):
    """DeiT's hard distillation (Touvron et al., ICML 2021, eq. 3): the cross-entropy of the
    student's logits with the teacher's argmax as the label, ``H(onehot(argmax a_t), softmax(a_s))``,
    batch mean. No temperature: ``tau`` is not used (nor smoothing, as in DeiT's code)."""

    def __call__(self, student: Tensor, teacher: Tensor, *, tau: float, labels: Tensor,
                 epoch: int | None = None) -> Tensor:
        return torch.nn.functional.cross_entropy(student, teacher.argmax(-1))

    def __repr__(self) -> str:
        return "Hard()"


def hard() -> Hard:
    """CE with the teacher's argmax as the label (DeiT's hard distillation); tau is not used."""
    return Hard()


def _weights(**weights: float) -> list[OptionError]:
    """Weights that are negative or not finite, and all of them 0 (the divergence would be 0)."""
    problems = [OptionError(f"{key} must be a finite weight >= 0, got {value}", key=key)
                for key, value in weights.items() if not (math.isfinite(value) and value >= 0)]
    if all(value == 0 for value in weights.values()):
        names = " and ".join(weights)
        problems.append(OptionError(f"{names} are 0: the divergence would be 0", key=list(weights)[-1]))
    return problems


class DKD(Divergence):
    """Decoupled KD (Zhao et al., CVPR 2022): ``tau^2 * min(epoch / warmup, 1) * (alpha * TCKD +
    beta * NCKD)``, batch mean.

    With ``p = softmax(a / tau)`` and ``g`` the label, TCKD is the KL divergence between the
    teacher's and the student's binary distributions ``(p_g, 1 - p_g)`` (target class or not) and
    NCKD the KL divergence between their distributions over the non-target classes,
    ``p_c / (1 - p_g)`` for ``c != g``. Soft targets (mixup) use their dominant class as ``g``.
    """

    def __init__(self, alpha: float, beta: float, warmup: int):
        self.alpha, self.beta, self.warmup = alpha, beta, warmup

    def __call__(self, student: Tensor, teacher: Tensor, *, tau: float, labels: Tensor,
                 epoch: int | None = None) -> Tensor:
        target = torch.nn.functional.one_hot(hard_targets(labels), student.shape[-1]).bool()
        s_in, s_out, s_rest = _split(student, target, tau)
        t_in, t_out, t_rest = _split(teacher, target, tau)
        tckd = t_in.exp() * (t_in - s_in) + t_out.exp() * (t_out - s_out)
        nckd = (t_rest.exp() * (t_rest - s_rest)).masked_fill(target, 0.0).sum(-1)
        per_sample = self.alpha * tckd + self.beta * nckd
        return warmup_factor(epoch, self.warmup) * tau * tau * per_sample.mean()

    def __repr__(self) -> str:
        return f"DKD(alpha={self.alpha}, beta={self.beta}, warmup={self.warmup})"


def _split(logits: Tensor, target: Tensor, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """``log p_g``, ``log (1 - p_g)`` ``[B]`` and the log-distribution over the non-target classes
    ``[B, C]`` (0 at the target, where it is masked out), from logsumexps: no log of a sum."""
    z = logits / tau
    everything = z.logsumexp(-1)
    rest = z.masked_fill(target, float("-inf"))
    others = rest.logsumexp(-1)
    log_rest = (rest - others[:, None]).masked_fill(target, 0.0)
    return (z.masked_fill(~target, 0.0).sum(-1) - everything), others - everything, log_rest


def dkd(*, alpha: float = 1.0, beta: float = 8.0, warmup: int = 20) -> DKD:
    """Decoupled KD (Zhao et al. CVPR 2022): alpha TCKD + beta NCKD, warm-up min(epoch / warmup, 1)."""
    problems = _weights(alpha=alpha, beta=beta)
    if warmup < 0:
        problems.append(OptionError(f"warmup must be >= 0 epochs (0: none), got {warmup}", key="warmup"))
    OptionError.raise_any(problems)
    return DKD(alpha, beta, warmup)


class DIST(Divergence):
    """DIST (Huang et al., NeurIPS 2022): ``tau^2 * (beta * inter + gamma * intra)``.

    With ``p = softmax(a / tau)`` per sample, ``inter = 1 - mean_b rho(p_s[b, :], p_t[b, :])``
    (each sample's class distribution) and ``intra = 1 - mean_c rho(p_s[:, c], p_t[:, c])`` (each
    class over the batch), ``rho`` the Pearson correlation (with 1e-8 added to the product of the
    norms, as in the authors' code: a class whose probability hardly varies over the batch counts
    as uncorrelated). The intra-class term is a statistic of the batch: of each process's share
    under torchrun; with one sample it is the constant 1.
    """

    def __init__(self, beta: float, gamma: float):
        self.beta, self.gamma = beta, gamma

    def __call__(self, student: Tensor, teacher: Tensor, *, tau: float, labels: Tensor,
                 epoch: int | None = None) -> Tensor:
        ps, pt = (student / tau).softmax(-1), (teacher / tau).softmax(-1)
        inter = 1.0 - _pearson(ps, pt).mean()
        intra = 1.0 - _pearson(ps.t(), pt.t()).mean()
        return tau * tau * (self.beta * inter + self.gamma * intra)

    def __repr__(self) -> str:
        return f"DIST(beta={self.beta}, gamma={self.gamma})"


def _pearson(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """The Pearson correlation of each row of ``x`` with the same row of ``y``."""
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1) + eps)


def dist(*, beta: float = 1.0, gamma: float = 1.0) -> DIST:
    """DIST (Huang et al. NeurIPS 2022): beta inter-class + gamma intra-class Pearson relation."""
    OptionError.raise_any(_weights(beta=beta, gamma=gamma))
    return DIST(beta, gamma)


@hookimpl
def kdreg_register_divergences(register: Register) -> None:
    register("kl", kl)
    register("ce", ce)
    register("hard", hard)
    register("dkd", dkd)
    register("dist", dist)
