"""The command line: ``kdreg run | sweep | submit | validate | plugins | list | eval | report | capacity | export``.

Exit codes: 0 done; 1 the run failed; 2 the recipe, a plugin or the command line is wrong; 75
(``kdreg run``) checkpointed on a signal: the same command resumes it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kdreg.errors import EXIT_RESUME, Checkpointed, KdregError, UserError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: the signals that checkpoint a run by default (``kdreg run --checkpoint-signals``)
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdreg", description="Knowledge distillation for flexible networks, as recipes.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"kdreg {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train a recipe (or --resume a run directory)")
    run.add_argument("recipe", nargs="?", help="the TOML recipe")
    run.add_argument("--out", help="run directory (default: runs/<name>-<time>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key by dotted path, e.g. train.epochs=1 or stages.student.lam=0.5")
    run.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its last checkpoint")
    run.add_argument("--seeds", metavar="S,S,...",
                     help="one run per seed into DIR/seed-<s>/ and a summary.json (sets the recipe's seeds)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar (there is none either when stderr is not a terminal: a line per epoch)")
    run.add_argument("--nproc", type=int, metavar="N",
                     help="train data-parallel on N local processes (starts torchrun; GPUs: one each)")
    run.add_argument("--max-restarts", type=int, default=0, metavar="M",
                     help="with --nproc: when a process dies, restart them all up to M times, each time "
                          "from the last checkpoint (torchrun's --max-restarts)")
    run.add_argument("--checkpoint-signals", default=",".join(s.removeprefix("SIG") for s in DEFAULT_SIGNALS),
                     metavar="SIG,SIG",
                     help="signals that make the run save a checkpoint at the next step and exit with "
                          f"code {EXIT_RESUME}, to be resumed by the same command (default: %(default)s)")

    val = sub.add_parser("validate", help="check a recipe without training")
    val.add_argument("recipe")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    sub.add_parser("plugins", help="installed plugins and what they register")

    ls = sub.add_parser("list", help="registered backbones, graphs, datasets, bridges, divergences and "
                        "feature losses")
    ls.add_argument("kind", nargs="?", choices=["backbones", "graphs", "datasets", "bridges", "divergences",
                                                "feature_losses"])
    ls.add_argument("--details", nargs="*", metavar="NAME",
                    help="backbones: sub-models, parameters and MACs (of the NAMEs given, else of all)")
    ev = sub.add_parser("eval", help="test accuracy of a run's selected weights (data keys may be overridden)")
    ev.add_argument("directory")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="e.g. data.test_limit=1000 or data.root=/other/copy")
    ev.add_argument("--anytime", action="store_true",
                    help="early exits: accuracy against average MACs per image, thresholds chosen on the "
                         "validation split (a repeat directory: each seed run)")
    ev.add_argument("--stage", help="with --anytime: the stage (default: the last trained one); with --widths or "
                                    "--calibrate: only that stage")
    ev.add_argument("--widths", metavar="W1,W2,...",
                    help="universally slimmable stages (widths trained as a range): evaluate these widths, "
                         "e.g. 0.35,0.6, after recalibrating their BatchNorm statistics")
    ev.add_argument("--calibrate", type=int, metavar="N",
                    help="recalibrate the BatchNorm statistics of the evaluated widths of universally slimmable "
                         "stages on N training images first (default with --widths: train.calibrate_images)")
    ev.add_argument("--out", help="with --anytime: the JSON file (default: DIR/anytime-<stage>.json)")

    rep = sub.add_parser("report", help="a table (report.md) and plots comparing runs, repeats or methods")
    rep.add_argument("directories", nargs="+", metavar="DIR", help="run or repeat directories, one column each")
    rep.add_argument("--out", help="folder of report.md and the PNGs (default: the DIR, when only one is given)")
    rep.add_argument("--stage", help="the stage of every run to compare (default: each run's last)")

    swp = sub.add_parser("sweep", help="train a recipe at every point of a grid of overrides (times --seeds), "
                         "shared earlier stages once, into one directory with sweep.md and sweep.png")
    swp.add_argument("recipe", help="the TOML recipe")
    swp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                     help="an axis of the grid, e.g. stages.student.lam=0.1,0.5,0.9; repeat for more axes")
    swp.add_argument("--seeds", metavar="S,S,...", help="train every point once per seed (default: the recipe's)")
    swp.add_argument("--out", help="the sweep directory (default: runs/<name>-sweep-<time>); the same command "
                                   "resumes it")
    swp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key at every point, as for kdreg run")
    swp.add_argument("--no-progress", action="store_true", help="no progress bar")

    tch = sub.add_parser("teach", help="a teacher store: a stage's frozen teachers run once over K augmented "
                         "views of every training image (docs/store.md)")
    tch.add_argument("recipe", help="the TOML recipe")
    tch.add_argument("--stage", required=True, help="the student stage whose frozen teachers are stored")
    tch.add_argument("--views", type=int, required=True, metavar="K", help="augmented views per image")
    tch.add_argument("--out", required=True, help="the store directory (must not exist)")
    tch.add_argument("--topk", type=int, default=0, metavar="K",
                     help="keep each output's K largest logits (0: full logits; default: %(default)s)")
    tch.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                     help="the stored logits' dtype (default: %(default)s)")
    tch.add_argument("--batch-size", type=int, metavar="B",
                     help="the teachers' batch (default: data.batch_size)")
    tch.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, as for kdreg run")
    tch.add_argument("--no-progress", action="store_true", help="no progress bar")

    cap = sub.add_parser("capacity", help="parameter and MAC ratio of a teacher-student pair")
    cap.add_argument("teacher", help="a registered backbone name")
    cap.add_argument("student", help="a registered backbone name")
    cap.add_argument("--num-classes", type=int, default=10)

    exp = sub.add_parser("export", help="one sub-model of a run as a standalone network (.pt2 or safetensors)")
    exp.add_argument("directory", help="the run directory")
    exp.add_argument("--submodel", metavar="LABEL", help="e.g. x0.5 or exit2 (default: the full model, the last); a "
                     "universally slimmable stage: any width of its range")
    exp.add_argument("--stage", help="the stage (default: the run's last)")
    exp.add_argument("--out", required=True, metavar="FILE", help="model.pt2 (or model.safetensors); model.json goes beside it")
    exp.add_argument("--format", choices=["pt2", "safetensors"],
                     help="pt2: a torch.export program; safetensors: the state dict (default: from FILE's suffix, else pt2)")
    exp.add_argument("--force", action="store_true", help="overwrite FILE and its .json")
    exp.add_argument("--calibrate", type=int, metavar="N",
                     help="a universally slimmable stage (widths trained as a range; --submodel: any width in "
                          "it, e.g. x0.6): recalibrate the width's BatchNorm statistics on N training images "
                          "(default: train.calibrate_images)")
    sbm = sub.add_parser("submit", help="train a recipe as a SLURM job (through submitit) that checkpoints and "
                         "requeues itself before its time limit, and resumes")
    sbm.add_argument("recipe", help="the TOML recipe")
    sbm.add_argument("--out", help="run directory (default: runs/<name>-<time>); every start of the job resumes it")
    sbm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, as for kdreg run")
    sbm.add_argument("--time", help="the job's time limit: minutes, H:M:S or D-H:M:S (SLURM's formats)")
    sbm.add_argument("--nodes", type=int, default=1)
    sbm.add_argument("--gpus-per-node", type=int, default=0, metavar="G", help="one process per GPU (default: 0, CPUs)")
    sbm.add_argument("--tasks-per-node", type=int, metavar="N", help="processes per node on CPUs (default: G, or 1)")
    sbm.add_argument("--cpus-per-task", type=int, metavar="C")
    sbm.add_argument("--partition")
    sbm.add_argument("--account")
    sbm.add_argument("--qos")
    sbm.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                     help="another sbatch option, without its dashes, e.g. constraint=a100")
    sbm.add_argument("--signal-delay", type=int, default=120, metavar="S",
                     help="signal the job S seconds before its time limit to checkpoint (default: 120)")
    sbm.add_argument("--max-requeues", type=int, default=10, metavar="M",
                     help="requeues after reaching the time limit before the job gives up (default: 10)")
    sbm.add_argument("--logs", metavar="DIR", help="submitit's files and the job's logs (default: OUT.submitit)")
    sbm.add_argument("--local", action="store_true",
                     help="run the job on this machine with submitit's local executor (one node), to try it")
    sbm.add_argument("--wait", action="store_true", help="wait for the job to end; its exit code is the job's")
    trust_help = ("read checkpoints that are not weights-only (e.g. written by an earlier kdreg) with Python's "
                  "full unpickler: only for files you trust, it lets them run any code")
    for command in (run, val, ev, exp):
        command.add_argument("--trust-checkpoints", action="store_true", help=trust_help)
    for command in sub.choices.values():   # --debug after the command too: `kdreg run --debug ...`
        # SUPPRESS: when it is not given there, the top-level flag stays as it is
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def _version() -> str:
    from kdreg import __version__

    return __version__


def cmd_run(args: argparse.Namespace) -> int:
    from kdreg.engine import distributed, preempt, repeats

    if args.resume and args.seeds is not None:
        raise UserError("--resume DIR takes no --seeds: the run directory holds its recipe and seeds")
    if args.resume and (args.recipe or args.overrides or args.out):
        raise UserError("--resume DIR takes no recipe, --set or --out: the run directory holds its recipe")
    if not args.resume and not args.recipe:
        raise UserError("kdreg run needs a RECIPE (or --resume DIR)")
    progress = not args.no_progress
    overrides = args.overrides + ([_seeds_override(args.seeds)] if args.seeds is not None else [])
    signals = preempt.parse_signals(args.checkpoint_signals)
    if args.max_restarts and args.nproc is None:
        raise UserError("--max-restarts restarts the processes --nproc starts; give --nproc N too @ --max-restarts")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts takes a number >= 0, got {args.max_restarts} @ --max-restarts")
    if args.nproc is not None:
        return _run_under_torchrun(args, overrides)
    run = repeats.resume(args.resume, progress=progress) if args.resume else repeats.start(
        args.recipe, args.out, overrides, progress=progress)
    try:
        with preempt.handling(signals):
            run.execute()
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: kdreg run --resume {run.directory}", file=sys.stderr)
        return 130
    except Checkpointed as exc:
        distributed.shutdown()
        if distributed.is_main():
            print(f"checkpointed ({exc}) into {run.directory}; run the same command again to resume "
                  f"(exit code {EXIT_RESUME})", file=sys.stderr)
        return EXIT_RESUME
    distributed.shutdown()
    return EXIT_OK


def _run_under_torchrun(args: argparse.Namespace, overrides: list[str]) -> int:
    """``kdreg run --nproc N``: the recipe is checked here first (a bad one exits 2 before any
    process starts) and the run directory named here, then torchrun starts N processes."""
    from pathlib import Path

    from kdreg.engine import preempt
    from kdreg.engine.assemble import static_problems
    from kdreg.engine.launch import launch
    from kdreg.engine.run import (
        RECIPE_FILE,
        batch_split_problem,
        default_directory,
        unfinished_run_of,
    )
    from kdreg.errors import RecipeError
    from kdreg.recipe import load_recipe

    if args.resume:
        if not (Path(args.resume) / RECIPE_FILE).is_file():
            raise UserError(f"{args.resume} is not a kdreg run directory: {Path(args.resume) / RECIPE_FILE} is missing")
        load_recipe(Path(args.resume) / RECIPE_FILE)  # a broken recipe exits 2 here
        forwarded = ["run", "--resume", args.resume]
    else:
        recipe = load_recipe(args.recipe, overrides)
        problems = static_problems(recipe)
        split = batch_split_problem(recipe, args.nproc)
        if split:
            problems.append(split)
        if problems:
            raise RecipeError([f"{args.recipe}: {p}" for p in problems])
        out = Path(args.out) if args.out else default_directory(recipe)
        if out.exists() and any(out.iterdir()) and not unfinished_run_of(out, recipe):
            raise UserError(f"run directory {out} is not empty; it may hold an earlier run: continue it "
                            f"with `kdreg run --resume {out}` or choose another --out")
        # the directory is named here, so that restarted processes find it again and resume
        forwarded = ["run", args.recipe, "--out", str(out), *(f"--set={o}" for o in overrides)]
    forwarded += ["--no-progress"] if args.no_progress else []
    forwarded += ["--debug"] if args.debug else []
    forwarded += ["--trust-checkpoints"] if args.trust_checkpoints else []
    forwarded += [f"--checkpoint-signals={args.checkpoint_signals}"]
    return launch(args.nproc, forwarded, max_restarts=args.max_restarts,
                  signals=preempt.parse_signals(args.checkpoint_signals), directory=args.resume or str(out))


def _seeds_override(text: str) -> str:
    """``--seeds 0,1,2`` as the override ``seeds=[0, 1, 2]`` (its range is the recipe's check)."""
    items = [item.strip() for item in text.split(",")]
    if not all(item.lstrip("-").isdigit() for item in items):
        raise UserError(f"--seeds takes integers separated by commas, e.g. --seeds 0,1,2; got {text!r} @ --seeds")
    return f"seeds=[{', '.join(str(int(item)) for item in items)}]"


def cmd_validate(args: argparse.Namespace) -> int:
    from kdreg.engine.assemble import assemble, static_problems, validation_shape
    from kdreg.errors import RecipeError
    from kdreg.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    problems = static_problems(recipe)
    shape, how = (None, "") if problems else validation_shape(recipe)
    plans = []
    if shape is not None:
        try:
            plans = assemble(recipe, shape, download=False)  # validation never downloads
        except RecipeError as exc:
            problems += exc.problems
    if problems:
        raise RecipeError([f"{args.recipe}: {p}" for p in problems])
    if shape is None:
        print(f"models not built: {how}; names, options and stage references are fine")
    else:
        print(f"models built for {shape.num_classes} classes of {shape.in_chans}x"
              f"{shape.input_size[0]}x{shape.input_size[1]} images ({how})")
    for plan in plans:
        stage, model = plan.config, plan.model
        extra = f", teachers {', '.join(sorted(plan.teachers))}" if plan.teachers else ""
        extra += f", bridge {stage.bridge.name}" if stage.bridge is not None else ""
        if plan.graph.edges:
            extra += f", divergence {stage.divergence.name}"
        print(f"stage {stage.name}: {stage.backbone.name} ({model.num_submodels} sub-models: "
              f"{', '.join(model.submodel_labels)}), graph {stage.graph.name}{extra}, "
              f"{plan.train.epochs} epochs")
    print(f"{args.recipe}: ok")
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from kdreg import plugins
    from kdreg.registry import KINDS, get_registry

    pm = plugins.plugin_manager()
    names: dict[str, dict[str, list[str]]] = {}
    for kind in KINDS:
        for entry in get_registry(kind).entries():
            names.setdefault(entry.plugin, {}).setdefault(kind, []).append(entry.name)
    for name, plugin in sorted(pm.list_name_plugin()):
        dist, version = plugins.distribution_of(pm, name)
        print(f"{name}  ({dist} {version})")
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        for kind, registered in sorted(names.get(name, {}).items()):
            print(f"    {KINDS[kind].removeprefix('kdreg_register_')}: {', '.join(registered)}")
        events = [h for h in hooks if not h.startswith("kdreg_register_")]
        if events:
            print(f"    events: {', '.join(events)}")
    disabled = plugins.disabled_plugins()
    if disabled:
        print(f"disabled by {plugins.DISABLE_ENV}: {', '.join(sorted(disabled))}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from kdreg.registry import KINDS, get_registry

    plural = {kind: hook.removeprefix("kdreg_register_") for kind, hook in KINDS.items()}
    for kind in ["backbone", "graph", "dataset", "bridge", "divergence", "feature_loss"]:
        if args.kind not in (None, plural[kind]):
            continue
        registry = get_registry(kind)
        entries = registry.entries()
        if args.details and kind == "backbone":   # the names asked for (unknown ones: an error)
            entries = [registry.get(name) for name in dict.fromkeys(args.details)]
        print(f"{plural[kind]}:")
        if not entries:
            print("    (none registered)")
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            print(f"    {e.name.ljust(width)}  {e.description}")
            if args.details is not None and kind == "backbone":
                print(_backbone_details(e.name))
    return EXIT_OK


def _backbone_details(name: str) -> str:
    import torch

    from kdreg.api import build_backbone

    try:
        with torch.device("meta"):   # shapes alone: no weights drawn, no arithmetic done
            model = build_backbone(name, num_classes=10)
    except UserError as exc:
        return f"{'':8}(needs options: {exc.problems[0]})"
    params, macs = model.count_params(), model.count_macs()
    lines = [f"{'':8}{label}: {p:,} params, {m / 1e6:.1f} M MACs"
             for label, p, m in zip(model.submodel_labels, params, macs)]
    points = model.split_points()
    if points:   # what feature losses, bridges and exits name
        lines.append(f"{'':8}split points: {', '.join(points)}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from kdreg.engine.run import Run

    if args.anytime:
        return _eval_anytime(args)
    if args.out:
        raise UserError("--out belongs to `kdreg eval DIR --anytime`")
    if args.stage and args.widths is None and args.calibrate is None:
        raise UserError("--stage belongs to `kdreg eval DIR --anytime`, --widths or --calibrate")
    widths = _width_list(args.widths) if args.widths is not None else None
    run = Run.resume(args.directory, progress=False, overrides=args.overrides)
    for stage in run.evaluate(widths=widths, calibrate=args.calibrate, stage=args.stage):
        accs = ", ".join(f"{label} {a:.2f}" for label, a in zip(stage["submodels"], stage["test_accuracy"]))
        calibrated = (f", BatchNorm calibrated on {stage['calibration_images']} training images"
                      if "calibration_images" in stage else "")
        print(f"stage {stage['name']} ({stage['test_images']} test images): {accs} "
              f"(mean {stage['mean_test_accuracy']:.2f}){calibrated}")
    return EXIT_OK


def _width_list(text: str) -> list[float]:
    """``0.35,0.6`` (or ``x0.35,x0.6``) as widths; :class:`UserError` for anything else."""
    try:
        widths = [float(part.strip().removeprefix("x")) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--widths takes widths separated by commas, e.g. 0.35,0.6; got {text!r}") from None
    return widths


def _eval_anytime(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kdreg import anytime
    from kdreg.rundirs import anytime_file, is_repeat, seed_dirs

    directory = Path(args.directory)
    runs = seed_dirs(directory) if is_repeat(directory) else [directory]
    if args.out and len(runs) > 1:
        raise UserError(f"--out names one file, but {directory} is a repeat of {len(runs)} seed runs "
                        "(each gets its own DIR/seed-<s>/anytime-<stage>.json)")
    for run in runs:
        curve = anytime.evaluate_run(run, args.stage, args.overrides)
        path = Path(args.out) if args.out else anytime_file(run, curve["stage"])
        anytime.write_json(curve, path)
        print(anytime.summary(curve))
        print(f"wrote {path}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kdreg.report import write_report

    directories = [Path(d) for d in args.directories]
    if args.out is None and len(directories) > 1:
        raise UserError("several run directories need --out DIR (where report.md and the plots go)")
    for path in write_report(directories, Path(args.out) if args.out else directories[0], args.stage):
        print(f"wrote {path}")
    return EXIT_OK


def cmd_capacity(args: argparse.Namespace) -> int:
    from kdreg.api import build_backbone, capacity_ratio

    teacher = build_backbone(args.teacher, num_classes=args.num_classes)
    student = build_backbone(args.student, num_classes=args.num_classes)
    for role, name, model in (("teacher", args.teacher, teacher), ("student", args.student, student)):
        print(f"{role} {name}: {model.count_params()[-1]:,} params, {model.count_macs()[-1] / 1e6:.1f} M MACs")
    ratio = capacity_ratio(teacher, student)
    print(f"capacity ratio (teacher / student): {ratio['params']:.2f}x params, {ratio['macs']:.2f}x MACs")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from kdreg.export import export_submodel

    info = export_submodel(args.directory, args.out, label=args.submodel, stage=args.stage,
                           fmt=args.format, force=args.force, calibrate=args.calibrate)
    acc = info["test_accuracy"]
    print(f"wrote {args.out} and its .json: {info['label']} of stage {info['stage']}, "
          f"{info['params']:,} params, {info['macs'] / 1e6:.2f} M MACs"
          + (f", test accuracy {acc:.2f} %" if acc is not None else ""))
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from kdreg.slurm import submit_command

    return submit_command(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    from kdreg.engine import preempt
    from kdreg.sweep import SWEEP_JSON, SWEEP_MD, SWEEP_PNG, Sweep, table

    overrides = args.overrides + ([_seeds_override(args.seeds)] if args.seeds is not None else [])
    sweep = Sweep.plan(args.recipe, args.grid, overrides, out=args.out, progress=not args.no_progress)
    try:
        with preempt.handling(preempt.parse_signals(",".join(s.removeprefix("SIG") for s in DEFAULT_SIGNALS))):
            summary = sweep.execute()
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with the same command (kdreg sweep ... --out {sweep.directory})",
              file=sys.stderr)
        return 130
    except Checkpointed as exc:
        print(f"checkpointed ({exc}) into {sweep.directory}; run the same command again to resume "
              f"(exit code {EXIT_RESUME})", file=sys.stderr)
        return EXIT_RESUME
    print(table(summary))
    for name in (SWEEP_MD, SWEEP_PNG, SWEEP_JSON):
        print(f"wrote {sweep.directory / name}")
    return EXIT_OK


def cmd_teach(args: argparse.Namespace) -> int:
    from kdreg.recipe import load_recipe
    from kdreg.store.format import open_store
    from kdreg.store.teach import teach

    recipe = load_recipe(args.recipe, args.overrides)
    out = teach(recipe, args.stage, args.views, args.out, topk=args.topk, dtype=args.dtype,
                batch_size=args.batch_size, progress=not args.no_progress)
    store = open_store(out, "--out")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out}: {store.images} images x {store.views} views of {', '.join(store.outputs_held())} "
          f"({'top-' + str(store.topk) if store.topk else 'full'} {args.dtype}), {size / 2**20:.1f} MiB")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "teach": cmd_teach, "validate": cmd_validate, "plugins": cmd_plugins, "list": cmd_list,
            "capacity": cmd_capacity, "report": cmd_report, "eval": cmd_eval, "export": cmd_export,
            "submit": cmd_submit, "sweep": cmd_sweep}


def main(argv: Sequence[str] | None = None) -> int:
    from kdreg.engine.checkpoint import trust_checkpoints

    args = _parser().parse_args(argv)
    trust_checkpoints(getattr(args, "trust_checkpoints", False))
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KdregError as exc:
        if args.debug:
            raise
        print(f"failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - no traceback without --debug
        if args.debug:
            raise
        if _peer_stopped(exc):
            from kdreg.engine import distributed

            print(f"failed: process {distributed.rank()} of {distributed.world_size()} stopped because "
                  "another process of the run stopped first (its own message says why)", file=sys.stderr)
            return EXIT_FAILED
        print(f"failed: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED


#: What gloo and NCCL say when the process at the other end of a collective is gone.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")


def _peer_stopped(exc: Exception) -> bool:
    """Under torchrun: ``exc`` is this process losing a peer that stopped first (on bad input, say),
    not a failure of its own, so the peer's message is the one that explains the run's end."""
    from kdreg.engine import distributed

    if distributed.world_size() < 2:
        return False
    import torch.distributed as dist

    return isinstance(exc, getattr(dist, "DistNetworkError", ())) or (
        isinstance(exc, RuntimeError) and any(text in str(exc) for text in PEER_GONE))


if __name__ == "__main__":
    sys.exit(main())
