"""Console output of a run, as a run-event plugin: a line per epoch and a table per stage.

Every message is flushed as it is written, so that a log file (``nohup``, CI) gets each epoch's
line when the epoch ends, not when a buffer fills; the progress bar is drawn only on a terminal.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from kdreg.hookspecs import hookimpl


def say(text: str) -> None:
    """Print ``text`` on stdout, above the progress bar if there is one, and flush it."""
    tqdm.write(text)
    if sys.stdout is not None:
        sys.stdout.flush()


def _accs(values: list[float] | None) -> str:
    return " ".join(f"{v:5.1f}" for v in values or [])


@hookimpl
def kdreg_run_started(run: Any) -> None:
    say(f"kdreg run {run.recipe.name!r} on {run.device} -> {run.directory}")
    data = run.results.get("data")
    if data:
        how = (f"{data['workers']} loader workers per process" if data["path"] == "streamed"
               else "decoded once, augmented on the device")
        say(f"data: {data['path']} ({how}), {data['image_size'][0]}x{data['image_size'][1]} images, "
            f"augment {data['augment']}; {data['train_images']} train, {data['val_images']} val, "
            f"{data['test_images']} test images")


@hookimpl
def kdreg_epoch_finished(run: Any, stage: str, record: dict[str, Any]) -> None:
    epochs = run.recipe.stage_train(run.recipe.stage(stage)).epochs
    val = f"  val {_accs(record['val_accuracy'])} (mean {record['mean_val_accuracy']:.2f})" if record["val_accuracy"] else ""
    say(
        f"{stage} epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}  "
        f"train {_accs(record['train_accuracy'])}{val}  {record['images_per_second']:.0f} img/s  "
        f"{record['seconds']:.1f} s"
    )


def stage_table(result: dict[str, Any]) -> str:
    """Accuracy per sub-model as an aligned text table."""
    rows = [("sub-model", "params", "MMACs", "val acc", "test acc")]
    for i, label in enumerate(result["submodels"]):
        val = result["val_accuracy"][i] if result["val_accuracy"] else float("nan")
        rows.append((label, f"{result['params'][i]:,}", f"{result['macs'][i] / 1e6:.1f}", f"{val:.2f}",
                     f"{result['test_accuracy'][i]:.2f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@hookimpl
def kdreg_stage_finished(run: Any, stage: str, result: dict[str, Any]) -> None:
    loaded = (f"loaded from {result['init']}" if result.get("init")
              else f"pretrained weights of {result.get('pretrained')}")
    how = (f"best epoch {result['best_epoch']}/{result['epochs']}" if result["epochs"]
           else f"{loaded}, not trained")
    learned = ", ".join(result.get("teachers") or [])
    via = f", bridge {result['bridge']}" if result.get("bridge") else ""
    taught = f", taught by {learned}{via}" if learned else ""
    say(
        f"\nstage {stage}: {how}{taught}, mean test accuracy {result['mean_test_accuracy']:.2f}%, "
        f"{result['seconds']:.0f} s\n" + stage_table(result) + "\n"
    )


def pipeline_table(stages: list[dict[str, Any]]) -> str:
    """One line per stage: what taught it and its largest sub-model's test accuracy."""
    rows = [("stage", "taught by", "params", "test acc")]
    for s in stages:
        taught = ", ".join(s.get("teachers") or []) or "labels"
        if s.get("bridge"):
            taught += f" (+{s['bridge']})"
        if s.get("builds_on"):
            taught += f", on {', '.join(s['builds_on'])}"
        rows.append((s["name"], taught, f"{s['params'][-1]:,}", f"{s['test_accuracy'][-1]:.2f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@hookimpl
def kdreg_run_finished(run: Any, results: dict[str, Any]) -> None:
    if len(results["stages"]) > 1:
        say(pipeline_table(results["stages"]) + "\n")
    say(f"results: {run.directory / 'results.json'}")
