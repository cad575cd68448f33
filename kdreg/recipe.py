"""The recipe: frozen attrs classes, structured from TOML by kdreg's one strict converter.

Every field carries its documentation and range in its metadata; ``docs/recipes.md`` is checked
against these classes by a test, and :func:`check_ranges` reports values out of range.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re
import sys
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import cattrs.gen
import tomli
import tomli_w

from kdreg.convert import converter, error_lines
from kdreg.errors import RecipeError


def setting(default: Any, doc: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, choices: Sequence[Any] | None = None) -> Any:
    """An attrs field with its documentation and allowed range in the metadata."""
    meta = {"doc": doc, "low": low, "high": high, "low_open": low_open, "choices": choices}
    if isinstance(default, (list, dict)) or attrs.has(type(default)):
        return attrs.field(factory=lambda: copy.deepcopy(default), metadata=meta)
    return attrs.field(default=default, metadata=meta)


@attrs.frozen
class PluginSpec:
    """A plugin name and its options: ``{ name = "ipkd-ta-m", ... }`` in TOML."""

    name: str
    options: dict[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}


@attrs.frozen
class FeatureLossSpec:
    """One entry of a stage's ``feature_losses``: ``{ name = "at", points = [...], weight = 1000.0,
    <options> }``; every other key is an option of the method's factory."""

    name: str = setting(attrs.NOTHING, "The method: `at`, `fitnet`, `sp`, `pkt`, `rkd`, `crd` or a plugin's (`kdreg list feature_losses`).")
    points: tuple[str, ...] = setting((), "Split points read on both sides, in network order (`kdreg list backbones --details` shows a backbone's).")
    student_points: tuple[str, ...] = setting((), "The student's points, where the two sides differ (with `teacher_points`, paired in order).")
    teacher_points: tuple[str, ...] = setting((), "The teacher's points, paired in order with `student_points`.")
    weight: float | None = setting(None, "The term's weight, > 0; unset: the method's default (its paper's).", low=0.0, low_open=True)
    options: dict[str, Any] = setting({}, "Not a key itself: every other key of the entry is an option of the method, e.g. `p = 2.0` (at), `negatives = 16384` (crd).")

    @property
    def pairs(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The student's and the teacher's points, paired in order."""
        return (self.student_points or self.points, self.teacher_points or self.points)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for key in ("points", "student_points", "teacher_points"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        if self.weight is not None:
            out["weight"] = self.weight
        return {**out, **self.options}


@attrs.frozen
class OptimizerConfig:
    name: str = setting("sgd", "Optimizer: `sgd` or `adamw`.", choices=("sgd", "adamw"))
    lr: float = setting(0.1, "Initial learning rate.", low=0.0, low_open=True)
    momentum: float = setting(0.9, "SGD momentum.", low=0.0, high=1.0)
    weight_decay: float = setting(5e-4, "L2 weight decay.", low=0.0)
    nesterov: bool = setting(True, "Nesterov momentum (SGD).")
    no_decay: tuple[str, ...] = setting(
        (), "Parameters exempt from weight decay: any of `bias`, `norm`, `depthwise`.")


@attrs.frozen
class ScheduleConfig:
    name: str = setting("multistep", "Learning-rate schedule: `multistep`, `cosine` or `constant`.",
                        choices=("multistep", "cosine", "constant"))
    milestones: tuple[int, ...] = setting((60, 120, 160), "Epochs at which `multistep` multiplies the rate by `gamma`.")
    gamma: float = setting(0.2, "Factor of `multistep` at each milestone.", low=0.0, low_open=True)
    warmup_epochs: int = setting(0, "Epochs of linear warm-up from 0 before the schedule.", low=0)


@attrs.frozen
class AugmentConfig:
    name: str = setting("auto", "`cifar`: a 4-pixel reflect-pad random crop and a horizontal flip (the in-memory path's, on the device); `imagenet`: timm's RandomResizedCrop and flip for training, resize and centre crop (`crop_pct`) for evaluation; `auto`: `cifar` in memory, `imagenet` when streamed. The other keys are timm's (`timm.data.create_transform`, `timm.data.Mixup`) and need the streamed path.", choices=("auto", "cifar", "imagenet"))
    auto_augment: str | None = setting(None, "timm's automatic augmentation policy, e.g. `\"rand-m9-mstd0.5\"` (RandAugment) or `\"augmix-m5-w4-d2\"`.")
    color_jitter: float = setting(0.0, "Colour jitter strength (brightness, contrast, saturation); 0: none.", low=0.0)
    re_prob: float = setting(0.0, "Random erasing probability (on images in [0, 1]).", low=0.0, high=1.0)
    scale: tuple[float, ...] = setting((0.08, 1.0), "RandomResizedCrop's range of the crop's area, as a fraction of the image's.")
    ratio: tuple[float, ...] = setting((0.75, 4.0 / 3.0), "RandomResizedCrop's range of aspect ratios.")
    hflip: float = setting(0.5, "Horizontal flip probability.", low=0.0, high=1.0)
    crop_pct: float = setting(0.875, "Evaluation: resize to `image_size / crop_pct`, then centre-crop `image_size`.", low=0.0, high=1.0, low_open=True)
    interpolation: str = setting("bilinear", "Resampling of resizes: `bilinear`, `bicubic`, `nearest` or `random`.", choices=("bilinear", "bicubic", "nearest", "random"))
    mixup: float = setting(0.0, "Mixup's alpha (`timm.data.Mixup`); 0: no mixup. Teachers see the mixed images; CE uses the mixed targets.", low=0.0)
    cutmix: float = setting(0.0, "CutMix's alpha; 0: no CutMix.", low=0.0)
    mix_prob: float = setting(1.0, "Probability of mixing a batch (mixup or CutMix).", low=0.0, high=1.0)
    switch_prob: float = setting(0.5, "With both: probability of CutMix instead of mixup.", low=0.0, high=1.0)
    label_smoothing: float = setting(0.0, "Label smoothing of the mixed targets.", low=0.0, high=1.0)


@attrs.frozen
class DataConfig:
    dataset: str = setting("cifar10", "Data source: `cifar10`, `cifar100`, `imagefolder` (folders or archives of images of any sizes), `cifar10-sample`, `synthetic`, `hfds` (a Hugging Face dataset saved on disk; `pip install \"kdreg[hf]\"`), `wds` (WebDataset shards) or a plugin's; see docs/data.md.")
    root: str = setting("~/.cache/kdreg/data", "Folder (or `.tar`/`.tar.gz` archive for `imagefolder`) of the data.")
    download: bool = setting(False, "Allow `cifar10`/`cifar100` to download when the files are missing.")
    batch_size: int = setting(128, "Training batch size, global: under torchrun with N processes each takes `batch_size / N` images of every batch (it must divide), so a recipe means the same optimisation on any number of processes.", low=1)
    eval_batch_size: int = setting(500, "Batch size of evaluation.", low=1)
    val_split: int = setting(5000, "Training images held out (class-balanced) for model selection; 0 selects on nothing.", low=0)
    train_limit: int = setting(0, "0: all training images; N: a class-balanced random subset of N, the same in every run.", low=0)
    test_limit: int = setting(0, "0: all test images; N: a class-balanced random subset of N, the same in every run.", low=0)
    data_seed: int = setting(0, "Seed of the validation split and the `train_limit`/`test_limit` subsets (kept apart from `seed`, so runs of a comparison see the same images).", low=0)
    options: dict[str, Any] = setting({}, "Extra options of the data source (e.g. `synthetic`'s `num_classes`).")
    in_memory: bool | str = setting("auto", "`true`: decode the images once into one tensor on the training device and augment them there (images of one size, `cifar` augmentation); `false`: stream them through a DataLoader with worker processes, each process reading its shard; `\"auto\"`: in memory when the decoded training set is small (under 2 GiB: CIFAR, the packaged sample) and the augmentation allows it, streamed otherwise. The console and results.json say which.")
    image_size: int = setting(0, "Training crop and evaluation size in pixels (square); 0: the images' own size in memory, 224 streamed. The models are built for it.", low=0)
    augment: AugmentConfig = setting(AugmentConfig(), "Augmentation: `\"cifar\"`, `\"imagenet\"`, `\"auto\"` or a table `{ name = \"imagenet\", auto_augment = \"rand-m9-mstd0.5\", mixup = 0.8, ... }` (see `[data.augment]`).")
    workers: int | None = setting(None, "DataLoader worker processes per training process on the streamed path (0: decode in the training process); unset: from the cores (up to 8 per process).", low=0)
    skip_bad_images: bool = setting(False, "On the streamed path, skip a truncated or unreadable image (counted in results.json) instead of stopping with its name.")


@attrs.frozen
class TrainConfig:
    epochs: int = setting(200, "Training epochs of each stage.", low=1)
    optimizer: OptimizerConfig = setting(OptimizerConfig(), "The optimizer, `{ name = \"sgd\", lr = 0.1, ... }`.")
    schedule: ScheduleConfig = setting(ScheduleConfig(), "The learning-rate schedule, `{ name = \"multistep\", ... }`.")
    device: str = setting("auto", "`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`.")
    precision: str = setting("auto", "`auto` (bf16 autocast on CUDA, fp32 on CPU), `fp32`, `bf16` or `fp16`.",
                             choices=("auto", "fp32", "bf16", "fp16"))
    channels_last: bool = setting(True, "Train in the channels-last memory format (NHWC): oneDNN's convolutions on the CPU and cuDNN's with bf16/fp16 on CUDA run faster in it; `false` keeps PyTorch's default (NCHW). The numbers differ only by rounding.")
    compile: bool = setting(False, "Compile the model with `torch.compile` (its forward calls); when compilation fails the run says so and trains without it.")
    compile_backend: str = setting("inductor", "The `torch.compile` backend (`inductor`; `eager` or `aot_eager` to debug).")
    sync_bn: bool = setting(False, "Under torchrun on CUDA, BatchNorm statistics over the global batch (SyncBatchNorm); without it each process normalises its own shard and the running statistics are averaged after every epoch.")
    calibrate_images: int = setting(2000, "Training images whose batch statistics recalibrate the BatchNorm of a universally slimmable backbone's evaluated widths before each evaluation (widths trained as a range keep no statistics of their own).", low=1)
    checkpoint_every: int | str = setting(0, "Mid-epoch checkpoints: every N training steps (`checkpoint_every = 500`), or every N minutes (`\"30min\"`), `last.pt` holds everything the run's future depends on (the position in the epoch, optimizer, schedule, random streams, feature-loss state, statistics), so that `kdreg run --resume` (or the same `kdreg run --out DIR` again) continues with exactly the batches an uninterrupted run trains. 0: at the end of every epoch only. A signal (`kdreg run --checkpoint-signals`) saves one at the next step whatever this is.")
    log_interval: int = setting(20, "Training steps between progress-bar updates (metrics are read from the device then).", low=1)
    loggers: tuple[str, ...] = setting(
        ("jsonl",), "Where every epoch's metrics go: any of `jsonl` (`metrics.jsonl`, a line per epoch, what "
        "`kdreg report` reads), `csv` (`metrics-<stage>.csv`, a row per epoch, a column per scalar and per "
        "sub-model accuracy) and `tensorboard` (`tensorboard/<stage>/`; needs `pip install \"kdreg[tensorboard]\"`).")


STAGE_TRAIN_KEYS = ("epochs", "optimizer", "schedule")

# The loggers `[train] loggers` may name (plugins/loggers.py), with the module each needs and the
# extra that installs it.
LOGGERS: dict[str, tuple[str, str] | None] = {
    "jsonl": None,
    "csv": None,
    "tensorboard": ("tensorboard", "tensorboard"),
}


@attrs.frozen
class StageConfig:
    name: str = setting(attrs.NOTHING, "Stage name, unique in the recipe; later stages refer to it.")
    backbone: PluginSpec = setting(attrs.NOTHING, "The model: `{ name = \"slimmable_mobilenet_v1\", widths = [...] }`.")
    graph: PluginSpec = setting(PluginSpec("none"), "Teacher graph: `none`, `ipkd`, `ipkd-ta-1`, `ipkd-ta-m`, `subset`, `kd` (`teacher = \"stage\"`), `deit` (a distilled DeiT: the teacher to its distillation head), `cohort` or a plugin's.")
    bridge: PluginSpec | None = setting(None, "Collaboration bridge to a frozen earlier stage: `{ name = \"stc\", teacher = \"teacher\", student_split = \"layer2\", teacher_split = \"layer2\", alpha = 0.3 }`.")
    lam: float = setting(0.8, "Weight of the distillation term (1 - lam weighs CE) for sub-models with teachers.", low=0.0, high=1.0)
    tau: float = setting(1.0, "Distillation temperature.", low=0.0, low_open=True)
    divergence: PluginSpec = setting(PluginSpec("kl"), "What is distilled along each edge of the graph: `kl` (tau^2 KL), `ce` (tau^2 soft-target cross-entropy), `hard` (CE with the teacher's argmax, DeiT's hard distillation), `dkd` (decoupled KD), `dist` (DIST) or a plugin's; a name or a table with options, `{ name = \"dkd\", alpha = 1.0, beta = 8.0, warmup = 20 }`, `{ name = \"kl\", standardise = true }` (logit standardisation). It is `D` in `(1 - lam) CE + lam * sum w * D`; `kdreg list divergences` lists them.")
    feature_losses: tuple[FeatureLossSpec, ...] = setting((), "Feature losses at split points, along the graph's edges whose two ends give features there (a frozen teacher stage's full model; the other widths of a slimmable student): `[{ name = \"at\", points = [\"layer1\", \"layer2\", \"layer3\"], weight = 1000.0 }]`; `student_points` and `teacher_points` where the two sides differ; `weight` defaults to the method's; other keys are the method's options. Each adds `weight * w * F(phi_i, sg(phi_t))` per edge; `kdreg list feature_losses` lists them.")
    teacher_store: str | None = setting(None, "A teacher store (`kdreg teach`, docs/store.md): the frozen teacher stages' outputs over K stored views of every training image; each epoch shows every image at one of its views, rebuilt exactly, with the stored outputs in place of the teachers' forward pass, and the stages it holds are not built. Refused with augmentations it cannot replay, mixup / CutMix, feature losses, a bridge, or a recipe that differs from the store on anything it recorded.")
    teacher_store_views: int = setting(0, "With `teacher_store`: when the store does not exist yet, `kdreg run` (and every point of `kdreg sweep`) builds it first with this many views of every image, as `kdreg teach --views` does (float16); a store that exists must hold this many. 0: the store must exist.", low=0)
    teacher_store_topk: int = setting(0, "With `teacher_store_views`: keep each teacher output's k largest logits (`kdreg teach --topk`); 0: full logits. A store that exists must hold the same.", low=0)
    init: str | None = setting(None, "Checkpoint file whose model weights initialise this stage (with `epochs = 0`: a trained model, evaluated and used as a teacher, not trained).")
    epochs: int | None = setting(None, "Overrides `train.epochs` for this stage; 0 (with `init`, or a backbone with pretrained weights) loads the stage instead of training it: it is evaluated and may teach later stages.", low=0)
    optimizer: OptimizerConfig | None = setting(None, "Overrides `train.optimizer` (keys merged) for this stage.")
    schedule: ScheduleConfig | None = setting(None, "Overrides `train.schedule` (keys merged) for this stage.")
    link_of: str | None = setting(None, "Set by chain expansion: the name of the `chain` stage this stage is a link of.")


@attrs.frozen
class Recipe:
    name: str = setting("run", "Name of the run.")
    seed: int = setting(0, "Seed of initialisation, batch order and augmentation; each stage and epoch draws its "
                        "own stream from it, so no stream of one seed is one of another's.", low=0)
    seeds: tuple[int, ...] = setting(
        (), "Repeats: one run per seed, each with `seed` set to it, into `seed-<s>/` sub-directories, and a "
        "`summary.json` with the mean and standard deviation of every stage and sub-model (`kdreg run --seeds "
        "0,1,2` sets it). Empty: one run with `seed`. When given, it replaces `seed`. No duplicates, each >= 0.")
    data: DataConfig = setting(DataConfig(), "The `[data]` table.")
    train: TrainConfig = setting(TrainConfig(), "The `[train]` table: defaults every stage inherits.")
    stages: tuple[StageConfig, ...] = setting((), "The `[[stages]]`, trained in order.")

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def stage_train(self, stage: StageConfig) -> TrainConfig:
        """The effective training settings of ``stage`` (its overrides on top of ``[train]``)."""
        return attrs.evolve(
            self.train,
            **{k: getattr(stage, k) for k in STAGE_TRAIN_KEYS if getattr(stage, k) is not None},
        )


# ----------------------------------------------------------------------------- converter hooks
def _structure_plugin(value: Any, _: type) -> PluginSpec:
    if isinstance(value, str):
        return PluginSpec(value)
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a table with a `name` or a name string, got {type(value).__name__} {value!r}")
    if "name" not in value:
        raise KeyError("name")
    if not isinstance(value["name"], str):
        raise TypeError(f"expected a string for `name`, got {value['name']!r}")
    return PluginSpec(value["name"], {k: v for k, v in value.items() if k != "name"})


converter.register_structure_hook(PluginSpec, _structure_plugin)
converter.register_unstructure_hook(PluginSpec, PluginSpec.to_dict)


_augment_table = cattrs.gen.make_dict_structure_fn(AugmentConfig, converter, _cattrs_forbid_extra_keys=True,
                                                   _cattrs_detailed_validation=True)


def _structure_augment(value: Any, _: type) -> AugmentConfig:
    """``"imagenet"`` or ``{ name = "imagenet", mixup = 0.8, ... }``."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a name string or a table, got {type(value).__name__} {value!r}")
    return _augment_table(dict(value), AugmentConfig)


_MINUTES = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(?:min|mins|minute|minutes)\s*$")


def checkpoint_interval(value: int | str) -> tuple[int, float]:
    """``train.checkpoint_every`` as ``(steps, seconds)``, one of them 0 (both: epochs only)."""
    if isinstance(value, str):
        return 0, 60.0 * float(_MINUTES.fullmatch(value).group(1))  # type: ignore[union-attr]
    return int(value), 0.0


def _structure_checkpoint_every(value: Any, _: type) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _MINUTES.fullmatch(value)
        if match and float(match.group(1)) > 0:
            return value
    raise TypeError(f"expected a number of steps >= 0 or of minutes such as \"30min\", got "
                    f"{type(value).__name__} {value!r}")


def _structure_in_memory(value: Any, _: type) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise TypeError(f"expected true, false or \"auto\", got {type(value).__name__} {value!r}")


@attrs.frozen
class _FeatureKeys:
    name: str
    points: tuple[str, ...] = ()
    student_points: tuple[str, ...] = ()
    teacher_points: tuple[str, ...] = ()
    weight: float | None = None


_feature_keys = cattrs.gen.make_dict_structure_fn(_FeatureKeys, converter, _cattrs_forbid_extra_keys=True,
                                                  _cattrs_detailed_validation=True)
_FEATURE_KEYS = ("name", "points", "student_points", "teacher_points", "weight")


def _structure_feature_loss(value: Any, _: type) -> FeatureLossSpec:
    """``{ name = ..., points = [...], weight = ..., <options> }``; the options are checked by the
    method's factory when the stage is assembled."""
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a table {{ name = ..., points = [...] }}, got {type(value).__name__} {value!r}")
    keys = _feature_keys({k: v for k, v in value.items() if k in _FEATURE_KEYS}, _FeatureKeys)
    return FeatureLossSpec(keys.name, keys.points, keys.student_points, keys.teacher_points, keys.weight,
                           {k: v for k, v in value.items() if k not in _FEATURE_KEYS})


converter.register_structure_hook(AugmentConfig, _structure_augment)
converter.register_structure_hook(FeatureLossSpec, _structure_feature_loss)
converter.register_unstructure_hook(FeatureLossSpec, FeatureLossSpec.to_dict)
converter.register_structure_hook_func(lambda tp: tp == (bool | str), _structure_in_memory)
converter.register_structure_hook_func(lambda tp: tp == (int | str), _structure_checkpoint_every)


# ----------------------------------------------------------------------------- loading
def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override (``key=value`` by dotted path) and structure a TOML recipe."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError([f"{path}: cannot read the recipe: {exc.strerror or exc}"]) from None
    return parse_recipe(text, source=str(path), overrides=overrides)


def parse_recipe(text: str, *, source: str = "recipe", overrides: Iterable[str] = ()) -> Recipe:
    try:
        raw = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        raise RecipeError([f"{source}: broken TOML: {exc}"]) from None
    return structure_recipe(raw, source=source, overrides=overrides)


def structure_recipe(raw: dict[str, Any], *, source: str = "recipe", overrides: Iterable[str] = ()) -> Recipe:
    raw = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        try:
            apply_override(raw, item)
        except RecipeError as exc:
            problems += exc.problems
    if problems:
        raise RecipeError([f"{source}: {p}" for p in problems])
    problems = expand_chains(raw)
    if problems:
        raise RecipeError([f"{source}: {p}" for p in problems])
    _inherit_train(raw)
    problems = [_named_stage_paths(p, raw) for p in check_ranges(raw)]
    try:
        recipe = converter.structure(raw, Recipe)
    except Exception as exc:  # noqa: BLE001 - cattrs collects every problem
        problems = [_named_stage_paths(line, raw) for line in error_lines(exc, "recipe")] + problems
    if problems:
        raise RecipeError([f"{source}: {p}" for p in problems])
    return recipe


CHAIN_EXCLUDES = ("backbone", "graph", "bridge", "init", "link_of")


def expand_chains(raw: dict[str, Any]) -> list[str]:
    """Replace every ``chain = [...]`` stage of the raw recipe by one stage per link (TAKD).

    ``chain`` lists backbones (names or tables), teacher first. Each link after the first is
    distilled with graph ``kd`` from the link before it, frozen; the first is trained on labels,
    unless it names an earlier stage, which then is the chain's teacher. The links are named
    ``<chain>_<backbone>`` and inherit the chain stage's other keys (``lam``, ``tau``, ``epochs``...).
    """
    stages = raw.get("stages")
    if not isinstance(stages, list):
        return []
    problems: list[str] = []
    out: list[Any] = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or "chain" not in stage:
            out.append(stage)
            continue
        where = f"recipe.stages[{i}]"
        name, chain = stage.get("name"), stage["chain"]
        if not isinstance(name, str):
            problems.append(f"a chain stage needs a name @ {where}.name")
            continue
        where = f"recipe.stages.{name}" if name.isidentifier() else where
        bad = [k for k in CHAIN_EXCLUDES if k in stage]
        if bad:
            problems.append(f"a chain stage takes no {', '.join(bad)}: each link's backbone comes from "
                            "`chain` and is distilled with graph kd; give a loaded teacher its own "
                            f"stage and start the chain with its name @ {where}.{bad[0]}")
        if not isinstance(chain, list) or len(chain) < 2:
            problems.append(f"chain needs a list of at least two links, teacher first, got {chain!r} "
                            f"@ {where}.chain")
            continue
        earlier = [s.get("name") for s in out if isinstance(s, dict)]
        links = list(chain)
        teacher = links.pop(0) if isinstance(links[0], str) and links[0] in earlier else None
        base = {k: v for k, v in stage.items() if k not in ("chain", "name", *CHAIN_EXCLUDES)}
        used: set[str] = {n for n in earlier if isinstance(n, str)}
        for k, link in enumerate(links):
            label = link if isinstance(link, str) else link.get("name") if isinstance(link, dict) else None
            if not isinstance(label, str):
                problems.append(f"link {k} must be a backbone name or table, got {link!r} @ {where}.chain")
                continue
            link_name = f"{name}_{label}".replace("-", "_")
            n = 2
            while link_name in used:
                link_name, n = f"{name}_{label}_{n}".replace("-", "_"), n + 1
            used.add(link_name)
            new = {"name": link_name, **base, "backbone": link, "link_of": name}
            new["graph"] = {"name": "kd", "teacher": teacher} if teacher else {"name": "none"}
            out.append(new)
            teacher = link_name
    raw["stages"] = out
    return problems


def _inherit_train(raw: dict[str, Any]) -> None:
    """A stage's partial ``optimizer``/``schedule`` table is completed from ``[train]``'s."""
    train: Any = _table(raw, "train")
    for stage in _list(raw, "stages"):
        if not isinstance(stage, dict):
            continue
        for key in ("optimizer", "schedule"):
            if isinstance(stage.get(key), dict) and isinstance(train.get(key), dict):
                stage[key] = {**train[key], **stage[key]}


def _named_stage_paths(line: str, raw: dict[str, Any]) -> str:
    names = [s.get("name") if isinstance(s, dict) else None for s in _list(raw, "stages")]
    for i, name in enumerate(names):
        if isinstance(name, str) and name.isidentifier() and names.count(name) == 1:
            line = line.replace(f"recipe.stages[{i}]", f"recipe.stages.{name}")
    return line


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``dotted.key=value`` to the raw recipe; the value is read as TOML, else as a string.

    Stages are addressed by name: ``stages.student.lam=0.5``.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError([f"override {item!r} is not KEY=VALUE @ --set"])
    try:
        value = tomli.loads(f"v = {text.strip()}")["v"]
    except tomli.TOMLDecodeError:
        value = text.strip()
    parts = key.split(".")
    node: Any = raw
    walked = []
    for i, part in enumerate(parts[:-1]):
        walked.append(part)
        if part == "stages" and i == 0:
            stages = node.setdefault("stages", [])
            if i + 1 >= len(parts) - 1:
                raise RecipeError([f"override {item!r}: name a stage and a key, e.g. stages.student.lam @ --set"])
            stage_name = parts[i + 1]
            match = [s for s in stages if isinstance(s, dict) and s.get("name") == stage_name]
            if not match:
                known = ", ".join(str(s.get("name")) for s in stages if isinstance(s, dict)) or "none"
                raise RecipeError([f"override {item!r}: no stage named {stage_name!r}; stages: {known} @ --set"])
            node = match[0]
            rest = parts[i + 2:]
            for sub in rest[:-1]:
                node = _child(node, sub, item)
            node[rest[-1]] = value
            return
        node = _child(node, part, item)
    node[parts[-1]] = value


def _child(node: Any, part: str, item: str) -> dict[str, Any]:
    if not isinstance(node, dict):
        raise RecipeError([f"override {item!r}: {part!r} is not inside a table @ --set"])
    child = node.setdefault(part, {})
    if not isinstance(child, dict):
        raise RecipeError([f"override {item!r}: {part!r} is not a table @ --set"])
    return child


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as TOML (written into every run directory); ``seeds`` only when given."""
    raw = converter.unstructure(recipe)
    if not raw.get("seeds"):
        raw.pop("seeds", None)
    return tomli_w.dumps(_drop_none(raw))


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- ranges
#: Run and stage names become folder and file names (``runs/<name>-<time>``,
#: ``checkpoints/<stage>/``): nothing in them may lead out of the run directory.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")

def check_ranges(raw: Mapping[str, Any]) -> list[str]:
    """Values of the raw recipe outside their documented range, as ``what @ recipe.path`` lines.

    Works on the raw tables so that range problems are reported beside type problems.
    """
    problems: list[str] = []
    _walk(raw, Recipe, "recipe", problems)
    stages = [s for s in _list(raw, "stages") if isinstance(s, Mapping)]
    names: list[str] = [s["name"] for s in stages if isinstance(s.get("name"), str)]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"stage name {name!r} is used more than once @ recipe.stages")
    named = [("run name", raw.get("name"), "recipe.name")] + [
        ("stage name", s.get("name"), f"recipe.stages[{i}].name") for i, s in enumerate(stages)]
    for what, given, where in named:
        if isinstance(given, str) and not SAFE_NAME.fullmatch(given):
            problems.append(f"{what} {given!r} names a folder of the run directory: use letters, "
                            f"digits, '_', '-' and '.', not first, and no '/' or '\\' @ {where}")
    if not raw.get("stages"):
        problems.append("a recipe needs at least one [[stages]] table @ recipe.stages")
    train = _table(raw, "train")
    for where, table in [("recipe.train", train)] + [(f"recipe.stages[{i}]", s) for i, s in enumerate(stages)]:
        ms = _table(table, "schedule").get("milestones")
        if isinstance(ms, list) and all(isinstance(m, int) for m in ms) and ms != sorted(ms):
            problems.append(f"milestones must increase, got {ms} @ {where}.schedule.milestones")
        nd = _table(table, "optimizer").get("no_decay")
        if isinstance(nd, list):
            bad = sorted(set(map(str, nd)) - {"bias", "norm", "depthwise"})
            if bad:
                problems.append(f"unknown no_decay kinds {bad}; allowed: bias, norm, depthwise @ {where}.optimizer.no_decay")
    for i, stage in enumerate(stages):
        problems += _feature_loss_problems(stage.get("feature_losses"), f"recipe.stages[{i}].feature_losses")
    augment = _table(raw, "data").get("augment")
    presets = attrs.fields(AugmentConfig).name.metadata["choices"]
    if isinstance(augment, str) and augment not in presets:
        problems.append(f"expected one of {', '.join(presets)}, got {augment!r} @ recipe.data.augment")
    problems += _logger_problems(train.get("loggers"))
    problems += _seeds_problems(raw.get("seeds"))
    dev = train.get("device")
    if isinstance(dev, str) and not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        problems.append(f"device must be auto, cpu, cuda or cuda:N, got {dev!r} @ recipe.train.device")
    return problems


def _logger_problems(loggers: Any) -> list[str]:
    """Unknown, repeated or uninstalled loggers of ``[train] loggers`` (other types: the converter)."""
    where = "recipe.train.loggers"
    if not isinstance(loggers, list):  # the converter reports it: expected a list
        return []
    names = [n for n in loggers if isinstance(n, str)]
    problems = []
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        problems.append(f"unknown logger(s) {', '.join(map(repr, unknown))}; known: "
                        f"{', '.join(sorted(LOGGERS))} @ {where}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"logger(s) {', '.join(map(repr, repeated))} listed more than once @ {where}")
    for name in dict.fromkeys(names):
        needs = LOGGERS.get(name)
        if needs is not None and not _installed(needs[0]):
            problems.append(f"logger {name!r} needs the {needs[0]} package: "
                            f"pip install \"kdreg[{needs[1]}]\" @ {where}")
    return problems


def _feature_loss_problems(entries: Any, where: str) -> list[str]:
    """Points missing or unpaired, and weights out of range, of a stage's ``feature_losses``
    (other types: the converter)."""
    if not isinstance(entries, list):
        return []
    problems = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            continue
        at = f"{where}[{k}]"
        points, student, teacher = (entry.get(key) for key in ("points", "student_points", "teacher_points"))
        if not points and not (student and teacher):
            problems.append(f"give the split points it reads: points = [...], or student_points and "
                            f"teacher_points @ {at}.points")
        elif points and (student or teacher):
            problems.append(f"give points, or student_points and teacher_points, not both @ {at}.points")
        elif (isinstance(student, list) and isinstance(teacher, list) and len(student) != len(teacher)):
            problems.append(f"student_points ({len(student)}) and teacher_points ({len(teacher)}) are paired "
                            f"in order and must be as many @ {at}.teacher_points")
        weight = entry.get("weight")
        if (isinstance(weight, (int, float)) and not isinstance(weight, bool)
                and not (math.isfinite(weight) and weight > 0)):
            problems.append(f"weight must be a finite number > 0, got {weight} @ {at}.weight")
    return problems


def _seeds_problems(seeds: Any) -> list[str]:
    """Negative or repeated seeds of ``seeds`` (other types: the converter)."""
    if not isinstance(seeds, list):
        return []
    ints = [s for s in seeds if isinstance(s, int) and not isinstance(s, bool)]
    problems = [f"seeds must be >= 0, got {s} @ recipe.seeds[{i}]" for i, s in enumerate(seeds) if s in ints and s < 0]
    repeated = sorted({s for s in ints if ints.count(s) > 1})
    if repeated:
        problems.append(f"seed(s) {', '.join(map(str, repeated))} listed more than once @ recipe.seeds")
    return problems


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _table(raw: Any, key: str) -> Any:
    """``raw[key]`` when it is a table, else an empty one (a type problem reported elsewhere)."""
    value = raw.get(key) if isinstance(raw, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _list(raw: Any, key: str) -> list[Any]:
    value = raw.get(key) if isinstance(raw, Mapping) else None
    return value if isinstance(value, list) else []


def _walk(raw: Any, cls: type, path: str, problems: list[str]) -> None:
    if not isinstance(raw, Mapping):
        return
    for f in attrs.fields(cls):
        if f.name not in raw:
            continue
        value, where, meta = raw[f.name], f"{path}.{f.name}", f.metadata
        if meta.get("choices") is not None and isinstance(value, str) and value not in meta["choices"]:
            problems.append(f"expected one of {', '.join(map(str, meta['choices']))}, got {value!r} @ {where}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = meta.get("low"), meta.get("high")
            too_low = low is not None and (value <= low if meta.get("low_open") else value < low)
            too_high = high is not None and value > high
            if too_low or too_high:
                problems.append(f"{f.name} must be {_range_text(meta)}, got {value} @ {where}")
        for sub in _attrs_classes(f.type):
            if sub is StageConfig and isinstance(value, list):
                for i, item in enumerate(value):
                    _walk(item, StageConfig, f"{where}[{i}]", problems)
            elif sub is not PluginSpec:
                _walk(value, sub, where, problems)


def _attrs_classes(tp: Any) -> list[type]:
    """The attrs classes a field annotation mentions (``X``, ``X | None``, ``tuple[X, ...]``)."""
    if attrs.has(tp):
        return [tp]
    return [c for arg in typing.get_args(tp) for c in _attrs_classes(arg)]

def _range_text(meta: Mapping[str, Any]) -> str:
    low, high = meta.get("low"), meta.get("high")
    if high is not None:
        return f"in [{low:g}, {high:g}]"
    return f"> {low:g}" if meta.get("low_open") else f">= {low:g}"



for _cls in (PluginSpec, FeatureLossSpec, _FeatureKeys, OptimizerConfig, ScheduleConfig, DataConfig, TrainConfig, StageConfig, Recipe):
    attrs.resolve_types(_cls)
