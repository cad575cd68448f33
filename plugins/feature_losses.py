"""Built-in feature losses: at (attention transfer). Registered exactly as a third-party plugin
registers its own (hook ``kdreg_register_feature_losses``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdreg.errors import OptionError
from kdreg.feature_loss import FeatureBatch, FeatureLoss, FeatureSetup
from kdreg.hookspecs import Register, hookimpl


def attention_map(f: Tensor, p: float) -> Tensor:
    """``normalise(mean_c |f_c|^p)`` flattened per sample (Zagoruyko & Komodakis 2017, eq. 2 with
    the channel mean of the authors' code), L2-normalised: ``[B, H*W]``."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


class AttentionTransfer(FeatureLoss):
    """AT (Zagoruyko & Komodakis, ICLR 2017): ``sum_j mean_(b, k) (Q_s^j - Q_t^j)_(b, k)^2`` over
    the paired points ``j``, ``Q = normalise(mean_c |f_c|^p)``; the larger map is average-pooled
    to the smaller one's size. Default weight 1000 (the paper's beta / 2 with its batch-mean
    ``||.||_2`` written as RepDistiller does)."""

    default_weight = 1000.0

    def __init__(self, p: float = 2.0):
        super().__init__()
        if not p > 0:
            raise OptionError(f"p must be > 0, got {p}", key="p")
        self.p = float(p)

    def setup(self, info: FeatureSetup) -> None:
        for s, t in zip(info.student, info.teacher):
            if len(s) != 3 or len(t) != 3:
                raise OptionError(f"at needs [C, H, W] feature maps, got {list(s)} and {list(t)}")

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor],  # type: ignore[override]
                batch: FeatureBatch) -> Tensor:
        total = student[0].new_zeros(())
        for s, t in zip(student, teacher):
            if s.shape[2:] != t.shape[2:]:
                size = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
                s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
            total = total + (attention_map(s, self.p) - attention_map(t, self.p)).pow(2).mean()
        return total


@hookimpl
def kdreg_register_feature_losses(register: Register) -> None:
    register("at", AttentionTransfer, "attention transfer (Zagoruyko & Komodakis 2017), weight 1000")
