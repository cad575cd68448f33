"""The recipe reference (docs/recipes.md) generated from the attrs classes' metadata.

``python -m kdreg.recipe_docs > docs/recipes.md`` regenerates it; a test fails when it is stale.
"""

from __future__ import annotations

import typing
from typing import Any

import attrs

from kdreg.recipe import (
    DataConfig,
    OptimizerConfig,
    Recipe,
    ScheduleConfig,
    StageConfig,
    TrainConfig,
)

SECTIONS = [
    ("Top level", "", Recipe),
    ("`[data]`", "data.", DataConfig),
    ("`[train]`", "train.", TrainConfig),
    ("`[train.optimizer]`", "train.optimizer.", OptimizerConfig),
    ("`[train.schedule]`", "train.schedule.", ScheduleConfig),
    ("`[[stages]]`", "stages.NAME.", StageConfig),
]

INTRO = """# Recipe reference

A recipe is a TOML file: `kdreg validate RECIPE` checks it, `kdreg run RECIPE` trains it. Unknown
keys are errors; every problem is reported on its own line as `what @ recipe.path.to.key`. Any key
can be overridden on the command line by its dotted path: `--set train.epochs=1`,
`--set stages.student.lam=0.5` (stages are addressed by name). Values are read as TOML, so strings
may be written bare (`--set data.root=/data/cifar`).

A stage's `epochs`, `optimizer` and `schedule` override `[train]`; a partial `optimizer` or
`schedule` table is completed from `[train]`'s. Plugin tables (`backbone`, `graph`) take `name`
plus the plugin's own options: `kdreg list --details` shows the registered names, and a wrong option
is reported with the options the plugin accepts.

The distillation rule every graph uses (design section 1): a sub-model without teachers is trained
on `CE`; one with teachers `T_i` on `(1 - lam) * CE + lam * sum_(t,w) w * KD(a_i, sg(a_t))`, with
`KD = tau^2 * KL(p_t || p_s)` (`divergence = "kl"`) or `tau^2 * H(p_t, p_s)` (`"ce"`), averaged over
the batch (not over classes; TAKD's reference also divided by the number of classes).

This file is generated from the recipe classes (`python -m kdreg.recipe_docs > docs/recipes.md`);
a test fails when it is out of date.
"""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
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
    if attrs.has(type(default)):
        return "see below"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, str):
        return f'`"{default}"`'
    if isinstance(default, tuple):
        return f"`{list(default)}`"
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
