"""Feature losses: what is distilled between features at split points.

Each built-in is checked against its paper's formula, written out here independently (in float64,
with loops and explicit sums as the papers write them), for its value and its gradient with
respect to the student's features; then invariants (hypothesis), the teacher's side (never
differentiated), the parameters and buffers the methods own (FitNet's regressor, CRD's embeddings,
memory bank and negatives), and bad options and shapes as one ``... @ path`` line each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from kdreg.cli import main
from kdreg.create import create
from kdreg.errors import OptionError, RecipeError
from kdreg.feature_loss import FeatureBatch, FeatureLoss, FeatureSetup
from kdreg_plugins.feature_losses import CRD, FitNet

D = torch.float64
PATH = "recipe.stages.s.feature_losses[0]"
NAMES = ["at", "crd", "fitnet", "pkt", "rkd", "sp"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny tensors: one intra-op thread."""


def build(name: str, **options: Any) -> FeatureLoss:
    loss = create("feature_loss", name, options, provided={}, path=PATH)
    assert isinstance(loss, FeatureLoss)
    return loss


def ready(name: str, student: list[Tensor], teacher: list[Tensor], *, num_samples: int = 32,
          labels: Tensor | None = None, **options: Any) -> FeatureLoss:
    """The loss built and set up for these features, in float64."""
    loss = build(name, **options)
    loss.setup(FeatureSetup(tuple(tuple(s.shape[1:]) for s in student),
                            tuple(tuple(t.shape[1:]) for t in teacher),
                            num_samples=num_samples, num_classes=4, train_labels=labels))
    return loss.double()


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def value_and_grads(loss: FeatureLoss, student: list[Tensor], teacher: list[Tensor],
                    batch: FeatureBatch | None = None) -> tuple[Tensor, list[Tensor]]:
    s = [x.clone().requires_grad_(True) for x in student]
    value = loss(s, [t.clone() for t in teacher], batch or FeatureBatch(torch.zeros(len(s[0]))))
    grads = torch.autograd.grad(value, s)
    return value.detach(), list(grads)


def paper_value_and_grads(formula: Callable[[list[Tensor]], Tensor],
                          student: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    s = [x.clone().requires_grad_(True) for x in student]
    value = formula(s)
    return value.detach(), list(torch.autograd.grad(value, s))


def assert_matches(got: tuple[Tensor, list[Tensor]], want: tuple[Tensor, list[Tensor]]) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-12)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


def flat(f: Tensor, pool: bool) -> Tensor:
    """[B, C, H, W] -> [B, C] by the mean over positions (pool), else every value in a row."""
    if pool and f.dim() == 4:
        return f.sum(dim=(2, 3)) / (f.shape[2] * f.shape[3])
    return f.reshape(len(f), -1)


# ------------------------------------------------------------------------------ the papers' formulas
def at_paper(s_maps: list[Tensor], t_maps: list[Tensor], p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis: Q = sum_c |A_c|^p per position, Q / ||Q||_2; per point the mean over
    batch and positions of the squared difference (the authors' code); the larger map first
    averaged over blocks down to the smaller one's size."""
    total = torch.zeros((), dtype=D)
    for s, t in zip(s_maps, t_maps):
        if s.shape[2] != t.shape[2]:
            big, small = (s, t) if s.shape[2] > t.shape[2] else (t, s)
            k = big.shape[2] // small.shape[2]
            b, c, h, w = big.shape
            pooled = big.reshape(b, c, h // k, k, w // k, k).sum(dim=(3, 5)) / (k * k)
            s, t = (pooled, t) if big is s else (s, pooled)
        terms: list[Tensor] = []
        for b in range(len(s)):
            qs = torch.stack([s[b, c].abs() ** p for c in range(s.shape[1])]).sum(0).flatten()
            qt = torch.stack([t[b, c].abs() ** p for c in range(t.shape[1])]).sum(0).flatten()
            qs, qt = qs / qs.pow(2).sum().sqrt(), qt / qt.pow(2).sum().sqrt()
            terms.extend((qs - qt) ** 2)
        total = total + torch.stack(terms).mean()
    return total


def sp_paper(s_feats: list[Tensor], t_feats: list[Tensor], pool: bool = False) -> Tensor:
    """Tung & Mori: G = Q Q^T over the batch, each row / its L2 norm, ||G_T - G_S||_F^2 / b^2."""
    total = torch.zeros((), dtype=D)
    for s, t in zip(s_feats, t_feats):
        qs, qt = flat(s, pool), flat(t, pool)
        b = len(qs)
        gs = [[torch.dot(qs[i], qs[j]) for j in range(b)] for i in range(b)]
        gt = [[torch.dot(qt[i], qt[j]) for j in range(b)] for i in range(b)]
        acc = torch.zeros((), dtype=D)
        for i in range(b):
            ns = torch.stack(gs[i]).pow(2).sum().sqrt()
            nt = torch.stack(gt[i]).pow(2).sum().sqrt()
            for j in range(b):
                acc = acc + (gt[i][j] / nt - gs[i][j] / ns) ** 2
        total = total + acc / (b * b)
    return total


def pkt_paper(s_feats: list[Tensor], t_feats: list[Tensor], pool: bool = True) -> Tensor:
    """Passalis & Tefas with the authors' eps = 1e-7: cosine kernel K = (cos + 1) / 2, p_(j|i) =
    K_ij / sum_k K_ik, KL(p_t || p_s) averaged over the b^2 entries (the authors' code)."""
    eps = 1e-7

    def probabilities(x: Tensor) -> list[list[Tensor]]:
        b = len(x)
        norms = [x[i].pow(2).sum().sqrt() + eps for i in range(b)]
        k = [[(torch.dot(x[i], x[j]) / (norms[i] * norms[j]) + 1) / 2 for j in range(b)]
             for i in range(b)]
        return [[k[i][j] / sum(k[i]) for j in range(b)] for i in range(b)]

    total = torch.zeros((), dtype=D)
    for s, t in zip(s_feats, t_feats):
        ps, pt = probabilities(flat(s, pool)), probabilities(flat(t, pool))
        b = len(ps)
        acc = sum(pt[i][j] * torch.log((pt[i][j] + eps) / (ps[i][j] + eps))
                  for i in range(b) for j in range(b))
        total = total + acc / (b * b)
    return total


def huber(x: Tensor) -> Tensor:
    return 0.5 * x * x if x.abs() < 1 else x.abs() - 0.5


def rkd_paper(s_feats: list[Tensor], t_feats: list[Tensor], w_d: float = 25.0, w_a: float = 50.0,
              pool: bool = True) -> Tensor:
    """Park et al.: psi_D = ||t_i - t_j|| / mu (mu the mean over pairs i != j), psi_A = cos of the
    angle t_i t_j t_k at t_j... written as RepDistiller orders it: <e(x_j - x_i), e(x_k - x_i)>;
    Huber loss, averaged over all b^2 and b^3 entries (degenerate ones count 0)."""
    total = torch.zeros((), dtype=D)
    for s, t in zip(s_feats, t_feats):
        xs, xt = flat(s, pool), flat(t, pool)
        b = len(xs)

        def dist(x: Tensor, b: int = b) -> list[list[Tensor]]:
            d = [[(x[i] - x[j]).pow(2).sum().sqrt() if i != j else torch.zeros((), dtype=D)
                  for j in range(b)] for i in range(b)]
            mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
            return [[d[i][j] / mu for j in range(b)] for i in range(b)]

        def cos(x: Tensor, i: int, j: int, k: int) -> Tensor:
            if j == i or k == i:
                return torch.zeros((), dtype=D)
            u, v = x[j] - x[i], x[k] - x[i]
            return torch.dot(u, v) / (u.pow(2).sum().sqrt() * v.pow(2).sum().sqrt())

        ds, dt = dist(xs), dist(xt)
        l_d = sum(huber(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b**2
        l_a = sum(huber(cos(xs, i, j, k) - cos(xt, i, j, k))
                  for i in range(b) for j in range(b) for k in range(b)) / b**3
        total = total + w_d * l_d + w_a * l_a
    return total


# ------------------------------------------------------------------------------ values and gradients
def test_at_matches_the_paper_at_two_points_and_pooled_sizes() -> None:
    s = [randn(3, 4, 4, 4, seed=1), randn(3, 5, 4, 4, seed=2), randn(3, 2, 8, 8, seed=3)]
    t = [randn(3, 6, 4, 4, seed=4), randn(3, 3, 2, 2, seed=5), randn(3, 7, 4, 4, seed=6)]
    for p in (2.0, 3.0):
        loss = ready("at", s, t, p=p)

        def paper(x: list[Tensor], p: float = p) -> Tensor:
            return at_paper(x, t, p)

        assert_matches(value_and_grads(loss, s, t), paper_value_and_grads(paper, s))


@pytest.mark.parametrize("pool", [False, True])
def test_sp_matches_the_paper_at_two_points(pool: bool) -> None:
    s = [randn(5, 3, 2, 2, seed=1), randn(5, 7, seed=2)]
    t = [randn(5, 4, 3, 3, seed=3), randn(5, 2, seed=4)]
    loss = ready("sp", s, t, pool=pool)
    assert_matches(value_and_grads(loss, s, t), paper_value_and_grads(lambda x: sp_paper(x, t, pool), s))


@pytest.mark.parametrize("pool", [False, True])
def test_pkt_matches_the_paper_at_two_points(pool: bool) -> None:
    s = [randn(5, 3, 2, 2, seed=1), randn(5, 7, seed=2)]
    t = [randn(5, 4, 3, 3, seed=3), randn(5, 2, seed=4)]
    loss = ready("pkt", s, t, pool=pool)
    assert_matches(value_and_grads(loss, s, t), paper_value_and_grads(lambda x: pkt_paper(x, t, pool), s))


@pytest.mark.parametrize("w_d,w_a,pool", [(25.0, 50.0, True), (25.0, 50.0, False), (3.0, 0.0, True),
                                          (0.0, 2.0, True)])
def test_rkd_matches_the_paper_at_two_points(w_d: float, w_a: float, pool: bool) -> None:
    # scaled so that both branches of the Huber loss are taken
    s = [randn(5, 3, 2, 2, seed=1), randn(5, 7, seed=2) * 3]
    t = [randn(5, 4, 3, 3, seed=3) ** 3, randn(5, 2, seed=4)]
    loss = ready("rkd", s, t, distance=w_d, angle=w_a, pool=pool)
    assert_matches(value_and_grads(loss, s, t),
                   paper_value_and_grads(lambda x: rkd_paper(x, t, w_d, w_a, pool), s))
    want = rkd_paper(s, t, w_d, w_a, pool)
    assert want > 0


def conv_bn_relu(x: Tensor, regressor: nn.Module) -> Tensor:
    """The regressor's convolution, then BatchNorm with batch statistics (biased variance), then
    ReLU, written out."""
    layers = cast(nn.Sequential, regressor)
    conv, bn = cast(nn.Conv2d, layers[0]), cast(nn.BatchNorm2d, layers[1])
    if isinstance(conv, nn.ConvTranspose2d):
        y = torch.nn.functional.conv_transpose2d(x, conv.weight, conv.bias, stride=2, padding=1)
    else:
        y = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    y = (y - mean) / (var + bn.eps).sqrt() * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    return y.clamp(min=0)


def test_fitnet_matches_the_paper_at_two_points() -> None:
    s = [randn(4, 3, 8, 8, seed=1), randn(4, 2, 2, 2, seed=2)]
    t = [randn(4, 5, 4, 4, seed=3), randn(4, 6, 4, 4, seed=4)]
    loss = cast(FitNet, ready("fitnet", s, t))
    loss.train()
    regs = list(loss.regressors)

    def paper(x: list[Tensor]) -> Tensor:
        # Romero et al.: || u_h - r(v_g) ||^2, as the mean over every value (RepDistiller)
        total = torch.zeros((), dtype=D)
        for r, xs, xt in zip(regs, x, t):
            diff = conv_bn_relu(xs, r) - xt
            total = total + (diff ** 2).sum() / diff.numel()
        return total

    assert_matches(value_and_grads(loss, s, t), paper_value_and_grads(paper, s))


@pytest.mark.parametrize("student,teacher,kind,kernel,stride", [
    ((8, 8, 8), (16, 4, 4), nn.Conv2d, (3, 3), (2, 2)),
    ((8, 2, 2), (16, 1, 1), nn.Conv2d, (3, 3), (2, 2)),
    ((8, 4, 4), (16, 8, 8), nn.ConvTranspose2d, (4, 4), (2, 2)),
    ((8, 6, 5), (16, 4, 4), nn.Conv2d, (3, 2), (1, 1)),
    ((8, 4, 4), (8, 4, 4), nn.Conv2d, (1, 1), (1, 1)),
    ((8, 8, 6), (16, 4, 4), nn.Conv2d, (5, 3), (1, 1)),   # not twice in both sizes
])
def test_fitnet_regressor_maps_the_student_map_onto_the_teacher_map(
        student: tuple[int, ...], teacher: tuple[int, ...], kind: type, kernel: tuple[int, int],
        stride: tuple[int, int]) -> None:
    loss = cast(FitNet, build("fitnet"))
    loss.setup(FeatureSetup((student,), (teacher,), num_samples=8, num_classes=2))
    r = cast(nn.Sequential, loss.regressors[0])
    conv = cast(nn.Conv2d, r[0])
    assert type(conv) is kind and conv.kernel_size == kernel and conv.stride == stride
    assert isinstance(r[1], nn.BatchNorm2d) and isinstance(r[2], nn.ReLU)
    assert r(torch.randn(2, *student)).shape[1:] == teacher
    assert any(k.startswith("regressors.0.") for k in loss.state_dict())


@pytest.mark.parametrize("student,teacher,match", [
    ((8, 3, 3), (16, 8, 8), r"fitnet cannot map the student's 3x3 feature map to the teacher's 8x8"),
    ((8, 4, 4), (8, 5, 5), r"fitnet cannot map the student's 4x4"),
    ((8, 4, 6), (8, 5, 5), r"fitnet cannot map"),
    ((8, 16), (9, 16), r"fitnet compares tokens one by one, but the student has 8 tokens and the teacher 9"),
])
def test_fitnet_refuses_shapes_it_cannot_map(student: tuple[int, ...], teacher: tuple[int, ...],
                                             match: str) -> None:
    loss = build("fitnet")
    with pytest.raises(OptionError, match=match):
        loss.setup(FeatureSetup(((8, 4, 4), student), ((8, 4, 4), teacher), num_samples=8,
                                num_classes=2))


# ------------------------------------------------------------------------------ CRD
def crd_setup(n: int = 12, labels: Tensor | None = None, shapes: tuple = ((3, 2, 2), (5,)),
              **options: Any) -> CRD:
    loss = cast(CRD, build("crd", **options))
    loss.setup(FeatureSetup((shapes[0],), (shapes[1],), num_samples=n, num_classes=3,
                            train_labels=labels))
    return loss


def test_crd_matches_the_paper() -> None:
    """Tian et al. eq. 18 with RepDistiller's ContrastMemory: P(j | e) = exp(<m_j, e> / T) / Z,
    Z = N * the mean over the first batch; -(sum log h(positive) + sum log (1 - h(negative))) / B
    with h = P / (P + K / N), both anchors summed; then the momentum update of the memory."""
    n, k, dim, t, mom = 12, 5, 4, 0.5, 0.25
    loss = crd_setup(n, dim=dim, negatives=k, t=t, momentum=mom).double()
    s, te = randn(3, 3, 2, 2, seed=1), randn(3, 5, seed=2)
    idx = torch.tensor([1, 7, 4])
    fixed = torch.tensor([[1, 0, 2, 2, 9, 11], [7, 3, 3, 0, 1, 5], [4, 10, 8, 6, 2, 1]])
    loss.contrast_indices = lambda indices: fixed
    mem_s0, mem_t0 = loss.memory_s.clone(), loss.memory_t.clone()
    ws, bs = loss.embed_s.linear.weight.detach(), loss.embed_s.linear.bias.detach()
    wt, bt = loss.embed_t.linear.weight.detach(), loss.embed_t.linear.bias.detach()

    def embed(x: Tensor, w: Tensor, b: Tensor) -> list[Tensor]:
        out = []
        for row in x:
            z = torch.stack([torch.dot(w[d], row) + b[d] for d in range(len(b))])
            out.append(z / z.pow(2).sum().sqrt())
        return out

    def direction(anchors: list[Tensor], memory: Tensor) -> Tensor:
        raw = [[torch.exp(torch.dot(memory[int(j)], e) / t) for j in fixed[b]] for b, e in enumerate(anchors)]
        z = n * sum(v.detach() for r in raw for v in r) / (len(raw) * (k + 1))
        noise = k / n
        acc = torch.zeros((), dtype=D)
        for r in raw:
            pos = r[0] / z
            acc = acc + torch.log(pos / (pos + noise + 1e-7))
            for v in r[1:]:
                acc = acc + torch.log(noise / (v / z + noise + 1e-7))
        return -acc / len(raw)

    def paper(x: list[Tensor]) -> Tensor:
        es = embed(x[0].reshape(3, 3, 4).mean(-1), ws, bs)
        et = embed(te, wt, bt)
        return direction(es, mem_t0) + direction(et, mem_s0)

    got = value_and_grads(loss, [s], [te], FeatureBatch(torch.zeros(3), idx, epoch=1))
    assert_matches(got, paper_value_and_grads(paper, [s]))
    assert got[0] > 0

    # the memory rows of the batch: normalise(momentum * m + (1 - momentum) * e), the others kept
    es = torch.stack(embed(s.reshape(3, 3, 4).mean(-1), ws, bs))
    et = torch.stack(embed(te, wt, bt))
    for memory, before, e in ((loss.memory_s, mem_s0, es), (loss.memory_t, mem_t0, et)):
        for b, i in enumerate(idx.tolist()):
            mixed = mom * before[i] + (1 - mom) * e[b]
            torch.testing.assert_close(memory[i], mixed / mixed.norm())
        others = [i for i in range(n) if i not in idx.tolist()]
        assert torch.equal(memory[others], before[others])


def test_crd_sets_z_once_from_the_first_batch_and_keeps_it() -> None:
    loss = crd_setup(negatives=7)
    assert float(loss.z_s) < 0 and float(loss.z_t) < 0
    batch = FeatureBatch(torch.zeros(4), torch.tensor([0, 3, 6, 9]))
    loss([torch.randn(4, 3, 2, 2)], [torch.randn(4, 5)], batch)
    z = float(loss.z_s), float(loss.z_t)
    assert z[0] > 0 and z[1] > 0
    loss([torch.randn(4, 3, 2, 2) * 5], [torch.randn(4, 5)], batch)
    assert (float(loss.z_s), float(loss.z_t)) == z


def test_crd_memory_is_initialised_uniformly_as_repdistiller() -> None:
    torch.manual_seed(0)
    loss = crd_setup(n=400, dim=12)
    stdv = 1 / math.sqrt(12 / 3)
    for memory in (loss.memory_s, loss.memory_t):
        assert memory.shape == (400, 12)
        assert float(memory.min()) >= -stdv and float(memory.max()) < stdv
        assert float(memory.min()) < -0.95 * stdv and float(memory.max()) > 0.95 * stdv
    assert not torch.equal(loss.memory_s, loss.memory_t)


def test_crd_changes_only_the_memory_rows_of_the_batch() -> None:
    loss = crd_setup(negatives=9)
    before = loss.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    idx = torch.tensor([2, 5, 11])
    loss([torch.randn(3, 3, 2, 2)], [torch.randn(3, 5)], FeatureBatch(torch.zeros(3), idx))
    for key in ("memory_s", "memory_t"):
        after = loss.state_dict()[key]
        changed = [i for i in range(12) if not torch.equal(after[i], before[key][i])]
        assert changed == [2, 5, 11], key
        torch.testing.assert_close(after[idx].norm(dim=1), torch.ones(3))


def test_crd_negatives_in_exact_mode_never_come_from_the_anchors_class() -> None:
    labels = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 2, 0, 1, 2, 0, 1, 1, 2])
    loss = crd_setup(16, labels=labels, negatives=4000)
    torch.manual_seed(3)
    idx = torch.tensor([0, 1, 2, 8, 13])
    sample = loss.contrast_indices(idx)
    assert sample.shape == (5, 4001) and torch.equal(sample[:, 0], idx)
    for row, i in zip(sample[:, 1:], idx):
        assert (labels[row] != labels[i]).all()
        allowed = (labels != labels[i]).nonzero().flatten()
        counts = torch.bincount(row, minlength=16)[allowed].double()
        # every sample of another class is drawn, uniformly (with replacement)
        expected = 4000 / len(allowed)
        assert (counts > 0).all() and float((counts - expected).abs().max()) < 0.15 * expected


def test_crd_negatives_without_labels_are_every_other_sample_uniformly() -> None:
    loss = crd_setup(10, negatives=9000)
    torch.manual_seed(4)
    idx = torch.tensor([0, 4, 9])
    sample = loss.contrast_indices(idx)
    assert torch.equal(sample[:, 0], idx)
    for row, i in zip(sample[:, 1:], idx.tolist()):
        counts = torch.bincount(row, minlength=10).double()
        assert counts[i] == 0
        others = torch.cat([counts[:i], counts[i + 1:]])
        assert float((others - 1000).abs().max()) < 150


def test_crd_negatives_follow_the_global_seed() -> None:
    loss = crd_setup(20, negatives=50)
    idx = torch.tensor([3, 4])
    torch.manual_seed(11)
    a = loss.contrast_indices(idx)
    torch.manual_seed(11)
    assert torch.equal(a, loss.contrast_indices(idx))
    assert not torch.equal(a, loss.contrast_indices(idx))


def test_crd_state_dict_holds_memory_z_and_embeddings_and_resumes() -> None:
    labels = torch.arange(12) % 3
    torch.manual_seed(0)
    loss = crd_setup(12, labels=labels, negatives=6)
    batch = FeatureBatch(torch.zeros(2), torch.tensor([1, 2]))
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 5)
    loss([s], [t], batch)
    state = loss.state_dict()
    assert set(state) == {"z_s", "z_t", "memory_s", "memory_t", "embed_s.linear.weight",
                          "embed_s.linear.bias", "embed_t.linear.weight", "embed_t.linear.bias"}
    resumed = crd_setup(12, labels=labels, negatives=6)
    resumed.load_state_dict(state)
    torch.manual_seed(5)
    want = loss([s], [t], batch)
    torch.manual_seed(5)
    torch.testing.assert_close(resumed([s], [t], batch), want)
    torch.testing.assert_close(resumed.state_dict()["memory_s"], loss.state_dict()["memory_s"])


@pytest.mark.parametrize("setup,match", [
    (FeatureSetup(((8,), (8,)), ((8,), (8,)), num_samples=8, num_classes=2),
     "crd is defined on one pair of features: give exactly one point, got 2"),
    (FeatureSetup(((8,),), ((8,),), num_samples=4, num_classes=2, train_labels=torch.zeros(4)),
     "crd draws its negatives from other classes, but every training sample has the same label"),
    (FeatureSetup(((8,),), ((8,),), num_samples=4, num_classes=2, train_labels=torch.zeros(5)),
     r"crd needs train labels: 4 class indices >= 0, got a tensor of shape \[5\]"),
])
def test_crd_refuses_what_it_cannot_do(setup: FeatureSetup, match: str) -> None:
    with pytest.raises(OptionError, match=match) as err:
        build("crd").setup(setup)
    if "one point" in match:
        assert err.value.key == "points"


def test_crd_set_up_without_a_training_set_refuses_to_run_not_to_be_built() -> None:
    """A recipe validated without its data sets up with one sample: only training needs two."""
    loss = crd_setup(1, negatives=3)
    with pytest.raises(ValueError, match="crd needs a training set of at least 2 samples"):
        loss([torch.randn(2, 3, 2, 2)], [torch.randn(2, 5)], FeatureBatch(torch.zeros(2), torch.tensor([0, 0])))


def test_crd_joins_any_channels_and_pools_by_default() -> None:
    loss = crd_setup(shapes=((7, 4, 4), (3, 2, 2)), dim=6)
    assert loss.embed_s.linear.in_features == 7 and loss.embed_t.linear.in_features == 3
    loss = crd_setup(shapes=((7, 4, 4), (3, 2, 2)), dim=6, pool=False)
    assert loss.embed_s.linear.in_features == 112 and loss.embed_t.linear.in_features == 12
    assert loss.embed_s.linear.out_features == 6


# ------------------------------------------------------------------------------ invariants
def small(name: str) -> dict[str, Any]:
    """Options that keep a test small: CRD with a few negatives."""
    return {"negatives": 5} if name == "crd" else {}


seeds = st.integers(0, 2**31 - 1)
settings_ = settings(max_examples=20, deadline=None)


def features(seed: int, b: int = 4, c: int = 3, h: int = 2) -> Tensor:
    return randn(b, c, h, h, seed=seed)


@settings_
@given(seed=seeds, name=st.sampled_from(["at", "sp", "pkt", "rkd"]))
def test_same_features_give_zero_loss(seed: int, name: str) -> None:
    f = features(seed)
    loss = ready(name, [f], [f])
    assert abs(float(loss([f], [f.clone()], FeatureBatch(torch.zeros(4))).detach())) < 1e-12


@settings_
@given(seed=seeds, name=st.sampled_from(NAMES))
def test_losses_are_not_negative(seed: int, name: str) -> None:
    s, t = features(seed), features(seed + 1) * 2
    loss = ready(name, [s], [t], num_samples=8, **small(name))
    batch = FeatureBatch(torch.zeros(4), torch.tensor([0, 2, 4, 6]))
    assert float(loss([s], [t], batch).detach()) >= -1e-9


@settings_
@given(seed=seeds, scale=st.floats(0.05, 20.0), pool=st.booleans())
def test_rkd_is_invariant_to_scaling_the_features(seed: int, scale: float, pool: bool) -> None:
    s, t = features(seed), features(seed + 1)
    loss = ready("rkd", [s], [t], pool=pool)
    batch = FeatureBatch(torch.zeros(4))
    torch.testing.assert_close(loss([s * scale], [t], batch), loss([s], [t], batch))
    torch.testing.assert_close(loss([s], [t / scale], batch), loss([s], [t], batch))


@settings_
@given(seed=seeds, perm=st.permutations(range(5)), name=st.sampled_from(["sp", "pkt", "rkd"]))
def test_relational_losses_are_invariant_to_permuting_the_batch(seed: int, perm: list[int],
                                                              name: str) -> None:
    s, t, p = features(seed, b=5), features(seed + 1, b=5), torch.tensor(perm)
    loss = ready(name, [s], [t])
    batch = FeatureBatch(torch.zeros(5))
    torch.testing.assert_close(loss([s[p]], [t[p]], batch), loss([s], [t], batch))


@settings_
@given(seed=seeds, scales=st.lists(st.floats(0.01, 100.0), min_size=4, max_size=4),
       p=st.sampled_from([1.0, 2.0, 3.0]))
def test_at_is_invariant_to_positive_scaling_of_a_feature_map(seed: int, scales: list[float],
                                                             p: float) -> None:
    s, t = features(seed, h=4), features(seed + 1, c=5, h=2)
    loss = ready("at", [s], [t], p=p)
    batch = FeatureBatch(torch.zeros(4))
    c = torch.tensor(scales, dtype=D)[:, None, None, None]
    torch.testing.assert_close(loss([s * c], [t], batch), loss([s], [t], batch))
    torch.testing.assert_close(loss([s], [t / c], batch), loss([s], [t], batch))


@settings_
@given(seed=seeds, scales=st.lists(st.floats(0.5, 100.0), min_size=4, max_size=4))
def test_pkt_is_invariant_to_scaling_each_sample(seed: int, scales: list[float]) -> None:
    """Up to its eps = 1e-7 added to the norms (a short pooled vector feels it): scales >= 0.5."""
    s, t = features(seed), features(seed + 1)
    loss = ready("pkt", [s], [t])
    batch = FeatureBatch(torch.zeros(4))
    c = torch.tensor(scales, dtype=D)[:, None, None, None]
    torch.testing.assert_close(loss([s * c], [t], batch), loss([s], [t], batch), rtol=1e-3, atol=0.0)


# ------------------------------------------------------------------------------ the teacher's side
@pytest.mark.parametrize("name", NAMES)
def test_the_teacher_gets_no_gradient_and_the_student_does(name: str) -> None:
    s = features(1, c=3, h=4).requires_grad_(True)
    t = features(2, c=5, h=4).requires_grad_(True)
    loss = ready(name, [s], [t], num_samples=8, **small(name))
    value = loss([s], [t], FeatureBatch(torch.zeros(4), torch.tensor([0, 1, 2, 3])))
    value.backward()
    assert t.grad is None
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", ["sp", "pkt", "rkd"])
def test_a_relational_loss_of_a_batch_of_one_is_finite(name: str) -> None:
    s = features(1, b=1).requires_grad_(True)
    value = ready(name, [s], [features(2, b=1)])([s], [features(2, b=1)], FeatureBatch(torch.zeros(1)))
    assert math.isfinite(float(value.detach()))
    value.backward()


# ------------------------------------------------------------------------------ registry, options, shapes
def test_every_method_is_registered_with_its_default_weight(capsys: pytest.CaptureFixture[str]) -> None:
    weights = {"at": 1000.0, "crd": 0.8, "fitnet": 100.0, "pkt": 30000.0, "rkd": 1.0, "sp": 3000.0}
    for name, weight in weights.items():
        loss = build(name)
        assert loss.default_weight == weight and loss.needs_indices == (name == "crd")
        assert loss.__doc__ and "Default weight" in loss.__doc__
    assert main(["list", "feature_losses"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:]] == NAMES
    for line in out[1:]:
        name = line.split()[0]
        assert f"weight {weights[name]:g}" in line, line


@pytest.mark.parametrize("name,options,lines", [
    ("at", {"p": -1}, ["p must be a finite number > 0, got -1.0 @ PATH.p"]),
    ("at", {"p": float("nan")}, ["p must be a finite number > 0, got nan @ PATH.p"]),
    ("rkd", {"distance": -1.0, "angle": float("inf")},
     ["distance must be a finite weight >= 0, got -1.0 @ PATH.distance",
      "angle must be a finite weight >= 0, got inf @ PATH.angle"]),
    ("rkd", {"distance": 0.0, "angle": 0.0}, ["distance and angle are 0: the loss would be 0 @ PATH.angle"]),
    ("crd", {"dim": 0, "negatives": -3, "t": 0.0, "momentum": 1.0},
     ["dim must be a positive integer, got 0 @ PATH.dim",
      "negatives must be a positive integer, got -3 @ PATH.negatives",
      "t must be a finite number > 0, got 0.0 @ PATH.t",
      "momentum must lie in [0, 1), got 1.0 @ PATH.momentum"]),
    ("crd", {"pool": 1}, ["@ PATH.pool"]),
    ("pkt", {"p": 2}, ["unknown option 'p' for feature_loss 'pkt'; accepted: pool, tokens @ PATH.p"]),
    ("fitnet", {"pool": True}, ["@ PATH.pool"]),
])
def test_bad_options_are_one_line_each(name: str, options: dict[str, Any], lines: list[str]) -> None:
    with pytest.raises(RecipeError) as err:
        build(name, **options)
    got = err.value.problems
    assert len(got) == len(lines), got
    for line, want in zip(got, lines):
        assert line.endswith(want.replace("PATH", PATH)), (line, want)


def test_at_refuses_features_that_are_not_maps_and_the_others_join_any_shapes() -> None:
    with pytest.raises(OptionError, match=r"at needs \[C, H, W\] feature maps, got \[16, 8\]"):
        build("at").setup(FeatureSetup(((16, 8),), ((4, 4, 4),), num_samples=4, num_classes=2))
    for name in ("sp", "pkt", "rkd"):
        loss = build(name)
        loss.setup(FeatureSetup(((16, 8), (3, 2, 2)), ((7,), (9, 1, 1)), num_samples=4, num_classes=2))
        value = loss([torch.randn(3, 16, 8), torch.randn(3, 3, 2, 2)],
                     [torch.randn(3, 7), torch.randn(3, 9, 1, 1)], FeatureBatch(torch.zeros(3)))
        assert value.dim() == 0 and math.isfinite(float(value.detach()))


@pytest.mark.parametrize("rows", [40, 100])   # 40 <= 8 * 6: one matrix product; 100: gathered rows
def test_crd_scores_are_the_drawn_rows_dot_the_anchor_by_either_path(rows: int) -> None:
    from kdreg_plugins.feature_losses import _scores

    gen = torch.Generator().manual_seed(rows)
    memory = torch.randn(rows, 8, generator=gen)
    sample = torch.randint(0, rows, (4, 6), generator=gen)
    anchor = torch.randn(4, 8, generator=gen, requires_grad=True)
    got = _scores(memory, sample, anchor)
    (got * torch.arange(24.0).view(4, 6)).sum().backward()
    grad = anchor.grad.clone()
    anchor.grad = None
    expected = torch.stack([torch.stack([memory[sample[b, j]] @ anchor[b] for j in range(6)]) for b in range(4)])
    (expected * torch.arange(24.0).view(4, 6)).sum().backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, anchor.grad)
