"""kdreg's performance figures, every one measured side by side in one process.

    python benchmarks/run.py --json bench.json [--quick] [--family NAME] [--data PATH] [--threads N] [--channels-last true|false]

Prints a table (figure, value, target, pass/fail) and writes the JSON
``{figure: value, ..., "targets": {...}, "passed": {...}, "notes": {...}, "details": {...},
"machine": {...}}``. A figure that cannot be measured is ``null`` with its reason in ``notes``
(``missing: ...``), never a made-up number. Every time is the median of ``--steps`` (at least
20; ``--quick``: 3, a smoke test) steps after warm-up, the steps compared alternating in turn, so
the load of a shared machine hits them alike.

The figures come in families, a module each, measured in the order of ``FAMILY_MODULES``; each
module's docstring defines its figures:

* ``steps.py``: ``overhead_ratio``, ``activation_memory_ratio``, ``teacher_saved_bytes``,
  ``host_syncs_per_step``, ``peer_ratio`` (kdreg's step against a hand-written one and
  torchdistill's, what it saves for backward, its host reads);
* ``width.py``: ``width_cost_ratio`` (judged against ``width_cost_limit``),
  ``slimmable_overhead_ratio``, ``distill_cost_ratio`` (measured in the same alternation), the
  ``*_resnet18`` three (reported) and the width cost by kernel class;
* ``data.py``: ``loader_fraction``, ``stream_loader_ratio``, ``stream_memory_ratio``,
  ``loader_fraction_streamed`` (reported), the streamed ones measured by ``streaming.py``;
* ``features.py``: ``feature_loss_cost_ratio``, ``crd_cost_ratio`` (reported);
* ``checkpoints.py``: ``checkpoint_cost_ratio`` (an epoch with a step checkpoint every 50 steps
  against one without);
* ``transformers.py``: ``vit_slimmable_overhead_ratio`` (a 4-width slimmable DeiT-Ti shape against
  four plain ViTs of its widths' shapes), ``deit_token_kd_ratio`` (reported: DeiT's distillation
  token step against the plain DeiT's);
* ``store.py``: ``stored_kd_cost_ratio`` (a KD step from a teacher store against a CE step),
  ``live_kd_cost_ratio`` (reported: the live teacher's KD step), ``store_bytes_per_view`` and
  ``store_bytes_per_view_topk`` (reported), ``store_memory_ratio``.

``common.py`` holds what they share (``Settings``, ``Figure``, the models and the trainer they
build), ``probes.py`` the instruments. To add a family: a module beside this one whose ``FAMILY``
(:class:`common.Family`) lists its jobs (each the names of the figures it returns and a function
of the settings and a work folder) and the targets of the figures it judges (a figure with none
is reported); then its name, one line, in ``FAMILY_MODULES``. The table, the JSON and its judging
follow from it.

torchdistill comes with the ``bench`` extra (``pip install -e ".[bench]"``). Its declared
requirements (numpy, pyyaml, scipy, cython) may move the installed torch; where they would, install
it without them: ``pip install --no-deps "torchdistill>=1.0"``. Its loss modules import with torch,
torchvision, numpy, pyyaml and scipy alone (cython is only needed to build pycocotools).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Family, Figure, Settings  # noqa: E402  (a sibling module of this script)

from kdreg.engine.host_memory import keep_freed_memory  # noqa: E402
from kdreg.errors import UserError  # noqa: E402

#: the modules of the figure families (sibling modules of this script, each with its FAMILY),
#: measured in this order; a new family is one more line here
FAMILY_MODULES = (
    "steps",
    "width",
    "data",
    "features",
    "checkpoints",
    "transformers",
    "store",
)
FAMILIES: tuple[Family, ...] = tuple(importlib.import_module(name).FAMILY for name in FAMILY_MODULES)
#: figure -> (comparison, bound), of every family
TARGETS: dict[str, tuple[str, float]] = {k: t for f in FAMILIES for k, t in f.targets.items()}
#: figure -> the figure its bound is a multiple of (the bound: TARGETS' number x that figure)
RELATIVE: dict[str, str] = {k: v for f in FAMILIES for k, v in f.relative.items()}
#: figures reported beside the others, with no target
REPORTED = tuple(k for f in FAMILIES for k in f.figures if k not in TARGETS)


def measure(s: Settings, families: tuple[Family, ...] = FAMILIES) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    if s.device.type == "cpu":
        keep_freed_memory()  # as a CPU training stage does, for every figure alike
    with tempfile.TemporaryDirectory(prefix="kdreg-bench-") as tmp:
        work = Path(tmp)
        for job in (job for family in families for job in family.jobs):
            keys = job.figures
            print(f"measuring {', '.join(keys)} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                out = job.measure(s, work)
            except Exception as exc:  # one broken figure must not hide the others
                out = tuple(Figure(None, f"missing: the measurement failed ({type(exc).__name__}: {exc})")
                            for _ in keys)
            print(f"    ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
            figures.update(zip(keys, out if isinstance(out, tuple) else (out,)))
    return figures


def bound_of(key: str, result: dict[str, Any]) -> float | None:
    """The number ``key``'s value is compared with: TARGETS' bound, times the figure it is judged
    against for a RELATIVE one (None when that figure is missing)."""
    _, bound = TARGETS[key]
    if key not in RELATIVE:
        return bound
    limit = result.get(RELATIVE[key])
    return None if limit is None else bound * limit


def passed(key: str, value: float | None, bound: float | None) -> bool | None:
    if value is None or bound is None:
        return None
    op, _ = TARGETS[key]
    return {"<=": value <= bound, ">=": value >= bound}.get(op, value == bound)


def machine(s: Settings) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(s.device), "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in attrs.asdict(s).items()},
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = os.getloadavg()
    if s.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(s.device)
    else:
        info["host_memory_kept"] = keep_freed_memory()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def report(figures: dict[str, Figure], s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {k: _finite(f.value) for k, f in figures.items()}
    judged = [k for k in TARGETS if k in figures]   # the measured families' targets
    out["targets"] = {k: f"{op} {TARGETS[k][1]:g}" + (f" x {RELATIVE[k]}" if k in RELATIVE else "")
                      for k in judged for op in (TARGETS[k][0],)}
    bounds = {k: bound_of(k, out) for k in judged}
    out["passed"] = {k: passed(k, out.get(k), bounds[k]) for k in judged}
    out["notes"] = {k: f.note for k, f in figures.items() if f.note}
    out["details"] = {k: f.details for k, f in figures.items() if f.details}
    for k, against in RELATIVE.items():   # the judged bound, and the raw figure over its limit
        if out.get(k) is not None and bounds.get(k) is not None:
            out["details"].setdefault(k, {}).update(bound=bounds[k], over_limit=out[k] / out[against])
    out["machine"] = machine(s)
    return out


def _finite(value: float | int | None) -> float | int | None:
    if value is None or isinstance(value, int):
        return value
    return value if math.isfinite(value) else None


def table(result: dict[str, Any]) -> str:
    rows = [("figure", "value", "target", "result")]
    order = [k for t in result["targets"] for k in (t, RELATIVE.get(t)) if k]   # a limit below its figure
    for key in (*order, *(k for k in REPORTED if k not in order and k in result)):
        value = result.get(key)
        shown = ("null" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
        if key in REPORTED:
            rows.append((key, shown, "-", "reported"))
            continue
        ok = result["passed"][key]
        target = result["targets"][key]
        if key in RELATIVE:   # the raw ratio, judged against its limit
            bound = result["details"].get(key, {}).get("bound")
            key = f"{key} (raw)"
            target += "" if bound is None else f" = {bound:.3f}"
        rows.append((key, shown, target, "missing" if ok is None else "pass" if ok else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"{k}: {v}" for k, v in result["notes"].items()]
    return "\n".join(lines)


def breakdown_table(result: dict[str, Any]) -> str:
    """The width cost by kernel class (empty when it was not measured)."""
    rows = result["details"].get("width_cost_ratio", {}).get("breakdown")
    if not rows:
        return ""
    span = 7 * len(next(iter(rows.values()))["ms_per_width"]) - 1
    lines = ["width_cost_ratio by kernel class (CPU ms per width, smallest first; summed / full width):",
             f"  {'class':18s} {'ms per width':>{span}s}  {'time':>5s}  {'MACs':>5s}"]
    for cls, row in rows.items():
        ms = " ".join(f"{t:6.1f}" for t in row["ms_per_width"])
        time_ratio = "-" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}"
        mac = f"{row['mac_ratio']:.2f}" if "mac_ratio" in row else "-"
        lines.append(f"  {cls:18s} {ms:>{span}s}  {time_ratio:>5s}  {mac:>5s}")
    return "\n".join(lines)


def settings_from(args: argparse.Namespace) -> Settings:
    """The run's settings, or :class:`UserError` (a line per bad flag)."""
    problems = []
    if args.data and not Path(args.data).expanduser().exists():
        problems.append(f"--data {args.data}: no such folder or archive")
    if args.steps is not None and args.steps < (1 if args.quick else 20):
        problems.append(f"--steps {args.steps}: every time is a median of at least 20 steps "
                        "(--quick for a smoke test of fewer)")
    for flag in ("batch", "threads", "loader_steps", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            problems.append(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        problems.append(f"--device {args.device}: auto, cpu or cuda[:N]")
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: CUDA is not available here")
    if problems:
        raise UserError(problems)
    layout = None if args.channels_last is None else args.channels_last == "true"
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        return Settings(device=device, batch=args.batch or 16, steps=args.steps or 3, warmup=1,
                        images=2_000, loader_steps=3, data=args.data,
                        channels_last=layout, workers=args.workers, stream_images=64,
                        memory_images=(32, 64), stream_rounds=1, memory_repeats=1, vit_depth=2)
    return Settings(device=device, batch=args.batch or 128, steps=args.steps or 20,
                    loader_steps=args.loader_steps, data=args.data, channels_last=layout,
                    workers=args.workers)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True, help="where the results go (JSON)")
    p.add_argument("--quick", action="store_true", help="few steps on small batches: a smoke test")
    p.add_argument("--family", action="append", choices=FAMILY_MODULES,
                   help="measure only this family's figures (repeatable; default: every family)")
    p.add_argument("--data", help="an image folder or archive instead of synthetic CIFAR-10-sized data")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch", type=int, help="batch size (default 128; --quick 16)")
    p.add_argument("--steps", type=int, help="timed steps per figure (at least 20; --quick 3)")
    p.add_argument("--loader-steps", type=int, default=40, help="steps of the epoch loader_fraction times")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes of the streamed figures")
    p.add_argument("--channels-last", choices=["true", "false"],
                   help="the trainer's train.channels_last (default: the recipe default, true)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        s = settings_from(args)
    except UserError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = args.family or FAMILY_MODULES
    result = report(measure(s, tuple(f for name, f in zip(FAMILY_MODULES, FAMILIES) if name in chosen)), s)
    print(table(result))
    if breakdown := breakdown_table(result):
        print(breakdown)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
