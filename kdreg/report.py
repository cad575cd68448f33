"""``kdreg report DIR... [--out DIR]``: the paper-style table and plots of runs, repeats and methods.

Every directory (a run, or a repeat over seeds) is one column: one stage (``--stage``, default each
run's last) of each of its runs. Columns must be comparable (:func:`kdreg.rundirs.load_columns`).
Written into the output folder: ``report.md`` (a row per sub-model with its parameters and MACs,
a column per method, mean +- std over seeds, the best of each row in bold), ``accuracy.png``
(accuracy per sub-model), ``accuracy_vs_macs.png``, ``curves.png`` (learning curves, the mean
over seeds) and, when some run has ``kdreg eval --anytime`` results, ``anytime.png``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from kdreg.errors import UserError
from kdreg.rundirs import Column, load_columns, mean_std

REPORT_FILE = "report.md"
PLOTS = ("accuracy.png", "accuracy_vs_macs.png", "curves.png", "anytime.png")


def write_report(directories: list[Path], out: Path, stage: str | None = None) -> list[Path]:
    """Write the report of ``directories`` into the folder ``out``; returns the files written."""
    columns = load_columns(directories, stage)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    written = [plot_accuracy(columns, out / "accuracy.png"),
               plot_accuracy_vs_macs(columns, out / "accuracy_vs_macs.png")]
    curves = plot_curves(columns, out / "curves.png")
    anytime = plot_anytime(columns, out / "anytime.png")
    written += [p for p in (curves, anytime) if p is not None]
    md = out / REPORT_FILE
    md.write_text(markdown(columns, [p.name for p in written]))
    return [md, *written]


# ---------------------------------------------------------------------------- the table
def _cell(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _macs(m: float) -> str:
    return f"{m / 1e6:.3g}"


def table(columns: list[Column]) -> str:
    """The Markdown table: a row per sub-model and a ``mean`` row; a column per method."""
    head = ["sub-model", "params", "MMACs", *(c.label.replace("|", "\\|") for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|"]
    stats = []
    for c in columns:
        acc = c.test_accuracy()
        with_mean = np.concatenate([acc, acc.mean(axis=1, keepdims=True)], axis=1)  # mean per seed run
        stats.append(mean_std(with_mean))
    first = columns[0]
    rows = [(label, f"{p:,}", _macs(m)) for label, p, m in zip(first.submodels, first.params, first.macs)]
    rows.append(("mean", "", ""))
    for i, row in enumerate(rows):
        cells = [_cell(float(mean[i]), None if std is None else float(std[i])) for mean, std in stats]
        shown = [round(float(mean[i]), 2) for mean, _ in stats]
        best = max(shown)
        cells = [f"**{cell}**" if s == best and len(columns) > 1 else cell for cell, s in zip(cells, shown)]
        lines.append("| " + " | ".join([*row, *cells]) + " |")
    return "\n".join(lines)


def _runs(c: Column) -> str:
    seeds = c.seeds
    kind = f"repeat of {len(seeds)} runs, seeds {', '.join(map(str, seeds))}" if c.repeat else f"one run, seed {seeds[0]}"
    epochs = sorted({r.get("epochs") for r in c.results}, key=str)
    return f"{kind}, {'/'.join(map(str, epochs))} epochs"


def markdown(columns: list[Column], plots: list[str]) -> str:
    """``report.md``: the table, what each column is and the plots."""
    first = columns[0]
    data = first.runs[0].data
    stages = sorted({c.stage for c in columns})
    lines = [
        f"# kdreg report: stage {', '.join(stages)} on {data['dataset']}",
        "",
        "Test accuracy (%) of every sub-model at each run's selected epoch (the best mean validation "
        "accuracy). A repeat's cell is the mean ± the sample standard deviation (ddof = 1) over its seed "
        "runs; a single run's has no ±. `mean` is the mean over sub-models. The best of each row is in "
        "bold; params and MMACs (millions of multiply-accumulates per image) are the sub-model's.",
        "",
        table(columns),
        "",
        "Columns:",
        "",
    ]
    for c in columns:
        lines.append(f"- `{c.label}`: recipe `{c.recipe}`, stage `{c.stage}` (graph `{c.method}`), "
                     f"`{c.directory}`: {_runs(c)}")
    missing = [c.label for c in columns if not any(r.metrics(c.stage) for r in c.runs)]
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in plots) + "."]
    if missing:
        lines.append(f"No learning curves for {', '.join(missing)}: no metrics.jsonl (the `jsonl` logger).")
    if "anytime.png" not in plots:
        lines.append("No anytime curve: no run has one yet (`kdreg eval DIR --anytime` on an early-exit run).")
    else:
        lines += ["", anytime_table(columns)]
    return "\n".join(lines) + "\n"


def anytime_table(columns: list[Column]) -> str:
    """Test accuracy of the anytime policy at the MACs of each exit alone (interpolated on its
    curve), against the exit alone."""
    rows = ["Anytime (`anytime.png`): test accuracy (%) of the early-exit policy at the average MACs "
            "of each exit alone, interpolated on its curve (the mean over seeds), vs the exit alone:", "",
            "| exit | MMACs | " + " | ".join(f"{c.label}: exit alone / anytime" for c in columns) + " |",
            "|" + "|".join(["---", "--:"] + ["--:"] * len(columns)) + "|"]
    curves = [_anytime_mean(c) for c in columns]
    first = columns[0]
    for i, (label, m) in enumerate(zip(first.submodels, first.macs)):
        cells = []
        for curve in curves:
            if curve is None:
                cells.append("-")
                continue
            x, y, exits = curve
            cells.append(f"{exits[i]:.2f} / {float(np.interp(m / 1e6, x, y)):.2f}")
        rows.append(f"| {label} | {_macs(m)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------- the plots
def _figure(width: float = 7.5, height: float = 4.6) -> Any:
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _legend(c: Column) -> str:
    k = len(c.runs)
    return f"{c.label} ({k} seeds)" if k > 1 else c.label


def plot_accuracy(columns: list[Column], path: Path) -> Path:
    """Test accuracy per sub-model, a line per method (error bars: std over seeds)."""
    fig, ax = _figure()
    n = len(columns[0].submodels)
    for j, c in enumerate(columns):
        mean, std = mean_std(c.test_accuracy())
        shift = (j - (len(columns) - 1) / 2) * 0.06      # error bars side by side, not on top
        ax.errorbar(np.arange(n) + shift, mean, yerr=std, marker="o", capsize=3, label=_legend(c))
    ax.set_xticks(range(n), columns[0].submodels)
    ax.set(title=f"test accuracy per sub-model (stage {columns[0].stage})", xlabel="sub-model",
           ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _log_x(ax: Any, values: list[float]) -> None:
    if min(values) > 0 and max(values) / min(values) > 8:
        ax.set_xscale("log")


def plot_accuracy_vs_macs(columns: list[Column], path: Path) -> Path:
    """Test accuracy against MACs per image, a line per method, the sub-models named."""
    fig, ax = _figure()
    macs = [m / 1e6 for m in columns[0].macs]
    for c in columns:
        mean, std = mean_std(c.test_accuracy())
        ax.errorbar(macs, mean, yerr=std, marker="o", capsize=3, label=_legend(c))
    top = np.max([mean_std(c.test_accuracy())[0] for c in columns], axis=0)
    for x, y, label in zip(macs, top, columns[0].submodels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    _log_x(ax, macs)
    ax.set(title="test accuracy against cost", xlabel="MMACs per image", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def learning_curves(c: Column) -> tuple[str, np.ndarray, np.ndarray, np.ndarray] | None:
    """Epochs, accuracy ``[seeds, epochs, sub-models]`` and train loss ``[seeds, epochs]`` of a
    column, over the epochs every seed run logged; None without metrics."""
    per_run = [r.metrics(c.stage) for r in c.runs]
    per_run = [m for m in per_run if m]
    if not per_run:
        return None
    epochs = sorted(set.intersection(*({m["epoch"] for m in run} for run in per_run)))
    key = "val_accuracy" if per_run[0][0].get("val_accuracy") else "train_accuracy"
    rows = [{m["epoch"]: m for m in run} for run in per_run]
    acc = np.array([[row[e][key] for e in epochs] for row in rows], dtype=float)
    loss = np.array([[row[e]["train_loss"] for e in epochs] for row in rows], dtype=float)
    return key, np.array(epochs), acc, loss


def plot_curves(columns: list[Column], path: Path) -> Path | None:
    """Learning curves: a panel per sub-model (validation accuracy per epoch, the training accuracy
    when the runs held out no validation split) and one of the training loss; a line per method,
    the mean over seeds with a band of +- one std. None when no run has metrics."""
    import matplotlib.pyplot as plt

    curves = [learning_curves(c) for c in columns]
    if all(cv is None for cv in curves):
        return None
    labels = columns[0].submodels
    panels = len(labels) + 1
    ncols = min(4, panels)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    flat = list(axes.flat)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    key = "val_accuracy"
    for j, (c, cv) in enumerate(zip(columns, curves)):
        if cv is None:
            continue
        key, epochs, acc, loss = cv
        colour = colours[j % len(colours)]
        for i in range(len(labels)):
            _band(flat[i], epochs, acc[:, :, i], colour, _legend(c))
        _band(flat[len(labels)], epochs, loss, colour, _legend(c))
    what = "validation" if key == "val_accuracy" else "training"
    for i, label in enumerate(labels):
        flat[i].set(title=f"{label}: {what} accuracy", xlabel="epoch", ylabel="accuracy (%)")
    flat[len(labels)].set(title="training loss", xlabel="epoch", ylabel="loss")
    from matplotlib.ticker import MaxNLocator

    for ax in flat[:panels]:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs
    for ax in flat[panels:]:
        ax.set_axis_off()
    flat[0].legend(fontsize=8)
    return _save(fig, path)


def _band(ax: Any, x: np.ndarray, values: np.ndarray, colour: str, label: str) -> None:
    mean, std = mean_std(values)
    ax.plot(x, mean, color=colour, label=label, marker="." if len(x) < 20 else None)
    if std is not None:
        ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)


def _anytime_mean(c: Column) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Average MACs (M) and test accuracy of the anytime curve, the mean over the seed runs that
    have one (point by point: every run uses the same budget parameters), and each exit's own
    accuracy; None when no run has one."""
    found = [cv for cv in (r.anytime(c.stage) for r in c.runs) if cv is not None]
    if not found:
        return None
    lengths = {len(cv["points"]) for cv in found}
    if len(lengths) > 1:
        raise UserError(f"{c.directory}: the seed runs' anytime curves have different points "
                        f"({sorted(lengths)}); rerun `kdreg eval --anytime` on each")
    x = np.mean([[pt["avg_macs"] / 1e6 for pt in cv["points"]] for cv in found], axis=0)
    y = np.mean([[pt["accuracy"] for pt in cv["points"]] for cv in found], axis=0)
    exits = np.mean([[e["test_accuracy"] for e in cv["exits"]] for cv in found], axis=0)
    order = np.argsort(x, kind="stable")
    return x[order], y[order], exits


def plot_anytime(columns: list[Column], path: Path) -> Path | None:
    """Anytime accuracy against average MACs per image, a line per method; each exit alone as a
    hollow marker of the method's colour. None when no run has anytime results."""
    import matplotlib.pyplot as plt

    curves = [_anytime_mean(c) for c in columns]
    if all(cv is None for cv in curves):
        return None
    fig, ax = _figure()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    macs = [m / 1e6 for m in columns[0].macs]
    for j, (c, cv) in enumerate(zip(columns, curves)):
        if cv is None:
            continue
        x, y, exits = cv
        colour = colours[j % len(colours)]
        k = sum(r.anytime(c.stage) is not None for r in c.runs)
        ax.plot(x, y, color=colour, label=f"{c.label} ({k} seeds)" if k > 1 else c.label)
        ax.plot(macs, exits, linestyle="none", marker="o", markerfacecolor="none", color=colour)
    ax.plot([], [], linestyle="none", marker="o", markerfacecolor="none", color="grey", label="each exit alone")
    _log_x(ax, macs)
    ax.set(title="anytime prediction: budgeted batch classification", xlabel="average MMACs per image",
           ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
