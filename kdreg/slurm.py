"""``kdreg submit``: a recipe as a SLURM job through submitit, checkpointed and requeued before
its time limit (the ``slurm`` extra: ``pip install 'kdreg[slurm]'``).

The job has one task per GPU (``nodes x tasks_per_node`` tasks, started by ``srun``). Each task
is a :class:`KdregJob`: it sets the ``torch.distributed`` variables from the job's environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and runs
``python -m kdreg run RECIPE --out DIR ...`` as its child. The warning signal the scheduler
sends before the time limit (submitit's, ``USR2`` unless ``SUBMITIT_PREEMPT_SIGNAL`` says
otherwise) is forwarded to the child, which is started with ``--checkpoint-signals TERM,<that signal>``:
the processes finish their step, save a step checkpoint together and exit with
:data:`~kdreg.errors.EXIT_RESUME` (75). Task 0 then has submitit requeue the job (its
checkpoint-and-requeue handler, called outside any signal handler); the requeued job issues the
same ``kdreg run`` command, which resumes the run from that checkpoint.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdreg.errors import EXIT_RESUME, UserError

if TYPE_CHECKING:
    from submitit import Job
    from submitit.core.utils import DelayedSubmission

#: Where ``MASTER_PORT`` is drawn from (per job and attempt) when the environment sets none.
PORTS = (20000, 60000)
INSTALL = "kdreg submit needs submitit: pip install 'kdreg[slurm]'"
_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<rest>\d+(?::\d+){0,2})$")


@dataclass(frozen=True)
class Resources:
    """What the job asks the scheduler for; :func:`resources` checks a command line's values."""

    time_s: int
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_delay_s: int = 120
    max_requeues: int = 10
    sbatch: dict[str, str] = field(default_factory=dict)

    @property
    def tasks(self) -> int:
        """Processes in the job: one per GPU (or ``tasks_per_node`` per node on CPUs)."""
        return self.nodes * self.tasks_per_node


def parse_time(text: str) -> int:
    """SLURM's time limit formats in seconds: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``,
    ``D-H:M:S``; :class:`ValueError` for anything else."""
    match = _TIME.match(text.strip())
    if match is None:
        raise ValueError(text)
    parts = [int(p) for p in match["rest"].split(":")]
    if match["days"] is not None:
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return ((int(match["days"]) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 3:
        return (parts[0] * 60 + parts[1]) * 60 + parts[2]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)


def resources(*, time: str | None, nodes: int = 1, gpus_per_node: int = 0, tasks_per_node: int | None = None,
              cpus_per_task: int | None = None, partition: str | None = None, account: str | None = None,
              qos: str | None = None, signal_delay: int = 120, max_requeues: int = 10,
              sbatch: Sequence[str] = (), local: bool = False) -> Resources:
    """The job's :class:`Resources` from ``kdreg submit``'s options; a :class:`UserError` with a
    line per wrong option (``what @ --option``)."""
    problems = []
    time_s = 0
    if time is None:
        problems.append("kdreg submit needs the job's time limit, e.g. --time 4:00:00 (H:M:S) or --time 90 "
                        "(minutes) @ --time")
    else:
        try:
            time_s = parse_time(time)
        except ValueError:
            problems.append(f"--time takes SLURM's formats M, M:S, H:M:S, D-H, D-H:M or D-H:M:S; got {time!r} @ --time")
        else:
            if time_s <= 0:
                problems.append(f"--time must be positive, got {time!r} @ --time")
            elif signal_delay >= time_s:
                problems.append(f"--signal-delay {signal_delay} s must be shorter than --time {time} ({time_s} s): "
                                "the job is signalled that long before its limit @ --signal-delay")
    if nodes < 1:
        problems.append(f"--nodes takes a number >= 1, got {nodes} @ --nodes")
    elif local and nodes > 1:
        problems.append(f"--local runs on this machine, one node; got --nodes {nodes} @ --nodes")
    if gpus_per_node < 0:
        problems.append(f"--gpus-per-node takes a number >= 0, got {gpus_per_node} @ --gpus-per-node")
    if tasks_per_node is not None and tasks_per_node < 1:
        problems.append(f"--tasks-per-node takes a number >= 1, got {tasks_per_node} @ --tasks-per-node")
    elif tasks_per_node is not None and gpus_per_node > 0 and tasks_per_node != gpus_per_node:
        problems.append(f"the job runs one process per GPU: --tasks-per-node {tasks_per_node} differs from "
                        f"--gpus-per-node {gpus_per_node} (leave it out with GPUs) @ --tasks-per-node")
    if cpus_per_task is not None and cpus_per_task < 1:
        problems.append(f"--cpus-per-task takes a number >= 1, got {cpus_per_task} @ --cpus-per-task")
    if signal_delay < 0:
        problems.append(f"--signal-delay takes seconds >= 0, got {signal_delay} @ --signal-delay")
    if max_requeues < 0:
        problems.append(f"--max-requeues takes a number >= 0, got {max_requeues} @ --max-requeues")
    flags = {}
    for item in sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or key.strip().startswith("-"):
            problems.append(f"--sbatch takes KEY=VALUE (an sbatch option without its dashes, e.g. "
                            f"constraint=a100); got {item!r} @ --sbatch")
        else:
            flags[key.strip()] = value
    if problems:
        raise UserError(problems)
    return Resources(time_s=time_s, nodes=nodes, gpus_per_node=gpus_per_node,
                     tasks_per_node=tasks_per_node or max(gpus_per_node, 1), cpus_per_task=cpus_per_task,
                     partition=partition, account=account, qos=qos, signal_delay_s=signal_delay,
                     max_requeues=max_requeues, sbatch=flags)


def slurm_parameters(res: Resources, name: str) -> dict[str, Any]:
    """The parameters of submitit's ``SlurmExecutor`` (its names for sbatch options): one task
    per GPU, the time limit in whole minutes, requeueable, signalled ``signal_delay_s`` before it."""
    params: dict[str, Any] = {"job_name": name, "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
                              "time": math.ceil(res.time_s / 60), "signal_delay_s": res.signal_delay_s,
                              "additional_parameters": {"requeue": True, **res.sbatch}}
    optional = {"gpus_per_node": res.gpus_per_node or None, "cpus_per_task": res.cpus_per_task,
                "partition": res.partition, "account": res.account, "qos": res.qos}
    params.update({key: value for key, value in optional.items() if value is not None})
    return params


def local_parameters(res: Resources) -> dict[str, Any]:
    """The parameters of submitit's ``LocalExecutor``: the same tasks and signal on this machine."""
    return {"timeout_min": res.time_s / 60, "tasks_per_node": res.tasks_per_node,
            "gpus_per_node": res.gpus_per_node, "signal_delay_s": res.signal_delay_s}


def run_command(recipe: Path, out: Path, overrides: Sequence[str], signal_name: str,
                extra: Sequence[str] = ()) -> list[str]:
    """The ``kdreg run`` every task issues, at every start of the job: it starts the run, or
    resumes it from its last checkpoint."""
    return [sys.executable, "-m", "kdreg", "run", str(recipe), "--out", str(out),
            *(f"--set={o}" for o in overrides), f"--checkpoint-signals=TERM,{signal_name}", "--no-progress", *extra]


def distributed_env(env: Any, attempt: int) -> dict[str, str]:
    """The ``torch.distributed`` (env://) and kdreg variables of a task, from submitit's
    ``JobEnvironment`` (SLURM's ``SLURM_PROCID``, ``SLURM_LOCALID``, node list and so on)."""
    port = os.environ.get("MASTER_PORT") or str(random.Random(f"{env.job_id}-{attempt}").randint(*PORTS))
    return {"RANK": str(env.global_rank), "LOCAL_RANK": str(env.local_rank), "WORLD_SIZE": str(env.num_tasks),
            "LOCAL_WORLD_SIZE": str(env.num_tasks // env.num_nodes),
            "MASTER_ADDR": env.hostnames[0] if env.num_nodes > 1 else "127.0.0.1", "MASTER_PORT": port}


@dataclass(frozen=True)
class KdregJob:
    """One task of the job (submitit pickles it and calls it in each task): ``kdreg run`` as a
    child process, the scheduler's warning signal forwarded to it, the job requeued when it
    exits with :data:`EXIT_RESUME`. submitit calls :meth:`checkpoint` to requeue it."""

    command: tuple[str, ...]
    signal_name: str = "USR2"
    attempt: int = 0

    def __call__(self) -> dict[str, Any]:
        import submitit

        env = submitit.JobEnvironment()
        child_env = dict(os.environ)
        if env.num_tasks > 1:
            child_env.update(distributed_env(env, self.attempt))
        warning = signal.Signals[f"SIG{self.signal_name}"]
        requeue = signal.getsignal(warning)  # submitit's checkpoint-and-requeue handler
        received: list[int] = []
        signal.signal(warning, lambda signum, frame: received.append(signum))
        print(f"kdreg submit: attempt {self.attempt + 1}, task {env.global_rank} of {env.num_tasks}: "
              f"{' '.join(self.command)}", flush=True)
        child = None
        try:
            child = subprocess.Popen(self.command, env=child_env, preexec_fn=_die_with_parent)
            forwarded = 0
            while (code := child.poll()) is None:
                # forwarded once kdreg handles it: while it starts, the signal would end it unsaved
                if len(received) > forwarded and _catches(child.pid, warning):
                    os.kill(child.pid, warning)
                    forwarded = len(received)
                time.sleep(0.1)
        finally:
            signal.signal(warning, requeue)
            if child is not None and child.poll() is None:   # this task is stopped (cancelled): so is its run
                child.kill()
                child.wait()
        if code == 0:
            return {"status": "done", "attempts": self.attempt + 1, "task": env.global_rank}
        if code == EXIT_RESUME or (received and code == -warning):
            # -warning: signalled before kdreg set up its handlers; the run resumes from its last checkpoint
            print(f"kdreg submit: task {env.global_rank} stopped to resume (exit code {code}); task 0 requeues "
                  "the job", flush=True)
            if env.global_rank == 0 and callable(requeue):
                requeue(warning, None)   # submitit: checkpoint(), requeue and exit (or give up, raising)
            return {"status": "checkpointed", "attempts": self.attempt + 1, "task": env.global_rank}
        raise RuntimeError(f"kdreg run exited with code {code} in task {env.global_rank} (its own lines in "
                           "this task's log say why)")

    def checkpoint(self) -> DelayedSubmission:
        """The job to requeue: the same command (it resumes the run), the next attempt."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(replace(self, attempt=self.attempt + 1))


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (Linux's ``SigCgt``; True where unknown)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return True


def _die_with_parent() -> None:
    """In the child, on Linux: a SIGKILL when the task dies, so that no run outlives its job."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG


def submit(recipe: Path, out: Path, overrides: Sequence[str], res: Resources, *, folder: Path,
           local: bool = False, name: str = "kdreg", extra: Sequence[str] = ()) -> Job[Any]:
    """Submit ``kdreg run RECIPE --out OUT`` as a job (on SLURM, or with ``local`` through
    submitit's local executor on this machine) whose submitit files and logs go to ``folder``."""
    try:
        import cloudpickle
        import submitit
        from submitit.core.job_environment import JobEnvironment
    except ImportError:
        raise UserError(INSTALL) from None
    signal_name = JobEnvironment.USR_SIG
    executor: submitit.LocalExecutor | submitit.SlurmExecutor
    if local:
        executor = submitit.LocalExecutor(folder, max_num_timeout=res.max_requeues)
        executor.update_parameters(**local_parameters(res))
    else:
        if shutil.which("srun") is None:
            raise UserError("no SLURM here (srun is not on the PATH); submit from a login node of the cluster, or "
                            "try the job on this machine with --local @ --local")
        executor = submitit.SlurmExecutor(folder, max_num_timeout=res.max_requeues)
        executor.update_parameters(**slurm_parameters(res, name))
    command = run_command(recipe.resolve(), out.resolve(), overrides, signal_name, extra)
    # KdregJob is pickled by value: a task then needs only submitit, not kdreg's imports (torch),
    # and starts in a fraction of a second; its child, kdreg run, imports them.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        return executor.submit(KdregJob(tuple(command), signal_name))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def submit_command(args: Any) -> int:
    """``kdreg submit``: check the options and the recipe (bad input exits 2 before anything is
    submitted), submit the job and say where its run and logs go; with ``--wait``, its outcome."""
    from kdreg.engine.assemble import static_problems
    from kdreg.engine.run import default_directory, unfinished_run_of
    from kdreg.errors import RecipeError
    from kdreg.recipe import load_recipe

    res = resources(time=args.time, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                    tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, partition=args.partition,
                    account=args.account, qos=args.qos, signal_delay=args.signal_delay,
                    max_requeues=args.max_requeues, sbatch=args.sbatch, local=args.local)
    recipe = load_recipe(args.recipe, args.overrides)
    problems = [f"{args.recipe}: {p}" for p in static_problems(recipe)]
    if recipe.data.batch_size % res.tasks:
        problems.append(f"{args.recipe}: batch_size {recipe.data.batch_size} does not split over the job's "
                        f"{res.tasks} processes (--nodes x processes per node) @ recipe.data.batch_size")
    if problems:
        raise RecipeError(problems)
    out = Path(args.out) if args.out else default_directory(recipe)
    if out.is_dir() and any(out.iterdir()) and not unfinished_run_of(out, recipe):  # a finished run: refused
        raise UserError(f"run directory {out} is not empty and holds no run of {args.recipe}; choose another --out "
                        "@ --out")
    folder = Path(args.logs) if args.logs else out.with_name(out.name + ".submitit")
    ignored = [f"--{k}" for k in ("partition", "account", "qos") if getattr(args, k)] + (["--sbatch"] * bool(args.sbatch))
    if args.local and ignored:
        print(f"--local: {', '.join(ignored)} are SLURM's, not used on this machine", file=sys.stderr)
    job = submit(Path(args.recipe), out, args.overrides, res, folder=folder.resolve(), local=args.local,
                 name=f"kdreg-{recipe.name}", extra=["--debug"] if args.debug else [])
    where = "this machine" if args.local else "SLURM"
    print(f"submitted job {job.job_id} to {where}: {res.nodes} node(s) x {res.tasks_per_node} process(es), "
          f"run directory {out.resolve()}, logs in {folder.resolve()}")
    if not args.wait:
        return 0
    try:
        outcome = job.results()[0]
    except Exception as exc:  # noqa: BLE001 - submitit's job failure, with the task's traceback
        print(f"failed: job {job.job_id}: {exc}", file=sys.stderr)
        return 1
    print(f"job {job.job_id}: {outcome['status']} after {outcome['attempts']} attempt(s): {out.resolve()}")
    return 0
