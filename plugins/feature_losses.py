"""Built-in feature losses: fitnet, at, sp, pkt, rkd and crd, as in their papers and in the
reference implementation RepDistiller (Tian et al., the code of CRD, ICLR 2020), whose CIFAR-100
weights are their default weights. Registered exactly as a third-party plugin registers its own
(hook ``kdreg_register_feature_losses``).

Each is ``F(phi_s, sg(phi_t))`` of one teacher-graph edge, summed over the entry's paired points
(fitnet, at, sp, pkt, rkd; crd is defined on one point), and enters the student's loss as
``weight * w * F``. The teacher's side is never differentiated (it is computed without gradient,
or detached) even where the engine hands over a teacher tensor that requires one.

Split points that reproduce RepDistiller's choices on the CIFAR backbones (its ``feat`` list is
the stem, each stage's output, then the pooled last stage):

- fitnet: its ``hint_layer = 2``: ``layer2`` of the ResNets and WRNs, ``layer3`` of the VGGs;
- at: every stage output, ``layer1``-``layer3`` (ResNets, WRNs), ``layer2``-``layer5`` (VGGs);
- sp: the last stage output, ``layer3`` (ResNets, WRNs), ``layer5`` (VGGs);
- pkt, rkd, crd: the last stage, ``layer3`` (ResNets, resnet8x4 / resnet32x4 included: their last
  stage is ``layer3``) or ``layer5`` (VGGs), globally average-pooled (``pool = true``, the
  default): the penultimate feature. A WRN's last split point ``layer3`` lies before the head's
  BN-ReLU, which RepDistiller pools after: there the pooled feature differs from its.

**Tokens.** At a transformer's split points (``blocks.N`` of a timm ViT, DeiT or EVA) features are
tokens ``[N, C]``, the class, distillation and register tokens first
(:class:`kdreg.feature_loss.Tokens`). ``sp``, ``pkt``, ``rkd`` and ``crd`` pool them to one
vector per sample, as option ``tokens`` says: ``"cls"`` the class token, ``"mean"`` the mean of
the patch tokens (every prefix token left out, timm's ``global_pool = "avg"``), ``"head"`` (the
default) what each model's own classifier pools (its pre-logits features, as timm's
``FeatureDistillationTask`` takes them). A distillation or register token is never pooled.
``fitnet`` compares tokens with tokens one by one (``tokens = "auto"``, its default) through a
linear connector ``C_s -> C_t`` applied to every token, which needs the same token count on both
sides (else refused, naming the poolings); with ``"head"``, ``"cls"`` or ``"mean"``, and wherever
tokens meet a map, it compares pooled vectors through a linear connector ``D_s -> D_t``: timm's
``FeatureDistillationTask`` at the last split points. ``at`` is refused on tokens: its attention
map sums a convolution's channels at each position of an ``H x W`` grid, which a token sequence
with its prefix tokens is not. A convolutional network and a transformer join through pooled
features: the map globally average-pooled (``pool``; fitnet always pools a map that meets tokens),
the tokens pooled as ``tokens`` says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdreg.errors import OptionError
from kdreg.feature_loss import TOKEN_POOLS, FeatureBatch, FeatureLoss, FeatureSetup, Tokens
from kdreg.hookspecs import Register, hookimpl

#: RepDistiller's eps of PKT and of CRD's NCE loss
EPS = 1e-7


# ------------------------------------------------------------------------------ helpers
def _positive(value: float, key: str) -> list[OptionError]:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                       and value > 0):
        return [OptionError(f"{key} must be a finite number > 0, got {value!r}", key=key)]
    return []


def _weight(value: float, key: str) -> list[OptionError]:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                       and value >= 0):
        return [OptionError(f"{key} must be a finite weight >= 0, got {value!r}", key=key)]
    return []


def _count(value: int, key: str) -> list[OptionError]:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return [OptionError(f"{key} must be a positive integer, got {value!r}", key=key)]
    return []


def vector(f: Tensor, pool: bool) -> Tensor:
    """``[B, D]``: a ``[B, C, H, W]`` map globally average-pooled to ``[B, C]`` when ``pool``,
    anything else flattened per sample."""
    if pool and f.dim() == 4:
        return f.mean((2, 3))
    return f.flatten(1)


def _choice(value: str, key: str, allowed: Sequence[str]) -> list[OptionError]:
    if value not in allowed:
        return [OptionError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}",
                            key=key)]
    return []


@attrs.frozen
class Flatten:
    """How one point's features become one vector per sample ``[B, D]``: a ``[C, H, W]`` map
    globally average-pooled (``how = "map"``), tokens pooled (``"cls"``, ``"mean"``, by
    :meth:`Tokens.pool`) or anything flattened (``"flat"``)."""

    how: str
    layout: Tokens = Tokens()

    def __call__(self, f: Tensor) -> Tensor:
        if self.how == "map":
            return f.mean((2, 3))
        if self.how in TOKEN_POOLS:
            return self.layout.pool(f, self.how)
        return f.flatten(1)

    def size(self, shape: tuple[int, ...]) -> int:
        """``D`` for features of ``shape`` (without the batch dimension)."""
        return shape[0] if self.how == "map" else shape[-1] if self.how in TOKEN_POOLS else math.prod(shape)


def flattening(shape: tuple[int, ...], layout: Tokens, pool: bool, tokens: str, whose: str) -> Flatten:
    """How features of ``shape`` become vectors: tokens (``[N, C]``) pooled as ``tokens`` says
    (``"head"``: as the model's classifier, ``layout.head``), a map average-pooled when ``pool``,
    anything else flattened. Raises :class:`OptionError` for ``"cls"`` on tokens without a class
    token (``whose``: the student or the teacher)."""
    if len(shape) == 2:
        how = layout.head if tokens == "head" else tokens
        if how == "cls" and not layout.class_token:
            raise OptionError(f"tokens = 'cls' pools the class token, but the {whose}'s tokens "
                              f"{list(shape)} have none: set tokens = 'mean' (the mean of the "
                              f"patch tokens)", key="tokens")
        return Flatten(how, layout)
    return Flatten("map" if pool and len(shape) == 3 else "flat")


class Pooled(FeatureLoss):
    """A loss between one vector per sample of each side: ``[C, H, W]`` maps average-pooled when
    ``pool`` (else flattened), tokens pooled as ``tokens`` says (:func:`flattening`), each point's
    way fixed by :meth:`setup`. Called without a setup, every feature is :func:`vector`."""

    def __init__(self, pool: bool, tokens: str):
        super().__init__()
        self.pool, self.tokens = pool, tokens
        self.flat: list[tuple[Flatten, Flatten]] = []

    @staticmethod
    def token_problems(tokens: str) -> list[OptionError]:
        return _choice(tokens, "tokens", ("head", *TOKEN_POOLS))

    def setup(self, info: FeatureSetup) -> None:
        self.flat = [(flattening(s, info.student_tokens, self.pool, self.tokens, "student"),
                      flattening(t, info.teacher_tokens, self.pool, self.tokens, "teacher"))
                     for s, t in zip(info.student, info.teacher)]

    def vectors(self, j: int, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Point ``j``'s student and teacher features as ``[B, D_s]`` and ``[B, D_t]``."""
        if j < len(self.flat):
            fs, ft = self.flat[j]
            return fs(s), ft(t)
        return vector(s, self.pool), vector(t, self.pool)


def _one_point(method: str, info: FeatureSetup) -> None:
    if len(info.student) != 1 or len(info.teacher) != 1:
        raise OptionError(f"{method} is defined on one pair of features: give exactly one point, "
                          f"got {len(info.student)}", key="points")


# ------------------------------------------------------------------------------ FitNet
def regressor(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Sequential:
    """RepDistiller's ConvReg from a ``[C_s, H_s, W_s]`` to a ``[C_t, H_t, W_t]`` feature map:
    a 3x3 convolution of stride 2 (padding 1) when the student's map is twice the teacher's, a
    4x4 transposed convolution of stride 2 (padding 1) when it is half, else a convolution of
    kernel ``(1 + H_s - H_t, 1 + W_s - W_t)``; then BatchNorm and ReLU. Raises
    :class:`OptionError` for a student map smaller than the teacher's other than exactly half."""
    if len(student) != 3 or len(teacher) != 3:
        raise OptionError(f"fitnet needs [C, H, W] feature maps, got {list(student)} (student) "
                          f"and {list(teacher)} (teacher)")
    (cs, hs, ws), (ct, ht, wt) = student, teacher
    conv: nn.Module
    if (hs, ws) == (2 * ht, 2 * wt):
        conv = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
    elif (2 * hs, 2 * ws) == (ht, wt):
        conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
    else:
        raise OptionError(f"fitnet cannot map the student's {hs}x{ws} feature map to the "
                          f"teacher's {ht}x{wt}: a student map must be at least the teacher's size "
                          f"or exactly half of it (choose other points)")
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU())


class FitNet(FeatureLoss):
    """FitNet hints (Romero et al., ICLR 2015): ``sum_j mean (r_j(f_s^j) - f_t^j)^2`` over the
    paired points ``j``, the mean over batch, channels and positions, ``r_j`` a regressor built by
    :meth:`setup` (:func:`regressor`: a convolution sized to map the spatial sizes, then
    BatchNorm and ReLU) that trains with the student. Any channels join; each point gets its own
    regressor.

    Default weight 100 (RepDistiller's ``-b`` for CIFAR-100). As RepDistiller does, the hint is
    trained jointly with the task loss (the paper's separate hint-training stage is not
    reproduced). RepDistiller's point is its ``hint_layer = 2``: ``layer2`` of a CIFAR ResNet or
    WRN, ``layer3`` of a VGG.

    With ``connector = false`` there is no regressor: the hint compares the student's features
    with the teacher's directly (``r_j`` the identity), which needs equal shapes at every point;
    other shapes are refused when the stage is built.

    Tokens (``[N, C]``, a transformer's split points): with ``tokens = "auto"`` (the default),
    tokens against tokens are compared one by one, ``r_j`` a linear map ``C_s -> C_t``
    of every token (one weight for all tokens), the mean over batch, tokens and channels; both
    sides need the same token count. With ``"head"``, ``"cls"`` or ``"mean"``, and wherever tokens
    meet a map, each side is one vector per sample (tokens pooled as each model's classifier pools
    them, ``"head"``, which ``"auto"`` means there; the class token; the patch tokens' mean; a map
    globally average-pooled) and ``r_j`` a linear map ``D_s -> D_t``: timm's
    ``FeatureDistillationTask`` at the last split points.
    """

    default_weight = 100.0

    def __init__(self, connector: bool = True, tokens: str = "auto") -> None:
        super().__init__()
        OptionError.raise_any(_choice(tokens, "tokens", ("auto", "head", *TOKEN_POOLS)))
        self.connector = bool(connector)
        self.tokens = tokens
        self.regressors = nn.ModuleList()
        #: per point, how each side becomes vectors; None: compared as they are (maps, tokens)
        self.flat: list[tuple[Flatten, Flatten] | None] = []

    def _pair(self, s: tuple[int, ...], t: tuple[int, ...],
              info: FeatureSetup) -> tuple[Flatten, Flatten] | None:
        """None where the point's features are compared as they are (two maps; tokens against
        tokens one by one), else how each side is pooled to one vector."""
        if len(s) == 3 and len(t) == 3:
            return None
        if self.tokens == "auto" and len(s) == 2 and len(t) == 2:
            if s[0] != t[0]:
                raise OptionError(f"fitnet compares tokens one by one, but the student has {s[0]} "
                                  f"tokens and the teacher {t[0]} (another patch grid or other class, "
                                  f"distillation or register tokens): set tokens = 'head', 'cls' or "
                                  f"'mean' to compare pooled tokens", key="tokens")
            return None
        how = "head" if self.tokens == "auto" else self.tokens
        return (flattening(s, info.student_tokens, True, how, "student"),
                flattening(t, info.teacher_tokens, True, how, "teacher"))

    def setup(self, info: FeatureSetup) -> None:
        self.flat = [self._pair(s, t, info) for s, t in zip(info.student, info.teacher)]
        regressors: list[nn.Module] = []
        for s, t, pair in zip(info.student, info.teacher, self.flat):
            shown = "" if pair is None else " (pooled)"
            if pair is not None:
                s, t = (pair[0].size(s),), (pair[1].size(t),)
            if not self.connector:
                if tuple(s) != tuple(t):
                    raise OptionError(f"fitnet without a connector compares features of equal shapes; "
                                      f"the student's are {list(s)}{shown}, the teacher's {list(t)}"
                                      f"{shown}: set connector = true (a regressor joins them) or "
                                      f"choose other points", key="connector")
                regressors.append(nn.Identity())
            elif len(s) == 3:
                regressors.append(regressor(s, t))
            else:   # tokens [N, C] or vectors [D]: a linear map of the last dimension
                regressors.append(nn.Linear(s[-1], t[-1]))
        self.regressors = nn.ModuleList(regressors)

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor],
                batch: FeatureBatch) -> Tensor:
        if len(self.regressors) != len(student):
            raise RuntimeError("fitnet: setup() was not called for these points")
        total = student[0].new_zeros(())
        for r, s, t, pair in zip(self.regressors, student, teacher, self.flat):
            if pair is not None:
                s, t = pair[0](s), pair[1](t)
            total = total + F.mse_loss(r(s), t.detach())
        return total


# ------------------------------------------------------------------------------ AT
def attention_map(f: Tensor, p: float) -> Tensor:
    """``normalise(mean_c |f_c|^p)`` flattened per sample (Zagoruyko & Komodakis 2017, eq. 2 with
    the channel mean of the authors' code), L2-normalised: ``[B, H*W]``.

    The normalisation takes the channel count's factor out, so the map is computed as
    ``||f||_p^p`` over the channels, one reduction (for ``p >= 1``; ``|f|^p`` summed below)."""
    q = torch.linalg.vector_norm(f, p, dim=1).pow(p) if p >= 1 else f.abs().pow(p).sum(1)
    return F.normalize(q.flatten(1), dim=1)


class AttentionTransfer(FeatureLoss):
    """AT (Zagoruyko & Komodakis, ICLR 2017): ``sum_j mean_(b, k) (Q_s^j - Q_t^j)_(b, k)^2`` over
    the paired points ``j``, ``Q = normalise(mean_c |f_c|^p)`` (the paper's ``sum_c |A_c|^p``;
    the L2 normalisation makes sum and mean equal); the larger map is average-pooled to the
    smaller one's size. Any channels join.

    Default weight 1000: the authors' code and RepDistiller average the squared differences over
    batch and positions, which is the paper's ``beta = 10^3 / (H W B)`` per point. RepDistiller
    writes ``f^p`` where the paper writes ``|f|^p``: the same for the default ``p = 2``. Its
    points are every stage output: ``layer1``-``layer3`` of a CIFAR ResNet or WRN,
    ``layer2``-``layer5`` of a VGG.
    """

    default_weight = 1000.0

    def __init__(self, p: float = 2.0):
        super().__init__()
        OptionError.raise_any(_positive(p, "p"))
        self.p = float(p)

    def setup(self, info: FeatureSetup) -> None:
        for s, t in zip(info.student, info.teacher):
            if len(s) != 3 or len(t) != 3:
                whose, shape = ("student", s) if len(s) != 3 else ("teacher", t)
                why = (" are a transformer's tokens [N, C]: no H x W grid of positions to sum "
                       "channels over (and class, distillation or register tokens that are no "
                       "position); distil tokens with fitnet, sp, pkt, rkd or crd"
                       if len(shape) == 2 else " are not a map")
                raise OptionError(f"at needs [C, H, W] feature maps, got {list(shape)}: the "
                                  f"{whose}'s features{why}")

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor],
                batch: FeatureBatch) -> Tensor:
        total = student[0].new_zeros(())
        for s, t in zip(student, teacher):
            t = t.detach()
            if s.shape[2:] != t.shape[2:]:
                size = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
                s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
            total = total + (attention_map(s, self.p) - attention_map(t, self.p)).pow(2).mean()
        return total


# ------------------------------------------------------------------------------ SP
def similarity(f: Tensor) -> Tensor:
    """``G = f f^T`` over the batch (``f`` as ``[B, D]``), each row L2-normalised: ``[B, B]``."""
    return F.normalize(f @ f.t(), dim=1)


class SimilarityPreserving(Pooled):
    """SP (Tung & Mori, ICCV 2019): ``sum_j ||G_s^j - G_t^j||_F^2 / B^2`` over the paired points
    ``j``, ``G = f f^T`` over the batch of features flattened per sample, each row
    L2-normalised. Any shapes join (``G`` is ``B x B``).

    Default weight 3000 (the paper's gamma and RepDistiller's ``-b`` for CIFAR-100).
    ``pool``: average-pool ``[C, H, W]`` maps to ``[C]`` first (default false: the paper and
    RepDistiller flatten the map). RepDistiller's point is the last stage output: ``layer3`` of
    a CIFAR ResNet or WRN, ``layer5`` of a VGG. ``tokens``: how a transformer's tokens are pooled
    (``"head"``, ``"cls"``, ``"mean"``; see the module docstring).
    """

    default_weight = 3000.0

    def __init__(self, pool: bool = False, tokens: str = "head"):
        OptionError.raise_any(self.token_problems(tokens))
        super().__init__(pool, tokens)

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor],
                batch: FeatureBatch) -> Tensor:
        total = student[0].new_zeros(())
        for j, (s, t) in enumerate(zip(student, teacher)):
            b = s.shape[0]
            s, t = self.vectors(j, s, t)
            with torch.no_grad():
                g_t = similarity(t)
            g_s = similarity(s)
            total = total + (g_s - g_t).pow(2).sum() / (b * b)
        return total


# ------------------------------------------------------------------------------ PKT
def cosine_probabilities(f: Tensor) -> Tensor:
    """PKT's conditional distributions ``[B, B]``: cosine similarities (norms + 1e-7) mapped to
    ``[0, 1]`` by ``(c + 1) / 2``, each row normalised to sum to 1."""
    f = f / (f.norm(dim=1, keepdim=True) + EPS)
    k = (f @ f.t() + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)


class PKT(Pooled):
    """PKT (Passalis & Tefas, ECCV 2018): ``sum_j mean_(a, b) p_t(a, b) log((p_t(a, b) + eps) /
    (p_s(a, b) + eps))`` over the paired points ``j``, ``eps = 1e-7``, where ``p(a, b) =
    K(a, b) / sum_c K(a, c)`` with the cosine kernel ``K = (cos + 1) / 2`` between the batch's
    features: the KL divergence between the teacher's and the student's conditional probability
    distributions, averaged over the ``B^2`` entries as the authors' code and RepDistiller do.
    Any shapes join.

    Default weight 30000 (RepDistiller's ``-b`` for CIFAR-100). ``pool`` (default true):
    average-pool ``[C, H, W]`` maps to ``[C]`` first (anything else is flattened). RepDistiller's
    point is the pooled last stage: ``layer3`` of a CIFAR ResNet, ``layer5`` of a VGG.
    ``tokens``: how a transformer's tokens are pooled (``"head"``, ``"cls"``, ``"mean"``).
    """

    default_weight = 30000.0

    def __init__(self, pool: bool = True, tokens: str = "head"):
        OptionError.raise_any(self.token_problems(tokens))
        super().__init__(pool, tokens)

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor],
                batch: FeatureBatch) -> Tensor:
        total = student[0].new_zeros(())
        for j, (s, t) in enumerate(zip(student, teacher)):
            s, t = self.vectors(j, s, t)
            with torch.no_grad():
                p_t = cosine_probabilities(t)
            p_s = cosine_probabilities(s)
            total = total + (p_t * torch.log((p_t + EPS) / (p_s + EPS))).mean()
        return total


# ------------------------------------------------------------------------------ RKD
def distances(f: Tensor) -> Tensor:
    """Euclidean distances ``[B, B]`` between the rows of ``f`` (squares clamped at 1e-12 before
    the root, as RepDistiller), 0 on the diagonal, divided by their mean over positive entries."""
    square = f.pow(2).sum(1)
    d = (square[:, None] + square[None, :] - 2.0 * (f @ f.t())).clamp(min=1e-12).sqrt()
    d = d * (1.0 - torch.eye(len(f), dtype=f.dtype, device=f.device))
    return d / (d.sum() / (d > 0).sum())   # the mean over d > 0 (d >= 0), without a host sync


def angles(f: Tensor) -> Tensor:
    """``[B, B, B]``: ``cos`` of the angle at ``f_i`` between ``f_j`` and ``f_k``, ``<n(f_j - f_i),
    n(f_k - f_i)>`` (``n`` normalises; a zero difference stays 0)."""
    e = F.normalize(f[None, :, :] - f[:, None, :], p=2, dim=2)
    return e @ e.transpose(1, 2)


class RKD(Pooled):
    """RKD (Park et al., CVPR 2019): ``sum_j distance * l_d + angle * l_a`` over the paired points
    ``j``, ``l_d`` the smooth-L1 (Huber, delta 1) loss between the student's and the teacher's
    pairwise distances, each divided by its mean over the positive entries (RKD-D), ``l_a`` the
    smooth-L1 loss between the cosines of the angles of every triplet (RKD-A); both averaged
    over all ``B^2`` / ``B^3`` entries, the degenerate ones included, as RepDistiller does. Any
    shapes join; a batch of one sample gives 0.

    Default weight 1 (RepDistiller's ``-b`` for CIFAR-100), ``distance = 25``, ``angle = 50``
    (the paper's and RepDistiller's). ``pool`` (default true): average-pool ``[C, H, W]`` maps to
    ``[C]`` first (anything else is flattened). RepDistiller's point is the pooled last stage:
    ``layer3`` of a CIFAR ResNet, ``layer5`` of a VGG. ``tokens``: how a transformer's tokens are
    pooled (``"head"``, ``"cls"``, ``"mean"``).
    """

    default_weight = 1.0

    def __init__(self, distance: float = 25.0, angle: float = 50.0, pool: bool = True,
                 tokens: str = "head"):
        problems = _weight(distance, "distance") + _weight(angle, "angle")
        if not problems and distance == 0 and angle == 0:
            problems.append(OptionError("distance and angle are 0: the loss would be 0",
                                        key="angle"))
        OptionError.raise_any(problems + self.token_problems(tokens))
        super().__init__(pool, tokens)
        self.distance, self.angle = float(distance), float(angle)

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor],
                batch: FeatureBatch) -> Tensor:
        total = student[0].new_zeros(())
        for j, (s, t) in enumerate(zip(student, teacher)):
            s, t = self.vectors(j, s, t)
            if len(s) < 2:
                total = total + 0.0 * s.sum()
                continue
            with torch.no_grad():
                d_t, a_t = distances(t), angles(t)
            term = s.new_zeros(())
            if self.distance:
                term = term + self.distance * F.smooth_l1_loss(distances(s), d_t)
            if self.angle:
                term = term + self.angle * F.smooth_l1_loss(angles(s), a_t)
            total = total + term
        return total


# ------------------------------------------------------------------------------ CRD
class Embed(nn.Module):
    """CRD's embedding: a linear map to ``dim`` features, then L2 normalisation."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x), dim=1)


def nce_loss(x: Tensor, num_samples: int) -> Tensor:
    """RepDistiller's ContrastLoss (CRD, eq. 18): ``x [B, 1 + K]`` holds each anchor's
    ``P(positive)`` then its ``K`` negatives' values; with the noise mass ``m = K / N``,
    ``-(sum_b log(x_b0 / (x_b0 + m + eps)) + sum_(b, k) log(m / (x_bk + m + eps))) / B``."""
    k = x.shape[1] - 1
    m = k / num_samples
    positive, negative = x[:, 0], x[:, 1:]
    log_d1 = torch.log(positive / (positive + m + EPS))
    log_d0 = torch.log(m / (negative + m + EPS))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


class CRD(Pooled):
    """CRD (Tian, Krishnan & Isola, ICLR 2020), as RepDistiller's CRDLoss and ContrastMemory.

    The student's and the teacher's features (one point) are embedded by their own
    :class:`Embed` (linear to ``dim``, L2-normalised; the teacher's embedding trains too) into
    ``e_s`` and ``e_t``. A memory bank per side (``memory_s``, ``memory_t``: ``num_samples x dim``
    buffers, saved and resumed with the student, initialised uniformly in ``[-1/sqrt(dim/3),
    1/sqrt(dim/3)]``) holds a running embedding of every training sample. For each sample ``i``
    of the batch, ``negatives`` indices are drawn; its scores are ``exp(<m_j, e> / t) / Z`` for
    ``j = i`` (the positive) and the drawn ones, with the student anchor ``e_s`` against the
    teacher's memory and the teacher anchor ``e_t`` against the student's. ``Z_s``, ``Z_t``
    (buffers) are set once, from the first batch, to ``N`` times the mean score. The loss is the
    sum of both directions' NCE loss (:func:`nce_loss`); after it, the memory rows of the batch
    become ``normalise(momentum * m_i + (1 - momentum) * e_i)``.

    Negatives (RepDistiller's default mode ``exact``): drawn uniformly, with replacement, among
    the training samples of other classes than the anchor's (``info.train_labels``). Without
    train labels, uniformly among all samples but the anchor itself. They come from the global
    torch generator of the features' device (seeded by the engine, saved in checkpoints).
    RepDistiller draws them without replacement when there are enough (16384 of CIFAR-100's
    49500 other-class samples): drawing with replacement costs ``O(B K)`` on any training set.

    Default weight 0.8 (RepDistiller's ``-b`` for CIFAR-100); ``dim = 128``, ``negatives =
    16384``, ``t = 0.07`` (temperature), ``momentum = 0.5``. ``pool`` (default true):
    average-pool ``[C, H, W]`` maps to ``[C]`` first (anything else is flattened); ``tokens``: how
    a transformer's tokens are pooled (``"head"``, ``"cls"``, ``"mean"``). CRD is
    defined on one point: RepDistiller's is the pooled last stage, ``layer3`` of a CIFAR ResNet,
    ``layer5`` of a VGG. Any channels join. Needs each sample's training-set index.
    """

    default_weight = 0.8
    needs_indices = True

    memory_s: Tensor
    memory_t: Tensor
    z_s: Tensor
    z_t: Tensor
    class_of: Tensor
    class_order: Tensor
    class_start: Tensor
    class_count: Tensor

    def __init__(self, dim: int = 128, negatives: int = 16384, t: float = 0.07,
                 momentum: float = 0.5, pool: bool = True, tokens: str = "head"):
        problems = _count(dim, "dim") + _count(negatives, "negatives") + _positive(t, "t")
        if isinstance(momentum, bool) or not (isinstance(momentum, (int, float))
                                              and 0 <= momentum < 1):
            problems.append(OptionError(f"momentum must lie in [0, 1), got {momentum!r}",
                                        key="momentum"))
        OptionError.raise_any(problems + self.token_problems(tokens))
        super().__init__(pool, tokens)
        self.dim, self.negatives, self.t = dim, negatives, float(t)
        self.momentum = float(momentum)
        self.num_samples = 0
        self.exact = False
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))

    def setup(self, info: FeatureSetup) -> None:
        _one_point("crd", info)
        super().setup(info)
        n = max(int(info.num_samples), 1)   # (a recipe validated without its data: 1)
        self.num_samples = n
        (fs, ft), = self.flat
        self.embed_s = Embed(fs.size(info.student[0]), self.dim)
        self.embed_t = Embed(ft.size(info.teacher[0]), self.dim)
        stdv = 1.0 / math.sqrt(self.dim / 3)
        self.register_buffer("memory_s", torch.rand(n, self.dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n, self.dim).mul_(2 * stdv).add_(-stdv))
        self.exact = info.train_labels is not None
        if info.train_labels is not None:
            labels = info.train_labels.detach().cpu().long().flatten()
            if labels.shape != (n,) or (n and int(labels.min()) < 0):
                raise OptionError(f"crd needs train labels: {n} class indices >= 0, got a tensor "
                                  f"of shape {list(info.train_labels.shape)}")
            count = torch.bincount(labels)
            if int(count.max()) == n:
                raise OptionError("crd draws its negatives from other classes, but every "
                                  "training sample has the same label")
            order = torch.sort(labels, stable=True).indices
            # derived from the labels: rebuilt by setup, not saved
            self.register_buffer("class_of", labels, persistent=False)
            self.register_buffer("class_order", order, persistent=False)
            self.register_buffer("class_start", count.cumsum(0) - count, persistent=False)
            self.register_buffer("class_count", count, persistent=False)

    def contrast_indices(self, indices: Tensor) -> Tensor:
        """``[B, 1 + negatives]``: each sample's own index (the positive), then its negatives."""
        idx = indices.long()
        n = self.num_samples
        r = torch.randint(0, 2**62, (len(idx), self.negatives), device=idx.device)
        if self.exact:
            cls = self.class_of[idx]
            start, count = self.class_start[cls][:, None], self.class_count[cls][:, None]
            u = r % (n - count)
            negatives = self.class_order[u + (u >= start) * count]
        else:
            u = r % (n - 1)
            negatives = u + (u >= idx[:, None]).long()
        return torch.cat([idx[:, None], negatives], 1)

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor],
                batch: FeatureBatch) -> Tensor:
        if self.num_samples == 0:
            raise RuntimeError("crd: setup() was not called")
        if self.num_samples < 2:
            raise ValueError("crd needs a training set of at least 2 samples (its memory bank holds "
                             "one row per sample and draws negatives among the others)")
        if len(student) != 1:
            raise ValueError(f"crd is defined on one point, got {len(student)}")
        if batch.indices is None:
            raise ValueError("crd needs each sample's training-set index (batch.indices)")
        idx = batch.indices.long()
        s, t = self.vectors(0, student[0], teacher[0])
        e_s = self.embed_s(s)
        e_t = self.embed_t(t.detach())
        sample = self.contrast_indices(idx)
        # student anchor against the teacher's memory, teacher anchor against the student's
        out_s = torch.exp(_scores(self.memory_t, sample, e_s) / self.t)
        out_t = torch.exp(_scores(self.memory_s, sample, e_t) / self.t)
        with torch.no_grad():   # Z: set once, from the first batch (no host synchronisation)
            n = self.num_samples
            first = self.z_s < 0
            means = _mean_over_processes(torch.stack([out_s.mean(), out_t.mean()])) if _processes() > 1 else None
            mean_s, mean_t = (means[0], means[1]) if means is not None else (out_s.mean(), out_t.mean())
            self.z_s.copy_(torch.where(first, mean_s * n, self.z_s))
            self.z_t.copy_(torch.where(first, mean_t * n, self.z_t))
        loss = nce_loss(out_s / self.z_s, n) + nce_loss(out_t / self.z_t, n)
        with torch.no_grad():   # every process updates the rows of every process's batch
            idx_all = _everyones(idx)
            rows = _everyones(torch.cat([e_s.detach(), e_t.detach()], 1))
            for memory, e in ((self.memory_s, rows[:, :self.dim]), (self.memory_t, rows[:, self.dim:])):
                mixed = memory[idx_all] * self.momentum + e * (1.0 - self.momentum)
                memory.index_copy_(0, idx_all, F.normalize(mixed, dim=1))
        return loss


def _scores(memory: Tensor, sample: Tensor, anchor: Tensor) -> Tensor:
    """``[B, 1 + K]``: ``<memory[sample[b, j]], anchor[b]>``, the memory detached. Where the memory
    has few rows for the draws (``N <= 8 (1 + K)``, e.g. CIFAR's 50,000 against 16,385), every
    row's score is one matrix product and the drawn ones are picked from it; else the drawn rows
    are gathered (``B (1 + K) dim`` numbers) and multiplied. The same scores either way."""
    memory = memory.detach()
    if memory.shape[0] <= 8 * sample.shape[1]:
        # a copy: the backward pass reads the memory as it is now, and the update changes it
        every = anchor @ memory.clone().t()               # [B, N]
        return every.gather(1, sample)
    return torch.bmm(memory[sample], anchor[:, :, None])[..., 0]


def _processes() -> int:
    """The processes training together (torch.distributed's world; 1 without it)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _mean_over_processes(t: Tensor) -> Tensor:
    out = t.clone()
    torch.distributed.all_reduce(out)
    return out / _processes()


def _everyones(t: Tensor) -> Tensor:
    """The rows ``t`` of every process, in rank order (``t`` itself in one process): under
    torchrun, CRD's memory banks stay the same in every process, each updated with every
    process's batch."""
    world = _processes()
    if world == 1:
        return t
    dist = torch.distributed
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(t)], dtype=torch.long, device=t.device))
    counts = [int(s) for s in sizes]         # equal but for skipped unreadable images
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


@hookimpl
def kdreg_register_feature_losses(register: Register) -> None:
    register("at", AttentionTransfer, "attention transfer (Zagoruyko & Komodakis 2017), weight 1000")
    register("crd", CRD, "contrastive representation distillation (Tian et al. 2020), weight 0.8")
    register("fitnet", FitNet, "FitNet hints through a regressor (Romero et al. 2015), weight 100")
    register("pkt", PKT, "probabilistic knowledge transfer (Passalis & Tefas 2018), weight 30000")
    register("rkd", RKD, "relational KD, distance and angle (Park et al. 2019), weight 1")
    register("sp", SimilarityPreserving, "similarity-preserving KD (Tung & Mori 2019), weight 3000")
