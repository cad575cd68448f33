"""``kdreg report RUN_DIR``: a picture of a run (learning curves and accuracy per sub-model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdreg.errors import UserError


def read_run(directory: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The metrics lines and results of a run directory; a clear error when they are missing."""
    metrics_file, results_file = directory / "metrics.jsonl", directory / "results.json"
    if not metrics_file.is_file():
        if (directory / "recipe.toml").is_file():
            raise UserError(f"{metrics_file} is missing: the run wrote no metrics.jsonl (add \"jsonl\" "
                            "to [train] loggers to plot a run)")
        raise UserError(f"{directory} is not a kdreg run directory: {metrics_file} is missing")
    problems, metrics = [], []
    for n, line in enumerate(metrics_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError as exc:
            problems.append(f"{metrics_file}:{n}: not JSON: {exc.msg}")
    if problems:
        raise UserError(problems)
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"stages": []}
    return metrics, results


def plot_run(directory: Path, out: Path | None = None) -> Path:
    """Write ``report.png``: per stage, validation accuracy per epoch of every sub-model, and
    the final test accuracy against parameters. Returns the file written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, results = read_run(directory)
    stages = list(dict.fromkeys(m["stage"] for m in metrics))
    if not stages:
        raise UserError(f"{directory / 'metrics.jsonl'} holds no epoch yet")
    labels = {s["name"]: s["submodels"] for s in results.get("stages", [])}
    fig, axes = plt.subplots(len(stages), 2, figsize=(11, 3.8 * len(stages)), squeeze=False)
    for row, stage in zip(axes, stages):
        lines = [m for m in metrics if m["stage"] == stage]
        epochs = [m["epoch"] for m in lines]
        key = "val_accuracy" if lines[0]["val_accuracy"] else "train_accuracy"
        n = len(lines[0][key])
        names = labels.get(stage, [f"sub-model {i}" for i in range(n)])
        for i in range(n):
            row[0].plot(epochs, [m[key][i] for m in lines], label=names[i])
        row[0].set(title=f"{stage}: {key.replace('_', ' ')}", xlabel="epoch", ylabel="accuracy (%)")
        row[0].legend(fontsize=8)
        row[0].grid(alpha=0.3)
        result = next((s for s in results.get("stages", []) if s["name"] == stage), None)
        if result:
            row[1].plot(result["params"], result["test_accuracy"], "o-")
            for x, y, name in zip(result["params"], result["test_accuracy"], result["submodels"]):
                row[1].annotate(name, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
            row[1].set_xscale("log")
            row[1].set(title=f"{stage}: test accuracy at epoch {result['best_epoch']}",
                       xlabel="parameters", ylabel="accuracy (%)")
            row[1].grid(alpha=0.3)
        else:
            row[1].set_axis_off()
            row[1].text(0.5, 0.5, "stage not finished", ha="center")
    fig.tight_layout()
    out = out or directory / "report.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
