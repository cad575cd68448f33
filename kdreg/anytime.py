"""Anytime evaluation of an early-exit stage: MSDNet's budgeted batch classification.

An image leaves the network at the first exit whose confidence (its largest softmax probability)
exceeds that exit's threshold; the last exit takes every image still there. For a budget
parameter ``p`` the wanted share of images leaving at exit ``k`` (1-based, of ``K``) is
``q_k = p^k / sum_j p^j`` (Huang et al., MSDNet, and its reference code, ``p = 0.05 .. 1.95``).
The thresholds are fixed on the validation split, exit by exit: of the images still there, the
``n_k`` most confident leave at exit ``k``, where ``n_1 + .. + n_k = floor(N * (q_1 + .. + q_k))``
(rounded cumulatively, so that a larger ``p`` never lets more images leave by exit ``k``; images
tied at a threshold stay, and the next exit makes up for them). The
test split, with those thresholds, gives one point of the curve: the average MACs per image
(``sum_k fraction_k * macs_k``, with ``macs_k`` the cumulative cost of running up to exit ``k``)
and the accuracy. ``p = 0`` (all at the first exit) and ``p = inf`` (all at the last) end the curve.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from kdreg.backbone import FlexibleBackbone
from kdreg.engine.device import autocast
from kdreg.errors import UserError
from kdreg.normalise import normalise

#: MSDNet's budget parameters (``p = 1/20 .. 39/20``), between the two ends ``0`` and ``inf``.
GRID: tuple[float, ...] = (0.0, *(i / 20 for i in range(1, 40)), math.inf)


# ---------------------------------------------------------------------------- the procedure
def exit_proportions(p: float, num_exits: int) -> np.ndarray:
    """``q_k`` proportional to ``p^k``, ``k = 1..num_exits``; ``p = 0``: all at the first exit,
    ``p = inf``: all at the last."""
    if p <= 0:
        return np.eye(num_exits)[0]
    if math.isinf(p):
        return np.eye(num_exits)[-1]
    logw = np.arange(1, num_exits + 1) * math.log(p)
    w = np.exp(logw - logw.max())
    return w / w.sum()


def exit_counts(proportions: Sequence[float] | np.ndarray, total: int) -> list[int]:
    """How many of ``total`` images should leave at each exit: cumulative counts
    ``floor(total * (q_1 + .. + q_k))``, the last exit the rest."""
    cumulative = [math.floor(total * float(c) + 1e-9) for c in np.cumsum(proportions)[:-1]]
    cumulative = [min(c, total) for c in cumulative] + [total]
    return [c - b for c, b in zip(cumulative, [0, *cumulative[:-1]])]


def fit_thresholds(confidence: np.ndarray, counts: Sequence[int]) -> list[float]:
    """Thresholds in ``[0, 1]`` per exit (``confidence``: ``[exits, images]``) such that the
    ``counts[k]`` most confident of the images still there leave at exit ``k`` (``confidence >
    threshold``); the last threshold is 0 (everything left leaves). Images tied at a threshold all
    stay; the next exit then takes those it is short of (``counts[:k + 1]`` leave by exit ``k``
    whenever the confidences allow)."""
    num_exits, total = confidence.shape
    there = np.ones(total, dtype=bool)
    thresholds = []
    for k in range(num_exits - 1):
        ranked = np.sort(confidence[k][there])[::-1]
        want = sum(counts[: k + 1]) - (total - int(there.sum()))   # still to leave by exit k
        if want <= 0:
            t = 1.0                       # no confidence exceeds 1
        elif want >= len(ranked):
            t = 0.0                       # every confidence exceeds 0
        else:
            t = float(ranked[want])       # the most confident one that stays
        thresholds.append(t)
        there &= ~(confidence[k] > t)
    return [*thresholds, 0.0]


def exits_taken(confidence: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """The exit (0-based) each image leaves at: the first whose confidence exceeds its threshold."""
    leaves = confidence > np.asarray(thresholds, dtype=float)[:, None]
    leaves[-1] = True
    return leaves.argmax(axis=0)


@attrs.frozen
class Outcome:
    """Where the images of one split left, what it cost on average and how many were right."""

    fractions: list[float]
    avg_macs: float
    accuracy: float


def outcome(confidence: np.ndarray, correct: np.ndarray, macs: Sequence[int],
            thresholds: Sequence[float]) -> Outcome:
    """The split's exit fractions, average MACs per image and accuracy (%) under ``thresholds``;
    ``correct``: ``[exits, images]``, whether each exit's prediction is right."""
    num_exits, total = confidence.shape
    taken = exits_taken(confidence, thresholds)
    fractions = np.bincount(taken, minlength=num_exits) / total
    right = correct[taken, np.arange(total)]
    return Outcome([float(f) for f in fractions], float(np.dot(fractions, np.asarray(macs, dtype=float))),
                   100.0 * float(right.mean()))


@attrs.frozen
class ExitOutputs:
    """Every exit's confidence and correctness on one split (``[exits, images]``)."""

    confidence: np.ndarray
    correct: np.ndarray

    @classmethod
    def of(cls, logits: Tensor, labels: Tensor) -> ExitOutputs:
        """From logits ``[exits, images, classes]`` and labels ``[images]``."""
        probs = torch.softmax(logits.double(), dim=-1)
        conf, pred = probs.max(dim=-1)
        return cls(conf.numpy(), (pred == labels[None]).numpy())

    @property
    def accuracy(self) -> list[float]:
        return [100.0 * float(c) for c in self.correct.mean(axis=1)]


def budget_curve(val: ExitOutputs, test: ExitOutputs, macs: Sequence[int],
                 grid: Iterable[float] = GRID) -> list[dict[str, Any]]:
    """One point per budget parameter ``p``: thresholds fixed on ``val``, outcome on ``test``."""
    num_exits, total = val.confidence.shape
    points = []
    for p in grid:
        q = exit_proportions(p, num_exits)
        thresholds = fit_thresholds(val.confidence, exit_counts(q, total))
        on_val = outcome(val.confidence, val.correct, macs, thresholds)
        on_test = outcome(test.confidence, test.correct, macs, thresholds)
        points.append({
            "p": None if math.isinf(p) else p,
            "proportions": [float(x) for x in q],
            "budget_macs": float(np.dot(q, np.asarray(macs, dtype=float))),
            "thresholds": thresholds,
            "val_avg_macs": on_val.avg_macs, "val_accuracy": on_val.accuracy,
            "val_exit_fractions": on_val.fractions,
            "avg_macs": on_test.avg_macs, "accuracy": on_test.accuracy, "exit_fractions": on_test.fractions,
        })
    return points


# ---------------------------------------------------------------------------- a trained run
@torch.no_grad()
def exit_logits(model: FlexibleBackbone, batches: Iterable[tuple[Tensor, ...]], *, device: torch.device,
                dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Logits ``[exits, images, classes]`` (float32, on the CPU) and labels of a single-pass model."""
    model.eval()
    logits, labels = [], []
    for x, y, *_ in batches:
        with autocast(device, dtype):
            outs = model(normalise(model, x))
        logits.append(torch.stack([o.float() for o in outs]).cpu())
        labels.append(y.cpu())
    return torch.cat(logits, dim=1), torch.cat(labels)


def stage_problems(name: str, model: FlexibleBackbone) -> list[str]:
    """Why stage ``name`` cannot exit early: one sub-model, or several that need a pass each."""
    if model.num_submodels == 1:
        return [f"stage {name!r} has one sub-model ({model.submodel_labels[0]}): no exit to leave at early; "
                "anytime evaluation needs a multi-exit stage"]
    if not model.single_pass:
        return [f"stage {name!r} is multi-pass ({', '.join(model.submodel_labels)}: each needs its own "
                "forward pass, an image cannot leave one early); anytime evaluation needs a single-pass "
                "multi-exit stage"]
    return []


def evaluate_run(directory: Path, stage: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The anytime curve of ``stage`` (default: the last trained one) of the run in ``directory``."""
    from kdreg.data.loading import load_data
    from kdreg.engine.device import resolve_precision
    from kdreg.engine.run import Run
    from kdreg.engine.trainer import eval_loader

    run = Run.resume(directory, progress=False, overrides=overrides)
    if run.recipe.data.val_split == 0:
        raise UserError(f"{directory}: the run held out no validation split to choose thresholds on "
                        "@ recipe.data.val_split (0)")
    splits = load_data(run.recipe.data)
    found = None
    trained = []
    for plan, model in run.trained_stages(splits):
        trained.append(plan.name)
        if stage is None or plan.name == stage:
            found = (plan, model)
            if stage is not None:
                break
    if found is None:
        if not trained:
            raise UserError(f"{directory} holds no trained stage yet (no checkpoints/<stage>/best.pt)")
        raise UserError(f"{directory} has no trained stage {stage!r}; trained: {', '.join(trained)}")
    plan, model = found
    problems = stage_problems(plan.name, model)
    if problems:
        raise UserError([f"{directory}: {p}" for p in problems])
    dtype = resolve_precision(plan.train.precision, run.device)
    batch = run.recipe.data.eval_batch_size
    outputs = {part: ExitOutputs.of(*exit_logits(model, eval_loader(splits, part, batch, run.device),
                                                 device=run.device, dtype=dtype))
               for part in ("val", "test")}
    macs = model.count_macs()
    labels = list(model.submodel_labels)
    return {
        "run": str(directory), "recipe": run.recipe.name, "seed": run.recipe.seed, "stage": plan.name,
        "overrides": list(overrides),
        "rule": "an image leaves at the first exit whose largest softmax probability exceeds the exit's "
                "threshold (the last exit's is 0: it takes the rest); thresholds fixed on the validation split",
        "val_images": len(splits.val), "test_images": len(splits.test),
        "submodels": labels, "macs": macs,
        "exits": [{"submodel": label, "macs": m, "val_accuracy": va, "test_accuracy": ta}
                  for label, m, va, ta in zip(labels, macs, outputs["val"].accuracy, outputs["test"].accuracy)],
        "points": budget_curve(outputs["val"], outputs["test"], macs),
    }


def write_json(curve: dict[str, Any], path: Path) -> None:
    """Write ``curve`` atomically (rank 0 only under torchrun)."""
    from kdreg.engine.distributed import is_main

    if not is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(curve, indent=2) + "\n")
    tmp.replace(path)


def summary(curve: dict[str, Any], every: int = 5) -> str:
    """A short table: each exit alone, then every ``every``-th point of the curve and the last."""
    lines = [f"stage {curve['stage']}: thresholds chosen on {curve['val_images']} validation images, "
             f"tested on {curve['test_images']}",
             f"{'exit':<10} {'MMACs':>8} {'test acc':>9}"]
    lines += [f"{e['submodel']:<10} {e['macs'] / 1e6:>8.3f} {e['test_accuracy']:>9.2f}" for e in curve["exits"]]
    lines.append(f"{'p':<10} {'avg MMACs':>9} {'test acc':>9}  exit fractions (%)")
    points = curve["points"]
    for i, pt in enumerate(points):
        if i % every == 0 or i == len(points) - 1:
            p = "inf" if pt["p"] is None else f"{pt['p']:.2f}"
            shares = " ".join(f"{100 * f:.0f}" for f in pt["exit_fractions"])
            lines.append(f"{p:<10} {pt['avg_macs'] / 1e6:>9.3f} {pt['accuracy']:>9.2f}  {shares}")
    return "\n".join(lines)
