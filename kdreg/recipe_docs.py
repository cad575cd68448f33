"""The recipe reference (docs/recipes.md) generated from the attrs classes' metadata.

``python -m kdreg.recipe_docs > docs/recipes.md`` regenerates it; a test fails when it is stale.
"""

from __future__ import annotations

import json
import typing
from typing import Any

import attrs

from kdreg.recipe import (
    AugmentConfig,
    DataConfig,
    FeatureLossSpec,
    OptimizerConfig,
    PluginSpec,
    Recipe,
    ScheduleConfig,
    StageConfig,
    TrainConfig,
)

SECTIONS = [
    ("Top level", "", Recipe),
    ("`[data]`", "data.", DataConfig),
    ("`[data.augment]`", "data.augment.", AugmentConfig),
    ("`[train]`", "train.", TrainConfig),
    ("`[train.optimizer]`", "train.optimizer.", OptimizerConfig),
    ("`[train.schedule]`", "train.schedule.", ScheduleConfig),
    ("`[[stages]]`", "stages.NAME.", StageConfig),
    ("`feature_losses` entries", "stages.NAME.feature_losses[k].", FeatureLossSpec),
]

INTRO = """# Recipe reference

A recipe is a TOML file: `kdreg validate RECIPE` checks it, `kdreg run RECIPE` trains it. Unknown
keys are errors; every problem is reported on its own line as `what @ recipe.path.to.key`. Any key
can be overridden on the command line by its dotted path: `--set train.epochs=1`,
`--set stages.student.lam=0.5` (stages are addressed by name). Values are read as TOML, so strings
may be written bare (`--set data.root=/data/cifar`).

A stage's `epochs`, `optimizer` and `schedule` override `[train]`; a partial `optimizer` or
`schedule` table is completed from `[train]`'s. Plugin tables (`backbone`, `graph`, `bridge`,
`divergence`) take `name` plus the plugin's own options: `kdreg list --details` shows the registered
names, and a wrong option is reported with the options the plugin accepts.

The distillation rule every graph uses: a sub-model without teachers is trained on `CE`; one with
teachers `T_i` on `(1 - lam) * CE + lam * sum_(t,w) w * D(a_i, sg(a_t))`, where `D` is the stage's
`divergence`: `KD = tau^2 * KL(p_t || p_s)` (`divergence = "kl"`, the default) or
`tau^2 * H(p_t, p_s)` (`"ce"`), averaged over the batch (not over classes; TAKD's reference also
divided by the number of classes), or another registered divergence (`dkd`, `dist`, a plugin's).
A method whose paper has its own cross-entropy term leaves it to the rule (`1 - lam`); its weights
between its own terms and its warm-up are the divergence's options (see the README's table of
divergences).

## Stages that learn from earlier stages

Stages are trained in order; a stage refers to an earlier one by its name and finds it trained
(its selected epoch's weights) and frozen: in eval mode, under `no_grad`, in no optimizer, never
changed. Its outputs are computed once per batch, on the same augmented batch the student sees.

- `graph = { name = "kd", teacher = "teacher" }`: every sub-model of this stage is taught by the
  teacher stage's full output with weight 1 (Hinton's KD; one TAKD link). `teacher = ["a", "b"]`
  is an ensemble of frozen teachers, each with weight 1/2 (for the student's gradient, KD against
  the teachers' averaged soft targets).
- `graph = { name = "ipkd-ta-1", teacher = "teacher" }`: **inplace and frozen edges in one graph.**
  The inplace graphs (`ipkd`, `ipkd-ta-1`, `ipkd-ta-m`, `subset`) take `teacher` (a stage or a
  list of stages, as `kd`) and `teacher_weight` (default 1, split evenly between the stages):
  besides their edges between the sub-models, the frozen stages' full outputs teach the largest
  sub-model (the step's largest for a width range or set). Scala's progressive knowledge transfer
  is `ipkd-ta-1` with `teacher` (`recipes/scala/`).
- `graph = { name = "cohort", teacher = "heads" }`: taught by every output of a frozen multi-exit
  stage (K heads and the main output), each with weight 1/(K+1): EKD (ekd-thesis eq. 4.6-4.7).
  The thesis's `alpha` weighs distillation (eq. 2.4, eq. 4.7 and its code; only eq. 4.5 puts it
  on CE), as `lam` does here: its `alpha = 0.1` is `lam = 0.1`. Its code sums one
  `alpha * KD + (1 - alpha) * CE` per cohort member instead of averaging the KD terms: K+1 times
  the equation's loss, the same balance of KD and CE. kdreg follows the equation.
- `backbone = { name = "exits", trunk = "teacher", freeze_trunk = true, head = "flatten_linear" }`
  with `graph = "none"`: EKD's heads, trained on labels on the frozen teacher's features (the
  trunk runs once per batch for every head).
- `bridge = { name = "stc", teacher = "teacher", student_split = "layer2", teacher_split =
  "layer2", alpha = 0.3, target = "output" }`: student-teacher collaboration (STC). The student's
  front part up to `student_split` feeds the frozen teacher's back part from `teacher_split` (an
  adapter, 1x1 conv + BN and resampling, joins other shapes); the stage trains on
  `alpha * CE(O_c, target) + (1 - alpha) * L_graph`, where `target` is `output` (the teacher's
  softmax), `hard` (the teacher's argmax: the paper's Table 5 calls its output-tensor target a
  hard target), `soft` (the softmax at temperature `tau`, times `tau^2`) or `label` (the ground
  truth). With a `kd` graph on the same teacher this is STC "+KD". Gradients flow through the teacher's back part into the student; the
  teacher's weights never change; inference uses the student alone.
- `chain = ["resnet110", "resnet20", "resnet8"]` (instead of `backbone` and `graph`): a TAKD
  chain. It expands into one stage per link, named `<chain>_<backbone>`; the first link is trained
  on labels (or, when it names an earlier stage, is that stage), every later one with `kd` from the
  link before it. Links inherit the chain stage's other keys (`lam`, `tau`, `epochs`, ...);
  `--set stages.<chain>.lam=...` sets them for every link.
- A stage with `init = "teacher.pt"` and `epochs = 0` is a loaded, trained model: it is evaluated,
  not trained, and later stages can learn from it. So is a stage with `epochs = 0` whose backbone
  has pretrained weights: `backbone = { name = "timm", model = "resnet50.a1_in1k" }` (a tagged
  name, or `pretrained = true`) loads timm's weights through timm's loader and the Hugging Face
  cache (offline with `HF_HUB_OFFLINE=1` once the cache holds them), `pretrained_file` a local
  file. A classifier of another class count than the data's is re-initialised (the console says
  so), and the model is fed its weights' own input statistics (the `pretrained_cfg`'s mean and
  std) while models trained here get the data set's, in the same run.

Every stage inherits `epochs` from `[train]` unless it sets its own, so `--set train.epochs=1`
shortens every trained stage of a recipe. `results.json` has an entry per stage (teachers and every
chain link too) with its sub-models, parameters, MACs, accuracies and the stages it learned from.

## Slimmable widths: a list, a range or a set

A slimmable backbone (`slimmable_mobilenet_v1`, `slimmable_resnet<depth>`, `tiny_slimmable`, or
`slimmable` over any `trunk`) takes its widths in one of three forms:

- `widths = [0.25, 0.5, 0.75, 1.0]` (the default): those widths are trained every step and
  evaluated, each with a private BatchNorm (Yu et al., slimmable networks).
- `widths = { min = 0.25, max = 1.0, sampled = 2 }`: universally slimmable (US-Nets, Yu & Huang
  ICCV 2019), any width of [min, max]. Every step trains the sandwich `min`, `sampled` widths
  drawn uniformly from (min, max) and `max` (the teacher graph's nodes, smallest first, so that
  `graph = "ipkd"` is inplace distillation from the largest); `eval = [...]` are the widths
  evaluated, counted and exported (default: 4 widths evenly spaced from `min` to `max`
  inclusive). Each layer has one BatchNorm whose affine parameters every width shares (its first
  channels) and which normalises with the batch's statistics in training; the statistics of each
  evaluated width are recomputed before every evaluation as the plain average over
  `train.calibrate_images` training images (BN calibration). A width's channels follow the list
  form's rule (`int(C * w)`); a `min` that leaves a layer no channel, `min > max`, widths outside
  (0, 1] and `sampled < 0` are refused (`@ recipe.stages.<stage>.backbone.widths`).
  `kdreg eval RUN --widths 0.35,0.6 --calibrate 2000` evaluates other widths of the range after
  recalibrating them; `kdreg export RUN --submodel x0.6` exports any width of it as a plain
  network.
- `widths = { set = [0.25, 0.3125, ..., 1.0], sampled = 2, eval = [0.25, 0.5, 0.75, 1.0] }`: a
  discrete set trained by the same sandwich rule (Scala's X widths). Every step trains the set's
  smallest and largest members and one member drawn, by the step's seed, from each of `sampled`
  consecutive strata of equal size of the members between them (13 widths and `sampled = 2`: one
  of 0.3125-0.5625 and one of 0.625-0.9375, Scala's draw). `eval` must be members (default: the 4
  members at evenly spaced positions, both ends included); BatchNorm is kept and calibrated as
  for a range. A set of fewer than two widths, `sampled` above the number of members between the
  ends and `min` or `max` beside `set` are refused.

A transformer (`slimmable` over a trunk with attention) has no BatchNorm to recalibrate: a range
or set of it needs no calibration, and a width its training did not run (outside the range, not a
member of the set) is refused by `kdreg eval --widths` and `kdreg export --submodel` in one line
naming the trained widths; a CNN evaluates any width of its range after calibration. Two options
of `slimmable` follow Scala: `heads = "kept"` keeps every attention head at every width and
slices each head's channels (DeiT-S's 6 heads at any 1/16 of its embedding; the default
`"sliced"` runs whole heads, a narrow width being the timm ViT of fewer heads), and
`isolated = true` (isolated activation) runs the smallest width on the LAST channels of every
layer, token and head, the other widths on the first ones (a trunk with BatchNorm is refused);
its export is the plain network holding those last channels.

## Many processes and GPUs (torchrun)

`kdreg run RECIPE --nproc N` starts `torchrun --standalone --nproc_per_node N -m kdreg run RECIPE`
on this machine; on several nodes start torchrun yourself on every node with the same rendezvous:

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        --rdzv_id my-run -m kdreg run recipe.toml --out /mnt/team/runs/my-run

(`--out` on a file system every node sees; rank 0 alone writes there). The training is PyTorch's
DistributedDataParallel: NCCL on CUDA (each process on `cuda:LOCAL_RANK`), gloo on the CPU.

- `data.batch_size` is the **global** batch: each of N processes takes `batch_size / N` images of
  every batch (N must divide it), so a recipe means the same optimisation (the same learning rate
  for the same batch) on any number of processes, and the gradient of a step equals the
  one-process gradient of the whole batch.
- Gradients are all-reduced once per step: a multi-pass (slimmable) model runs every width but the
  last under `no_sync`, so its last backward reduces every width's gradients together, each
  width's BatchNorm parameters included. Frozen teachers are not wrapped; each process runs them
  on its own shard.
- BatchNorm normalises each process's shard; its running statistics are averaged over the
  processes after every epoch. `sync_bn = true` (CUDA only) normalises over the global batch.
- Every process evaluates its shard of the validation and test splits; the counts are summed.
- Rank 0 alone writes files (`results.json`, `metrics.jsonl`, checkpoints), prints and fires the
  run events. `kdreg run --resume DIR --nproc N` (or torchrun with `--resume DIR`) continues a run.

## Precision and speed

`precision = "auto"` autocasts to bf16 on CUDA and stays in fp32 on the CPU; `"bf16"` autocasts on
either; `"fp16"` needs CUDA and trains with a gradient scaler (on the CPU it is an error). The
losses are always computed in fp32 from the upcast logits. `channels_last = true` trains in the
channels-last memory format; `compile = true` compiles the model's forward with `torch.compile`
(when compilation fails the run says so and trains without it). Optimizers use the fused kernels
on CUDA and the multi-tensor ones elsewhere. On the CPU a strided 1x1 convolution of fewer than
8 input channels (a slimmable ResNet's narrowest shortcut) runs as a subsample then a stride-1
convolution: the same numbers, but never oneDNN's AVX2 kernel for its weight gradient, which
gets them wrong, or hangs, on CPUs without AVX-512. A training step reads nothing from the
device: the loss and accuracy stay there and are read once per `log_interval` steps.

This file is generated from the recipe classes (`python -m kdreg.recipe_docs > docs/recipes.md`);
a test fails when it is out of date.
"""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if tp is PluginSpec:
        return "name or table"
    if attrs.has(tp):
        return "table"
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "table"
    if origin in (typing.Union, __import__("types").UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def _default(field: Any) -> str:
    if field.default is attrs.NOTHING:
        return "required"
    default: Any = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    if default is None:
        return "unset"
    if isinstance(default, PluginSpec) and not default.options:
        return f'`"{default.name}"`'
    if attrs.has(type(default)):
        return "see below"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, str):
        return f'`"{default}"`'
    if isinstance(default, tuple):
        return f"`{json.dumps(list(default))}`"
    if isinstance(default, dict):
        return "`{}`"
    return f"`{default}`"


def rows(cls: type, prefix: str) -> list[str]:
    """The markdown table rows of ``cls``'s keys."""
    out = []
    for f in attrs.fields(cls):
        out.append(f"| `{prefix}{f.name}` | {_type_name(f.type)} | {_default(f)} | {f.metadata['doc']} |")
    return out


def reference_markdown() -> str:
    parts = [INTRO]
    for title, prefix, cls in SECTIONS:
        parts.append(f"\n## {title}\n\n| key | type | default | meaning |\n|---|---|---|---|")
        parts.extend(rows(cls, prefix))
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
