"""Repeats: a recipe trained once per seed of its ``seeds``, and the mean and spread of the results.

A repeat directory holds::

    recipe.toml      the resolved recipe, with its seeds
    seed-<s>/        an ordinary run directory per seed (its recipe.toml has seed = s, no seeds)
    summary.json     per stage: mean and sample standard deviation (ddof = 1; 0 with one run) of
                     every sub-model's test and validation accuracy over the seeds' runs

Every seed's run is a :class:`~kdreg.engine.run.Run`; its random streams come from its own seed
(:mod:`kdreg.streams`), so no two seeds share batches, crops or initial weights. Resuming a repeat
skips the seeds whose run finished and resumes or starts the others. Under ``torchrun`` only rank 0
writes the repeat's files and prints.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

import kdreg
from kdreg.engine.distributed import is_main
from kdreg.engine.run import RECIPE_FILE, RESULTS_FILE, Run, unfinished_run_of
from kdreg.errors import UserError
from kdreg.recipe import Recipe, dump_recipe, load_recipe

SUMMARY_FILE = "summary.json"


def seed_directory(directory: Path, seed: int) -> Path:
    """The run directory of ``seed`` inside a repeat directory."""
    return directory / f"seed-{seed}"


def start(recipe_path: str | Path, out: str | Path | None = None, overrides: Iterable[str] = (),
          progress: bool = True) -> Run | Repeat:
    """A :class:`Repeat` when the recipe (after ``overrides``) has ``seeds``, else a :class:`Run`."""
    recipe = load_recipe(recipe_path, overrides)      # parsed once, here
    if out is not None and unfinished_run_of(Path(out), recipe):
        return resume(out, progress=progress, recipe=recipe)   # the same command, run again
    if recipe.seeds:
        return Repeat.start(recipe_path, out, progress=progress, recipe=recipe)
    return Run.start(recipe_path, out, progress=progress, recipe=recipe)


def resume(directory: str | Path, progress: bool = True, recipe: Recipe | None = None) -> Run | Repeat:
    """A :class:`Repeat` when ``directory`` holds one (its recipe has ``seeds``), else a :class:`Run`;
    ``recipe``: the directory's recipe, when the caller has it already."""
    directory = Path(directory)
    if not (directory / RECIPE_FILE).is_file():
        raise UserError(f"{directory} is not a kdreg run directory: {directory / RECIPE_FILE} is missing")
    if recipe is None:
        recipe = load_recipe(directory / RECIPE_FILE)     # read once, here
    if recipe.seeds:
        return Repeat.resume(directory, progress=progress, recipe=recipe)
    return Run.resume(directory, progress=progress, recipe=recipe)


class Repeat:
    """Trains ``recipe`` once per seed of ``recipe.seeds`` into ``directory/seed-<s>/``."""

    def __init__(self, recipe: Recipe, directory: Path, *, source: str = "", progress: bool = True):
        if not recipe.seeds:
            raise UserError(f"{source or recipe.name}: a repeat needs seeds, e.g. seeds = [0, 1, 2] "
                            "@ recipe.seeds")
        self.recipe = recipe
        self.directory = directory
        self.source = source
        self.progress = progress

    @classmethod
    def start(cls, recipe_path: str | Path, out: str | Path | None = None, overrides: Iterable[str] = (),
              progress: bool = True, recipe: Recipe | None = None) -> Repeat:
        """A new repeat of the recipe at ``recipe_path`` (with ``overrides``), or of ``recipe``
        when the caller has parsed it already."""
        recipe = recipe if recipe is not None else load_recipe(recipe_path, overrides)
        # checked, and its directory chosen, as for one run (the same name in every torchrun
        # process, not already holding a run); that run itself is not executed
        directory = Run.start(recipe_path, out, progress=progress,
                              recipe=attrs.evolve(recipe, seeds=())).directory
        return cls(recipe, directory, source=str(recipe_path), progress=progress)

    @classmethod
    def resume(cls, directory: str | Path, progress: bool = True, recipe: Recipe | None = None) -> Repeat:
        directory = Path(directory)
        if not (directory / RECIPE_FILE).is_file():
            raise UserError(f"{directory} is not a kdreg run directory: {directory / RECIPE_FILE} is missing")
        source = str(directory / RECIPE_FILE)
        return cls(recipe if recipe is not None else load_recipe(source), directory, source=source,
                   progress=progress)

    def seed_recipe(self, seed: int) -> Recipe:
        """The recipe of ``seed``'s run: this one with ``seed = seed`` and no ``seeds``."""
        return attrs.evolve(self.recipe, seed=seed, seeds=())

    # ------------------------------------------------------------------ execution
    def execute(self) -> dict[str, Any]:
        """Train every seed not finished yet; returns the summary (written to ``summary.json``)."""
        wrote_recipe = False
        if is_main() and not (self.directory / RECIPE_FILE).is_file():
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / RECIPE_FILE).write_text(dump_recipe(self.recipe))
            wrote_recipe = True
        done: dict[int, dict[str, Any]] = {}
        try:
            for seed in self.recipe.seeds:
                finished = self._finished(seed)
                if finished is not None:
                    done[seed] = finished
                    continue
                run = self._run(seed)
                try:
                    done[seed] = run.execute()
                finally:  # interrupted or failed: the stages it finished still count
                    if seed not in done and run.results.get("stages"):
                        done[seed] = run.results
        except UserError:
            if wrote_recipe and not any(seed_directory(self.directory, s).exists() for s in self.recipe.seeds):
                (self.directory / RECIPE_FILE).unlink()   # bad input leaves nothing behind
                if not any(self.directory.iterdir()):
                    self.directory.rmdir()
            raise
        finally:
            summary = summarise(self.recipe, done)
            if is_main() and (self.directory / RECIPE_FILE).is_file():
                write_json(self.directory / SUMMARY_FILE, summary)
        if is_main():
            print(summary_table(summary, self.directory), flush=True)
        return summary

    def _finished(self, seed: int) -> dict[str, Any] | None:
        """The results of ``seed``'s run when it finished, else None."""
        path = seed_directory(self.directory, seed) / RESULTS_FILE
        if not path.is_file():
            return None
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not JSON ({exc.msg}); delete it to train seed {seed} again") from None
        return results if isinstance(results, dict) and results.get("finished") is True else None

    def _run(self, seed: int) -> Run:
        """``seed``'s run: resumed when its directory holds one, else new."""
        directory = seed_directory(self.directory, seed)
        expected = self.seed_recipe(seed)
        if (directory / RECIPE_FILE).is_file():
            run = Run.resume(directory, progress=self.progress)
            if run.recipe != expected:
                raise UserError(f"{directory / RECIPE_FILE} is not {self.directory / RECIPE_FILE} with seed = "
                                f"{seed}: that directory holds another run; move it away to train seed {seed}")
            return run
        if directory.exists() and any(directory.iterdir()):
            raise UserError(f"{directory} is not empty but holds no {RECIPE_FILE}; move it away to train "
                            f"seed {seed}")
        return Run(expected, directory, source=self.source, progress=self.progress)


# ----------------------------------------------------------------------------- the summary
def summarise(recipe: Recipe, results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation, over the seeds' runs, of every stage they finished."""
    stages = []
    for stage in recipe.stages:
        runs = [(seed, s) for seed in recipe.seeds if seed in results
                for s in results[seed].get("stages", []) if s["name"] == stage.name]
        if not runs:
            continue
        first = runs[0][1]
        entry: dict[str, Any] = {"name": stage.name, "submodels": first["submodels"], "params": first["params"],
                                 "macs": first["macs"], "runs": len(runs), "seeds": [seed for seed, _ in runs]}
        for key in ("test_accuracy", "val_accuracy"):
            columns = list(zip(*(s[key] for _, s in runs))) if all(s[key] for _, s in runs) else []
            entry[f"{key}_mean"] = [_mean(c) for c in columns]
            entry[f"{key}_std"] = [_std(c) for c in columns]
        means = [s["mean_test_accuracy"] for _, s in runs]
        entry["mean_test_accuracy_mean"], entry["mean_test_accuracy_std"] = _mean(means), _std(means)
        stages.append(entry)
    return {
        "kdreg_version": kdreg.__version__,
        "recipe": recipe.name,
        "seeds": list(recipe.seeds),
        "finished": all(results.get(seed, {}).get("finished") is True for seed in recipe.seeds),
        "stages": stages,
    }


def _mean(values: Iterable[float]) -> float:
    return statistics.fmean(values)


def _std(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summary_table(summary: dict[str, Any], directory: Path) -> str:
    """Mean +- standard deviation of every stage's sub-models, as aligned text."""
    finished = "" if summary["finished"] else " (not finished)"
    lines = [f"\nrepeat {summary['recipe']!r} over seeds {', '.join(map(str, summary['seeds']))}{finished}"]
    for stage in summary["stages"]:
        lines.append(f"\nstage {stage['name']}: {stage['runs']} run(s), seeds "
                     f"{', '.join(map(str, stage['seeds']))}")
        rows = [("sub-model", "params", "val acc", "test acc")]
        for i, label in enumerate(stage["submodels"]):
            val = (_pm(stage["val_accuracy_mean"][i], stage["val_accuracy_std"][i])
                   if stage["val_accuracy_mean"] else "-")
            rows.append((label, f"{stage['params'][i]:,}", val,
                         _pm(stage["test_accuracy_mean"][i], stage["test_accuracy_std"][i])))
        rows.append(("mean", "", "", _pm(stage["mean_test_accuracy_mean"], stage["mean_test_accuracy_std"])))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        table = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
                 for r in rows]
        table.insert(1, "  ".join("-" * w for w in widths))
        lines += table
    lines.append(f"\nsummary: {directory / SUMMARY_FILE}")
    return "\n".join(lines)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f} +- {std:.2f}"


def write_json(path: Path, content: Any) -> None:
    """Write ``content`` as JSON atomically (a crash never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    tmp.replace(path)
