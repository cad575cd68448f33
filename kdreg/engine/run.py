"""A run: the recipe's stages trained in order into one run directory."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

import kdreg
from kdreg import plugins
from kdreg.backbone import FlexibleBackbone
from kdreg.data.loading import describe, load_data
from kdreg.data.splits import Splits
from kdreg.engine import checkpoint, distributed, preempt
from kdreg.engine.assemble import DataShape, StagePlan, assemble, seed_everything, static_problems
from kdreg.engine.device import grad_scaler, resolve_device, resolve_precision
from kdreg.engine.evaluate import evaluate
from kdreg.engine.trainer import StageTrainer, eval_loader
from kdreg.errors import OptionError, RecipeError, UserError
from kdreg.recipe import Recipe, dump_recipe, load_recipe
from kdreg.stages import freeze
from kdreg.store.replay import data_problems
from kdreg.store.teach import build_missing_stores
from kdreg.streams import batch_seed, train_seed

RECIPE_FILE = "recipe.toml"
METRICS_FILE = "metrics.jsonl"   # written by the jsonl logger (plugins/loggers.py)
RESULTS_FILE = "results.json"


def default_directory(recipe: Recipe, base: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{recipe.name}-{stamp}"
    k = 1
    while path.exists():
        k += 1
        path = base / f"{recipe.name}-{stamp}-{k}"
    return path


def unfinished_run_of(directory: Path, recipe: Recipe) -> bool:
    """Whether ``directory`` holds an unfinished run (or repeat) of ``recipe``, to be resumed: what
    a restarted job finds when it issues its ``kdreg run RECIPE --out DIR`` again. False when it
    holds no run; :class:`UserError` when it holds a finished run of ``recipe`` or a run of another
    recipe (the first key that differs named)."""
    held_file = directory / RECIPE_FILE
    if not held_file.is_file():
        return False
    held, wanted = held_file.read_text(), dump_recipe(recipe)
    if held != wanted:
        raise UserError(f"run directory {directory} holds a run of another recipe ({recipe_difference(held, wanted)}); "
                        f"choose another --out, or continue that run with `kdreg run --resume {directory}`")
    for name in (RESULTS_FILE, "summary.json"):
        try:
            done = json.loads((directory / name).read_text()).get("finished") is True
        except (OSError, ValueError, AttributeError):
            done = False
        if done:
            raise UserError(f"run directory {directory} holds a finished run of this recipe "
                            f"({directory / name}); choose another --out to train it again")
    return True


def recipe_difference(held: str, wanted: str) -> str:
    """The first key whose value differs between two resolved recipes (TOML texts)."""
    import tomli

    def walk(a: Any, b: Any, path: str) -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in list(a) + [k for k in b if k not in a]:
                found = walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
                if found:
                    return found
            return None
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            names = [x.get("name") if isinstance(x, dict) else None for x in a]
            for i, (x, y) in enumerate(zip(a, b)):
                found = walk(x, y, f"{path}.{names[i]}" if names[i] else f"{path}[{i}]")
                if found:
                    return found
            return None
        return None if a == b else f"{path}: {_short(a)} there, {_short(b)} here"

    try:
        return walk(tomli.loads(held), tomli.loads(wanted), "") or "the files differ"
    except tomli.TOMLDecodeError:
        return "its recipe.toml is not TOML"


def _short(value: Any) -> str:
    text = "unset" if value is None else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def batch_split_problem(recipe: Recipe, world: int) -> str | None:
    """Why the recipe's global batch does not split evenly over ``world`` processes, or None."""
    if world < 1 or recipe.data.batch_size % world == 0:
        return None
    return (f"batch_size {recipe.data.batch_size} does not split over {world} processes "
            f"(it is the global batch; each process takes batch_size / {world}) @ recipe.data.batch_size")


def check_processes(recipe: Recipe) -> None:
    """The global batch must split evenly over torchrun's processes."""
    problem = batch_split_problem(recipe, distributed.world_size())
    if problem:
        raise UserError(problem)


class Run:
    """Trains a recipe's stages into ``directory``; see :meth:`start` and :meth:`resume`."""

    def __init__(self, recipe: Recipe, directory: Path, *, source: str = "", progress: bool = True):
        if recipe.seeds:
            raise UserError(f"{source or recipe.name}: seeds = {list(recipe.seeds)} is a repeat, one run per seed "
                            "(kdreg.engine.repeats): `kdreg run` trains it; each seed's run is a seed-<s>/ "
                            "directory beside its recipe.toml @ recipe.seeds")
        self.recipe = recipe
        self.directory = directory
        self.source = source
        self.progress = progress
        self.pm = plugins.plugin_manager()
        self.device = distributed.setup(resolve_device(recipe.train.device))
        check_processes(recipe)
        for stage in recipe.stages:  # e.g. fp16 on the CPU: refused before anything is written
            resolve_precision(recipe.stage_train(stage).precision, self.device)
        self.models: dict[str, FlexibleBackbone] = {}    # finished stages, frozen
        self.plans: list[StagePlan] = []                  # every stage, once assembled
        self.results: dict[str, Any] = {}

    # ------------------------------------------------------------------ creation
    @classmethod
    def start(cls, recipe_path: str | Path, out: str | Path | None = None, overrides: Iterable[str] = (),
              progress: bool = True, recipe: Recipe | None = None) -> Run:
        """A new run of the recipe at ``recipe_path`` (with ``overrides``), or of ``recipe`` when
        the caller has parsed it already (the file is then only its name in messages)."""
        recipe = recipe if recipe is not None else load_recipe(recipe_path, overrides)
        problems = static_problems(recipe)
        if problems:
            raise RecipeError([f"{recipe_path}: {p}" for p in problems])
        run = cls(recipe, Path("."), source=str(recipe_path), progress=progress)  # joins torchrun's group
        # rank 0's name (a time stamp) for every process; every one checks before any writes
        directory = Path(distributed.broadcast(str(Path(out) if out else default_directory(recipe))))
        if directory.exists() and any(directory.iterdir()):
            raise UserError(
                f"run directory {directory} is not empty; it may hold an earlier run: "
                f"continue it with `kdreg run --resume {directory}` or choose another --out"
            )
        distributed.barrier()
        run.directory = directory
        return run

    @classmethod
    def resume(cls, directory: str | Path, progress: bool = True, overrides: Iterable[str] = (),
               recipe: Recipe | None = None) -> Run:
        """The run in ``directory``, to continue; ``recipe``: its recipe, when the caller has read
        it already."""
        directory = Path(directory)
        if not (directory / RECIPE_FILE).is_file():
            raise UserError(f"{directory} is not a kdreg run directory: {directory / RECIPE_FILE} is missing")
        recipe = recipe if recipe is not None else load_recipe(directory / RECIPE_FILE, overrides)
        run = cls(recipe, directory, source=str(directory / RECIPE_FILE), progress=progress)
        if (directory / RESULTS_FILE).is_file():
            run.results = json.loads((directory / RESULTS_FILE).read_text())
        return run

    # ------------------------------------------------------------------ execution
    def execute(self) -> dict[str, Any]:
        recipe = self.recipe
        build_missing_stores(recipe, progress=self.progress)
        splits = load_data(recipe.data)
        try:
            plans = assemble(recipe, DataShape.of(splits), seed=recipe.seed)
        except RecipeError as exc:
            raise RecipeError([f"{self.source}: {p}" for p in exc.problems]) from None
        problems = [p for plan in plans if plan.store is not None
                    for p in data_problems(plan.store, recipe.data.dataset, splits)]
        if problems:     # a store built from other data: refused before anything is written
            raise RecipeError([f"{self.source}: {p}" for p in problems])
        self.plans = [plan.to(self.device) for plan in plans]
        main = distributed.is_main()
        if main and not (self.directory / RECIPE_FILE).is_file():  # once the data and models are there
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / RECIPE_FILE).write_text(dump_recipe(recipe))
        done = {s["name"]: s for s in self.results.get("stages", [])}
        self.results = {
            "kdreg_version": kdreg.__version__,
            "recipe": recipe.name,
            "recipe_file": self.source,
            "seed": recipe.seed,
            "device": str(self.device),
            "plugins": plugins.plugin_versions(self.pm),
            "data": describe(splits),
            "stages": [],
            "finished": False,
        }
        if main:
            self.pm.hook.kdreg_run_started(run=self)
        for plan in self.plans:
            trainer = self._trainer(plan, splits)
            if plan.name in done:
                trainer.load_best()
                result = done[plan.name]
            else:
                if preempt.stop_agreed():     # a signal between stages (or while the data loaded)
                    raise preempt.stopped(f"before stage {plan.name}")
                if plan.config.init is None:  # earlier stages' models it builds on, as trained
                    for stage, twin in plan.copies:
                        twin.load_state_dict(self.models[stage].state_dict())
                seed_everything(train_seed(recipe.seed, plan.index))
                result = self._train_stage(trainer, plan)
            self.models[plan.name] = freeze(plan.model)
            self.results["stages"].append(result)
            self._write_results()
            if plan.name not in done and main:
                self.pm.hook.kdreg_stage_finished(run=self, stage=plan.name, result=result)
        self.results["finished"] = True
        if splits.streaming is not None:   # the unreadable images every process skipped
            skipped = set().union(*distributed.all_gather(splits.streaming.counter.skipped))
            self.results["data"]["skipped_images"] = len(skipped)
        self._write_results()
        if main:
            self.pm.hook.kdreg_run_finished(run=self, results=self.results)
        return self.results

    def evaluate(self, widths: Sequence[float] | None = None, calibrate: int | None = None,
                 stage: str | None = None) -> list[dict[str, Any]]:
        """Test accuracy per sub-model of the selected weights of every trained stage (``stage``:
        that one only).

        ``widths``: every universally slimmable stage (widths trained as a range) evaluates
        these widths instead, recalibrated on ``calibrate`` training images (default: its
        ``train.calibrate_images``); refused (:class:`UserError`) when the chosen stage, or
        every stage, trains no range. ``calibrate`` alone: the stages that need calibration
        recompute their evaluated widths' statistics on that many images first."""
        from kdreg.calibrate import calibrate_on_training_images

        if calibrate is not None and calibrate < 1:
            raise UserError(f"--calibrate takes a number of training images >= 1, got {calibrate}")
        splits = load_data(self.recipe.data)
        names = [s.name for s in self.recipe.stages]
        if stage is not None and stage not in names:
            raise UserError(f"run {self.directory} has no stage {stage!r}; its stages: {', '.join(names)}")
        stages = [(plan, model) for plan, model in self.trained_stages(splits)
                  if stage is None or plan.name == stage]
        if not stages:
            raise UserError(f"{self.directory} holds no trained stage yet (no checkpoints/<stage>/best.pt)"
                            if stage is None else f"stage {stage!r} has no selected weights yet "
                            f"(checkpoints/{stage}/best.pt)")
        ranged = [plan.name for plan, model in stages if getattr(model, "width_range", None) is not None]
        if widths is not None:
            if not ranged:
                which = f"stage {stage!r} does not" if stage else f"no stage of {self.directory}"
                raise UserError(f"--widths: {which} train a width range (backbone widths = "
                                "{ min, max, ... }); only a universally slimmable stage evaluates other widths")
            for plan, model in stages:
                if plan.name in ranged:
                    try:
                        getattr(model, "set_eval_widths")(widths)  # noqa: B009 - range models only
                    except OptionError as exc:
                        raise UserError(f"--widths: {exc} (stage {plan.name!r})") from None
        test = eval_loader(splits, "test", self.recipe.data.eval_batch_size, self.device)
        out = []
        for plan, model in stages:
            images = None
            if model.needs_calibration() and (calibrate is not None
                                              or (widths is not None and plan.name in ranged)):
                images = calibrate if calibrate is not None else plan.train.calibrate_images
                calibrate_on_training_images(model, splits, images=images,
                                             batch_size=self.recipe.data.batch_size, device=self.device,
                                             seed=batch_seed(self.recipe.seed, plan.index))
            dtype = resolve_precision(plan.train.precision, self.device)
            acc = evaluate(model, test, device=self.device, dtype=dtype)
            entry = {"name": plan.name, "submodels": list(model.submodel_labels),
                     "test_accuracy": acc, "mean_test_accuracy": sum(acc) / len(acc),
                     "test_images": len(splits.test)}
            if images is not None:
                entry["calibration_images"] = images
            out.append(entry)
        return out

    def trained_stages(self, splits: Splits) -> Iterator[tuple[StagePlan, FlexibleBackbone]]:
        """Every stage with selected weights (``checkpoints/<stage>/best.pt``), in order, with
        those weights loaded on the device, frozen; stops at the first stage not trained yet."""
        for plan in assemble(self.recipe, DataShape.of(splits), from_checkpoints=True):
            best = self.directory / "checkpoints" / plan.name / "best.pt"
            if not best.is_file():
                return
            model = plan.model.to(self.device)
            checkpoint.load_weights(model, best)
            self.models[plan.name] = freeze(model)
            yield plan, model

    def _trainer(self, plan: StagePlan, splits: Splits) -> StageTrainer:
        recipe = self.recipe
        dtype = resolve_precision(plan.train.precision, self.device)
        scaler = grad_scaler(dtype, self.device)
        return StageTrainer(
            name=plan.name, model=plan.model, splits=splits, train_cfg=plan.train,
            loss=attrs.evolve(plan.loss, dtype=dtype, scaler=scaler), device=self.device,
            seed=batch_seed(recipe.seed, plan.index), batch_size=recipe.data.batch_size,
            eval_batch_size=recipe.data.eval_batch_size, directory=self.directory, notify=self._notify,
            progress=self.progress, teachers=plan.frozen,   # frozen when they finished
            store=plan.store,
        )

    def _train_stage(self, trainer: StageTrainer, plan: StagePlan) -> dict[str, Any]:
        name = plan.name
        if plan.train.epochs == 0:
            state = trainer.load_only()
        else:
            if (trainer.checkpoint_dir / "last.pt").is_file():
                trainer.resume()
            state = trainer.fit()
            trainer.load_best()
        test = trainer.test()
        model = trainer.model
        result: dict[str, Any] = {
            "name": name,
            "submodels": list(model.submodel_labels),
            "params": model.count_params(),
            "macs": model.count_macs(),
            "graph": plan.config.graph.name,
            "teachers": sorted(plan.teachers),
            "builds_on": sorted({stage for stage, _ in plan.copies}),
            "epochs": plan.train.epochs,
            "best_epoch": state.best_epoch,
            "val_accuracy": state.best_val,
            "test_accuracy": test,
            "mean_test_accuracy": sum(test) / len(test),
            "seconds": round(state.seconds, 2),
        }
        if plan.config.bridge is not None:
            result["bridge"] = plan.config.bridge.name
        if plan.store is not None:
            result["teachers"] = sorted(plan.store.store.stages)
            result["teacher_store"] = plan.config.teacher_store
        if plan.config.feature_losses:
            result["feature_losses"] = [f.name for f in plan.config.feature_losses]
        if plan.config.init is not None:
            result["init"] = plan.config.init
        elif plan.model.pretrained is not None:
            result["pretrained"] = plan.model.pretrained
        if plan.config.link_of is not None:
            result["chain"] = plan.config.link_of
        return result

    # ------------------------------------------------------------------ files
    def _notify(self, record: dict[str, Any]) -> None:
        """The ``kdreg_epoch_finished`` event, once the epoch's checkpoint is saved: the loggers
        (``[train] loggers``) write the metrics files then. Rank 0 alone fires it."""
        if distributed.is_main():
            self.pm.hook.kdreg_epoch_finished(run=self, stage=record["stage"], record=record)

    def _write_results(self) -> None:
        if not distributed.is_main():
            return
        tmp = self.directory / (RESULTS_FILE + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        tmp.replace(self.directory / RESULTS_FILE)


if TYPE_CHECKING:  # a run is what the run events are documented to receive
    from kdreg import hookspecs

    def _run_is_run_info(run: Run) -> hookspecs.RunInfo:
        return run
