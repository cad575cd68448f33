"""Sweeps: a recipe trained at every point of a grid of overrides (times its seeds), its shared
earlier stages trained once, and one report of the grid.

``kdreg sweep RECIPE --grid stages.student.lam=0.1,0.5 --grid stages.student.tau=1,4`` writes::

    DIR/lam=0.1,tau=1/seed-<s>/   an ordinary run directory per point and seed (its recipe.toml is
                                  the recipe with the point's overrides and seed = s)
    DIR/sweep.json                the grid, every point's summary (mean and std over seeds, per
                                  stage and sub-model) and which stages were shared from where
    DIR/sweep.md, DIR/sweep.png   the table and the plot of the last stage's test accuracy

A point's directory is a repeat directory to ``kdreg report`` (its ``seed-<s>/`` runs).

Sharing: a stage's *key* hashes what its training depends on: its index, its resolved
configuration and training settings, the data, the seed and the keys of the earlier stages it
names (teachers, trunks, bridges; any string option equal to an earlier stage's name). Before a
run starts, every stage of it whose key a finished stage of another run of the sweep has is copied
in (``checkpoints/<stage>/`` and its ``results.json`` entry), so the engine treats it as done: it
loads its selected weights instead of training it. The copy is bit-identical to training it again.

Running the same command again skips finished runs and resumes unfinished ones through the
engine (:class:`kdreg.engine.run.Run`, from their last checkpoint).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import tomli

import kdreg
from kdreg.convert import converter
from kdreg.engine.assemble import static_problems
from kdreg.engine.repeats import seed_directory, summarise, write_json
from kdreg.engine.run import RECIPE_FILE, RESULTS_FILE, Run, default_directory, recipe_difference
from kdreg.errors import RecipeError, UserError
from kdreg.recipe import Recipe, dump_recipe, load_recipe

SWEEP_JSON, SWEEP_MD, SWEEP_PNG = "sweep.json", "sweep.md", "sweep.png"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


@attrs.frozen
class Axis:
    """One ``--grid KEY=V1,V2,...``: the key, the values as given and as parsed (TOML, else text)."""

    key: str
    texts: tuple[str, ...]
    values: tuple[Any, ...]


@attrs.frozen
class Point:
    """One point of the grid: its overrides, its directory name and its recipe (without seeds)."""

    name: str
    texts: tuple[str, ...]        # the value of each axis, as given
    values: tuple[Any, ...]
    overrides: tuple[str, ...]    # KEY=VALUE per axis
    recipe: Recipe


# ----------------------------------------------------------------------------- the grid
def split_values(text: str) -> list[str]:
    """``0.1,0.5`` as ``["0.1", "0.5"]``; commas inside brackets, braces or quotes do not split."""
    items, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        current += char
    items.append(current.strip())
    return items


def parse_value(text: str) -> Any:
    """A value as ``--set`` reads it: TOML, else the text itself."""
    try:
        return tomli.loads(f"v = {text}")["v"]
    except tomli.TOMLDecodeError:
        return text


def parse_axes(grid: Sequence[str]) -> list[Axis]:
    """The ``--grid`` arguments as axes; :class:`UserError` with one ``@ --grid`` line per problem
    (not KEY=V1,V2, an empty value, a value listed twice, a key given twice, seed or seeds)."""
    axes: list[Axis] = []
    problems: list[str] = []
    if not grid:
        problems.append("a sweep needs at least one --grid KEY=V1,V2,... (e.g. --grid stages.student.lam=0.1,0.5) "
                        "@ --grid")
    for item in grid:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{item!r} is not KEY=V1,V2,... @ --grid")
            continue
        if key in ("seed", "seeds"):
            problems.append(f"{key}: seeds are not a grid axis; give them with --seeds 0,1,2 @ --grid")
            continue
        if any(a.key == key for a in axes):
            problems.append(f"{key} is given twice; give its values once, separated by commas @ --grid")
            continue
        texts = split_values(text)
        if not text.strip() or any(not t for t in texts):
            problems.append(f"{key}: empty value in {text!r}; give values separated by commas, e.g. "
                            f"{key}=0.1,0.5 @ --grid")
            continue
        values = [parse_value(t) for t in texts]
        twice = sorted({t for i, t in enumerate(texts) if _canonical(values[i]) in
                        [_canonical(v) for v in values[:i]]})
        if twice:
            problems.append(f"{key}: value(s) {', '.join(twice)} listed more than once @ --grid")
            continue
        axes.append(Axis(key, tuple(texts), tuple(values)))
    if problems:
        raise UserError(problems)
    return axes


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _grid_problem(line: str, source: str, what: str) -> str:
    """A recipe problem (``source: message @ where``) as a ``@ --grid`` line about ``what``."""
    line = line.removeprefix(f"{source}: ")
    message, at, where = line.rpartition(" @ ")
    text = f"{message} ({where})" if at else line
    return f"{what}: {text} @ --grid"


def axis_problems(recipe_path: str | Path, overrides: Sequence[str], axis: Axis) -> list[str]:
    """Each value of ``axis`` applied alone to the recipe: one ``@ --grid`` line per problem; a
    problem every value has (an unknown key, say) once, about the key."""
    source = str(recipe_path)
    found: dict[str, list[str]] = {}     # message -> the values that have it
    for text in axis.texts:
        item = f"{axis.key}={text}"
        try:
            load_recipe(recipe_path, [*overrides, item])
        except RecipeError as exc:
            for line in exc.problems:
                line = line.removeprefix(f"{source}: ").removeprefix(f"override {item!r}: ").removesuffix(" @ --set")
                found.setdefault(line, []).append(text)
    return [_grid_problem(line, source, axis.key if len(texts) == len(axis.texts) > 1
                          else f"{axis.key}={','.join(texts)}")
            for line, texts in found.items()]


def labels(keys: Sequence[str]) -> list[str]:
    """The shortest dotted suffix of each key that no other key ends with (``lam``, or
    ``student.lam`` beside ``teacher.lam``): the names of the axes in directories and tables."""
    out = []
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if not any(other != key and (other == label or other.endswith("." + label)) for other in keys):
                break
        out.append(label)
    return out


def safe_name(text: str) -> str:
    """``text`` as a file name: other characters than letters, digits and ``._+=-`` as ``_``, then a
    short hash of ``text`` when any was replaced (so two values never share a directory)."""
    safe = _UNSAFE.sub("_", text)[:120]
    if safe != text:
        safe += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return safe


def plan_points(recipe_path: str | Path, overrides: Sequence[str], axes: Sequence[Axis]) -> list[Point]:
    """Every point of the grid (the first axis varying slowest), each recipe loaded and checked.

    Every value is checked on its own first, then every point (``load_recipe`` and the engine's
    static checks); :class:`UserError` with one ``@ --grid`` line per problem."""
    source = str(recipe_path)
    problems: list[str] = []
    for axis in axes:
        problems += axis_problems(recipe_path, overrides, axis)
    if problems:
        raise UserError(problems)
    names = labels([a.key for a in axes])
    points = []
    for combo in itertools.product(*(range(len(a.texts)) for a in axes)):
        texts = tuple(a.texts[i] for a, i in zip(axes, combo))
        point_overrides = tuple(f"{a.key}={t}" for a, t in zip(axes, texts))
        name = ",".join(safe_name(f"{label}={t}") for label, t in zip(names, texts))
        try:
            recipe = load_recipe(recipe_path, [*overrides, *point_overrides])
            found = static_problems(recipe)
        except RecipeError as exc:
            found = exc.problems
        if found:
            problems += [_grid_problem(p, source, f"point {name}") for p in found]
            continue
        points.append(Point(name, texts, tuple(a.values[i] for a, i in zip(axes, combo)), point_overrides,
                            attrs.evolve(recipe, seeds=())))
    problems += store_problems(points)
    if problems:
        raise UserError(problems)
    return points


#: data keys a teacher store does not depend on: how batches are formed, read and evaluated
STORE_FREE_DATA = frozenset({"batch_size", "eval_batch_size", "test_limit", "workers", "download",
                             "skip_bad_images"})


def store_inputs(recipe: Recipe, stage_name: str) -> dict[str, Any]:
    """What the teacher store of stage ``stage_name`` depends on that the recipe itself says, as
    dotted keys: the data (but for :data:`STORE_FREE_DATA`), each earlier stage the stage names
    (its configuration and epochs), the precision and the store's views and top-k. The run
    checks the rest against the store (the files' contents, the checkpoints' hashes)."""
    from kdreg.store.format import run_depends

    stage = recipe.stage(stage_name)
    data = {k: v for k, v in converter.unstructure(recipe.data).items() if k not in STORE_FREE_DATA}
    names = [s.name for s in recipe.stages]
    named = _strings(converter.unstructure(stage))
    out = _dotted("data", data)
    for teacher in recipe.stages[:names.index(stage_name)]:
        if teacher.name in named:
            config = {k: v for k, v in converter.unstructure(teacher).items() if k != "name"}
            out.update(_dotted(f"stages.{teacher.name}", config))
            out[f"stages.{teacher.name}.epochs"] = recipe.stage_train(teacher).epochs
    out["train.precision"] = run_depends(recipe, stage_name)["precision"]   # the stage's, resolved
    out[f"stages.{stage_name}.teacher_store_views"] = stage.teacher_store_views
    out[f"stages.{stage_name}.teacher_store_topk"] = stage.teacher_store_topk
    return out


def _dotted(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _dotted(f"{prefix}.{key}", item).items()}
    return {prefix: value}


def store_problems(points: Sequence[Point]) -> list[str]:
    """One ``@ --grid`` line per teacher store and recipe key that differs between the points
    sharing that store: a store holds one teacher's outputs on one data set's views, so the grid
    must not vary what it depends on (or must give each value its own ``teacher_store``)."""
    first: dict[str, tuple[str, dict[str, Any]]] = {}
    problems: dict[tuple[str, str], str] = {}
    for point in points:
        for stage in point.recipe.stages:
            if stage.teacher_store is None:
                continue
            path = str(Path(stage.teacher_store).expanduser())
            inputs = store_inputs(point.recipe, stage.name)
            if path not in first:
                first[path] = (point.name, inputs)
                continue
            name, theirs = first[path]
            for key in sorted(set(inputs) | set(theirs)):
                a, b = theirs.get(key), inputs.get(key)
                if _canonical(a) != _canonical(b) and (path, key) not in problems:
                    problems[path, key] = (
                        f"points {name} and {point.name} would share teacher store {stage.teacher_store}, "
                        f"which depends on {key} ({_canonical(a)} there, {_canonical(b)} here): keep it fixed, "
                        "or sweep each value apart with a teacher_store of its own @ --grid")
    return list(problems.values())


# ----------------------------------------------------------------------------- sharing
def stage_keys(recipe: Recipe) -> dict[str, str]:
    """Each stage's key: a hash of what training it depends on (see the module's docstring)."""
    keys: dict[str, str] = {}
    data = converter.unstructure(recipe.data)
    for index, stage in enumerate(recipe.stages):
        config = converter.unstructure(stage)
        named = sorted(_strings(config) & keys.keys())
        content = {"index": index, "seed": recipe.seed, "data": data, "stage": config,
                   "train": converter.unstructure(recipe.stage_train(stage)),
                   "depends_on": {name: keys[name] for name in named}}
        keys[stage.name] = hashlib.sha256(_canonical(content).encode()).hexdigest()
    return keys


def _strings(value: Any) -> set[str]:
    """Every string inside a nested structure of dicts and lists."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_strings(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(_strings(v) for v in value)) if value else set()
    return set()


def finished_stages(directory: Path) -> dict[str, dict[str, Any]]:
    """The stages a run directory has finished (its ``results.json`` entries), by name."""
    try:
        results = json.loads((directory / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    stages = results.get("stages", []) if isinstance(results, dict) else []
    return {s["name"]: s for s in stages if isinstance(s, dict) and "name" in s}


def adopt(directory: Path, recipe: Recipe, trained: dict[str, Path]) -> dict[str, Path]:
    """Copy into the run ``directory`` every stage of ``recipe`` not finished there whose key
    another run in ``trained`` (key -> run directory) has finished: its ``checkpoints/<stage>/``
    and its ``results.json`` entry, so the engine loads it instead of training it. Writes the
    run's ``recipe.toml`` when it copies anything into a new directory. Returns what it copied:
    stage -> the run it came from."""
    done = finished_stages(directory)
    copied: dict[str, Path] = {}
    entries = dict(done)
    for name, key in stage_keys(recipe).items():
        source = trained.get(key)
        if name in done or source is None or source == directory:
            continue
        target = directory / "checkpoints" / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source / "checkpoints" / name, target)
        entries[name] = finished_stages(source)[name]
        copied[name] = source
    if copied:
        if not (directory / RECIPE_FILE).is_file():
            (directory / RECIPE_FILE).write_text(dump_recipe(recipe))
        try:
            results = json.loads((directory / RESULTS_FILE).read_text())
        except (OSError, ValueError):
            results = {"finished": False}
        order = [s.name for s in recipe.stages]
        results["stages"] = [entries[n] for n in order if n in entries]
        write_json(directory / RESULTS_FILE, results)
    return copied


# ----------------------------------------------------------------------------- the sweep
@attrs.define
class Sweep:
    """Trains every point of ``points`` once per seed into ``directory``; see :meth:`execute`."""

    recipe: Recipe                 # the recipe with --set, without the grid
    source: str
    axes: list[Axis]
    points: list[Point]
    seeds: tuple[int, ...]
    directory: Path
    progress: bool = True
    results: dict[tuple[str, int], dict[str, Any]] = attrs.field(factory=dict)
    shared: list[dict[str, str]] = attrs.field(factory=list)

    @classmethod
    def plan(cls, recipe_path: str | Path, grid: Sequence[str], overrides: Iterable[str] = (),
             out: str | Path | None = None, progress: bool = True) -> Sweep:
        """A sweep, every point checked and every directory it will use checked, nothing written."""
        overrides = list(overrides)
        recipe = load_recipe(recipe_path, overrides)
        problems = static_problems(recipe)
        if problems:
            raise RecipeError([f"{recipe_path}: {p}" for p in problems])
        axes = parse_axes(grid)
        points = plan_points(recipe_path, overrides, axes)
        seeds = recipe.seeds or (recipe.seed,)
        directory = Path(out) if out else default_directory(attrs.evolve(recipe, name=f"{recipe.name}-sweep"))
        sweep = cls(recipe, str(recipe_path), axes, points, tuple(seeds), directory, progress)
        sweep.check_directory()
        return sweep

    def run_recipe(self, point: Point, seed: int) -> Recipe:
        return attrs.evolve(point.recipe, seed=seed, seeds=())

    def run_directory(self, point: Point, seed: int) -> Path:
        return seed_directory(self.directory / point.name, seed)

    def check_directory(self) -> None:
        """Refuse a directory that holds something else than this sweep's runs (one line each)."""
        top = self.directory
        if top.exists() and not top.is_dir():
            raise UserError(f"--out {top} is a file, not a folder")
        if top.is_dir() and any(top.iterdir()) and not (top / SWEEP_JSON).is_file():
            raise UserError(f"{top} is not empty and holds no {SWEEP_JSON}: it is not a sweep directory; "
                            "choose another --out")
        problems = []
        for point in self.points:
            for seed in self.seeds:
                directory = self.run_directory(point, seed)
                held = directory / RECIPE_FILE
                if held.is_file():
                    wanted = dump_recipe(self.run_recipe(point, seed))
                    if held.read_text() != wanted:
                        problems.append(f"{directory} holds a run of another recipe "
                                        f"({recipe_difference(held.read_text(), wanted)}); move it away or "
                                        "choose another --out")
                elif directory.exists() and any(directory.iterdir()):
                    problems.append(f"{directory} is not empty but holds no {RECIPE_FILE}; move it away")
        if problems:
            raise UserError(problems)

    def execute(self) -> dict[str, Any]:
        """Train every run not finished yet, sharing stages; write sweep.json, sweep.md, sweep.png."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shared = self._earlier_shared()
        trained = self._scan()
        try:
            for point in self.points:
                for seed in self.seeds:
                    self._run(point, seed, trained)
        finally:
            summary = self.summary()
            write_json(self.directory / SWEEP_JSON, summary)
        write_report(summary, self.directory)
        return summary

    def _earlier_shared(self) -> list[dict[str, str]]:
        """The copies an earlier call of this sweep made (its sweep.json), into runs still in it."""
        try:
            earlier = json.loads((self.directory / SWEEP_JSON).read_text()).get("shared", [])
        except (OSError, ValueError, AttributeError):
            return []
        runs = {self._relative(self.run_directory(p, s)) for p in self.points for s in self.seeds}
        return [e for e in earlier if isinstance(e, dict) and e.get("run") in runs]

    def _scan(self) -> dict[str, Path]:
        """key -> a run directory of this sweep that finished a stage with that key."""
        trained: dict[str, Path] = {}
        for point in self.points:
            for seed in self.seeds:
                directory = self.run_directory(point, seed)
                done = finished_stages(directory)
                for name, key in stage_keys(self.run_recipe(point, seed)).items():
                    if name in done and (directory / "checkpoints" / name / "best.pt").is_file():
                        trained.setdefault(key, directory)
        return trained

    def _run(self, point: Point, seed: int, trained: dict[str, Path]) -> None:
        directory = self.run_directory(point, seed)
        recipe = self.run_recipe(point, seed)
        results = _read_results(directory)
        if results.get("finished") is not True:
            directory.mkdir(parents=True, exist_ok=True)
            for stage, source in adopt(directory, recipe, trained).items():
                self.shared.append({"stage": stage, "run": self._relative(directory),
                                    "from": self._relative(source)})
            run = Run(recipe, directory, source=self.source, progress=self.progress)
            run.results = _read_results(directory)
            print(f"sweep: {point.name}, seed {seed}", flush=True)
            try:
                results = run.execute()
            finally:
                if run.results.get("stages"):
                    self.results[point.name, seed] = run.results
        self.results[point.name, seed] = results
        keys = stage_keys(recipe)
        for entry in results.get("stages", []):
            trained.setdefault(keys[entry["name"]], directory)

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.directory))

    def summary(self) -> dict[str, Any]:
        """The content of sweep.json."""
        points = []
        for point in self.points:
            runs = {seed: self.results[point.name, seed] for seed in self.seeds if (point.name, seed) in self.results}
            summary = summarise(attrs.evolve(point.recipe, seeds=self.seeds), runs)
            points.append({"name": point.name, "values": dict(zip([a.key for a in self.axes], point.values)),
                           "texts": list(point.texts), "overrides": list(point.overrides),
                           "finished": summary["finished"], "stages": summary["stages"]})
        return {
            "kdreg_version": kdreg.__version__,
            "recipe": self.recipe.name,
            "recipe_file": self.source,
            "axes": [{"key": a.key, "label": label, "values": list(a.values), "texts": list(a.texts)}
                     for a, label in zip(self.axes, labels([a.key for a in self.axes]))],
            "seeds": list(self.seeds),
            "stage": self.recipe.stages[-1].name,
            "finished": all(p["finished"] for p in points),
            "points": points,
            "shared": self.shared,
        }


def _read_results(directory: Path) -> dict[str, Any]:
    try:
        results = json.loads((directory / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


# ----------------------------------------------------------------------------- the report
def point_stage(point: dict[str, Any], stage: str) -> dict[str, Any] | None:
    """A point's summary of ``stage`` (None when no run of it finished that stage)."""
    return next((s for s in point["stages"] if s["name"] == stage), None)


def markdown(summary: dict[str, Any]) -> str:
    """sweep.md: a row per point, a column per sub-model of the last stage (mean ± std over seeds)."""
    stage = summary["stage"]
    submodels: list[str] = next((s["submodels"] for p in summary["points"]
                                 if (s := point_stage(p, stage)) is not None), [])
    head = [a["label"] for a in summary["axes"]] + submodels + ["mean", "runs"]
    lines = [f"# Sweep of {summary['recipe']}", "",
             f"Test accuracy (%) of stage `{stage}`, mean ± std over seeds "
             f"{', '.join(map(str, summary['seeds']))}" + ("" if summary["finished"] else " (not finished)") + ".", "",
             "| " + " | ".join(h.replace("|", "\\|") for h in head) + " |",
             "|" + "|".join(["---"] * len(summary["axes"]) + ["--:"] * (len(head) - len(summary["axes"]))) + "|"]
    for point in summary["points"]:
        s = point_stage(point, stage)
        cells = [t.replace("|", "\\|") for t in point["texts"]]
        if s is None:
            cells += ["-"] * (len(submodels) + 1) + ["0"]
        else:
            cells += [_pm(m, sd) for m, sd in zip(s["test_accuracy_mean"], s["test_accuracy_std"])]
            cells += [_pm(s["mean_test_accuracy_mean"], s["mean_test_accuracy_std"]), str(s["runs"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![accuracy against the swept values]({SWEEP_PNG})", ""]
    copies: dict[str, int] = {}
    for entry in summary["shared"]:
        copies[entry["stage"]] = copies.get(entry["stage"], 0) + 1
    if copies:
        lines += ["Trained once and copied into the other runs that share it (this call; the runs in "
                  f"{SWEEP_JSON} under `shared`): " + ", ".join(f"`{stage}` into {n} run(s)"
                                                                for stage, n in copies.items()) + ".", ""]
    return "\n".join(lines)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """sweep.png: a panel per sub-model, its test accuracy (mean, std as error bars) against the
    first axis's values; a line per value of the other axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage, axes = summary["stage"], summary["axes"]
    first = axes[0]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in first["values"])
    xs = list(first["values"]) if numeric else list(range(len(first["values"])))
    submodels: list[str] = next((s["submodels"] for p in summary["points"]
                                 if (s := point_stage(p, stage)) is not None), [])
    count = max(len(submodels), 1)
    cols = min(count, 3)
    rows = (count + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    lines: dict[tuple[str, ...], list[tuple[float, float, float]]] = {}
    for point in summary["points"]:
        s = point_stage(point, stage)
        rest = tuple(f"{a['label']}={t}" for a, t in zip(axes[1:], point["texts"][1:]))
        x = xs[first["texts"].index(point["texts"][0])]
        for k in range(len(submodels)):
            if s is not None:
                lines.setdefault((str(k), *rest), []).append(
                    (x, s["test_accuracy_mean"][k], s["test_accuracy_std"][k]))
    for k, label in enumerate(submodels):
        ax = grid[k // cols][k % cols]
        for key, values in lines.items():
            if key[0] != str(k):
                continue
            values.sort()
            ax.errorbar([v[0] for v in values], [v[1] for v in values], yerr=[v[2] for v in values],
                        marker="o", capsize=3, label=", ".join(key[1:]) or None)
        ax.set_title(f"{stage} {label}")
        ax.set_xlabel(first["label"])
        ax.set_ylabel("test accuracy (%)")
        if not numeric:
            ax.set_xticks(xs, first["texts"])
        if len(axes) > 1:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    for k in range(len(submodels), rows * cols):
        grid[k // cols][k % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(summary: dict[str, Any], directory: Path) -> list[Path]:
    """Write sweep.md and sweep.png into ``directory``; returns them."""
    md = directory / SWEEP_MD
    md.write_text(markdown(summary))
    return [md, plot(summary, directory / SWEEP_PNG)]


def table(summary: dict[str, Any]) -> str:
    """The sweep as aligned text for the terminal (the Markdown table without its markup)."""
    rows = [line.strip("|").split(" | ") for line in markdown(summary).splitlines()
            if line.startswith("| ")]
    widths = [max(len(r[c].strip()) for r in rows) for c in range(len(rows[0]))]
    out = ["  ".join(cell.strip().rjust(w) for cell, w in zip(r, widths)) for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
