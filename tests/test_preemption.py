"""Runs that survive a cluster: mid-epoch checkpoints, signals, auto-resume, torchrun restarts and
a full disk. Real signals to real processes (``kdreg run``, one process and ``--nproc 2``), each
interrupted run finished by the same command and compared with an uninterrupted one bit for bit."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import kdreg
from kdreg import plugins
from kdreg.cli import main
from kdreg.data.batches import BatchLoader
from kdreg.data.streaming import ShardSampler
from kdreg.engine import preempt
from kdreg.engine.run import Run
from kdreg.errors import EXIT_RESUME, Checkpointed, RecipeError, UserError
from kdreg.hookspecs import hookimpl
from kdreg.recipe import checkpoint_interval, parse_recipe

ROOT = Path(__file__).resolve().parent.parent

RECIPE = """
name = "preempt"
seed = 0
[data]
dataset = "synthetic"
batch_size = 16
val_split = 32
options = {{ train_size = 400, test_size = 32, num_classes = 4, image_size = 16 }}
{data}
[train]
epochs = 2
optimizer = {{ lr = 0.05 }}
schedule = {{ name = "cosine" }}
log_interval = 5
checkpoint_every = 4
[[stages]]
name = "student"
backbone = "tiny_slimmable"
graph = "ipkd-ta-m"
lam = 0.8
tau = 2.0
"""
#: the streamed path: loader worker processes, timm's transforms, mixup drawn per batch, and a
#: model with dropout (it draws from the global random stream)
STREAMED = 'in_memory = false\nimage_size = 16\nworkers = 1\naugment = { name = "imagenet", mixup = 0.2 }'
DROPOUT = ('backbone = { name = "timm", model = "test_resnet", model_options = { drop_rate = 0.5 } }\n'
           'graph = "none"')
TIMES = ("seconds", "images_per_second")
#: training steps in an epoch of the recipe: (400 images - 32 held out) / 16
STEPS = 23


def recipe(tmp_path: Path, streamed: bool, name: str = "recipe.toml") -> Path:
    """The in-memory recipe trains a slimmable network with IPKD-TA-M; the streamed one a network
    with dropout, under mixup."""
    path = tmp_path / name
    text = RECIPE.format(data=STREAMED if streamed else "")
    if streamed:
        text = text.replace('backbone = "tiny_slimmable"\ngraph = "ipkd-ta-m"', DROPOUT)
    path.write_text(text)
    return path


_uninterrupted: dict[tuple[bool, int], Path] = {}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):  # type: ignore[no-untyped-def]
    """The uninterrupted run of the recipe (``streamed``) on ``nproc`` processes, made once."""

    def get(streamed: bool, nproc: int = 1) -> Path:
        key = (streamed, nproc)
        if key not in _uninterrupted:
            folder = tmp_path_factory.mktemp(f"full-{'streamed' if streamed else 'memory'}-{nproc}")
            more = ("--nproc", str(nproc)) if nproc > 1 else ()
            done = kdreg_run(recipe(folder, streamed), folder / "full", *more)
            assert done.returncode == 0, done.stderr[-3000:]
            _uninterrupted[key] = folder / "full"
        return _uninterrupted[key]

    return get


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out["OMP_NUM_THREADS"] = "1"
    return out


def command(path: Path, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "kdreg", "run", str(path), "--out", str(out), "--no-progress", *more]


def kdreg_run(path: Path, out: Path, *more: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(path, out, *more), capture_output=True, text=True, env=env(), cwd=ROOT,
                          timeout=400, **kw)


def last(out: Path, stage: str = "student") -> dict[str, Any]:
    return torch.load(out / "checkpoints" / stage / "last.pt", weights_only=True)


def wait_for(path: Path, proc: subprocess.Popen[str], seconds: float = 300) -> None:
    end = time.monotonic() + seconds
    while not path.is_file():
        assert proc.poll() is None, f"the run ended before writing {path}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < end, f"no {path} after {seconds} s"
        time.sleep(0.01)   # the signal must land well before the epoch's last step


def stop_mid_epoch(cmd: list[str], out: Path, sig: signal.Signals,
                   target: Any = None) -> subprocess.CompletedProcess[str]:
    """Start ``cmd``, send ``sig`` (to ``target(proc)``'s pid, default the process itself) once its
    first mid-epoch checkpoint exists, and wait for it to end."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    try:
        wait_for(out / "checkpoints" / "student" / "last.pt", proc)
        os.kill(target(proc) if target else proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def records(out: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, stages: tuple[str, ...] = ("student",)) -> None:
    """The same weights, optimizer state, metrics and results, bit for bit (times aside)."""
    for stage in stages:
        for name in ("best.pt", "last.pt"):
            x = torch.load(a / "checkpoints" / stage / name, weights_only=True)
            y = torch.load(b / "checkpoints" / stage / name, weights_only=True)
            assert x["model"].keys() == y["model"].keys()
            for key in x["model"]:
                assert torch.equal(x["model"][key], y["model"][key]), (stage, name, key)
        opt_a, opt_b = last(a, stage)["optimizer"]["state"], last(b, stage)["optimizer"]["state"]
        assert opt_a.keys() == opt_b.keys()
        assert all(torch.equal(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"]) for k in opt_a)
    assert records(a) == records(b)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert [(s["test_accuracy"], s["val_accuracy"], s["best_epoch"]) for s in ra["stages"]] == [
        (s["test_accuracy"], s["val_accuracy"], s["best_epoch"]) for s in rb["stages"]]
    assert ra["finished"] and rb["finished"]


# ----------------------------------------------------------------------------- one process
def stopped_by(sig: signal.Signals, path: Path, cut: Path) -> None:
    """Run ``path`` into ``cut``, stopped by ``sig`` mid-epoch: its checkpoint is inside the first
    epoch and nothing else of the run is written yet."""
    stopped = stop_mid_epoch(command(path, cut), cut, sig)
    assert stopped.returncode == EXIT_RESUME, stopped.stderr[-2000:]
    assert f"on {sig.name}" in stopped.stderr and "run the same command again" in stopped.stderr
    state = last(cut)["state"]
    assert state["epoch"] == 0 and 0 < state["step"] < STEPS, state    # inside the first epoch
    assert not (cut / "metrics.jsonl").exists() and not (cut / "results.json").exists()


@pytest.mark.processes
def test_a_signal_mid_epoch_then_the_same_command_equals_an_uninterrupted_run(
        tmp_path: Path, uninterrupted) -> None:  # type: ignore[no-untyped-def]
    """Streamed (loader workers, mixup, dropout), stopped by SIGUSR1; the in-memory path stopped
    by SIGTERM is the next test's."""
    path, cut = recipe(tmp_path, True), tmp_path / "cut"
    stopped_by(signal.SIGUSR1, path, cut)
    again = kdreg_run(path, cut)                      # the same command: it resumes
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_run(uninterrupted(True), cut)


@pytest.mark.processes
def test_a_full_disk_keeps_the_previous_checkpoint_and_stops_with_one_line(
        tmp_path: Path, uninterrupted) -> None:  # type: ignore[no-untyped-def]
    """In memory, stopped by SIGTERM; the same command on a full disk fails to save and loses
    nothing; the same command again resumes to the uninterrupted run."""
    path = recipe(tmp_path, False)
    full, cut = uninterrupted(False), tmp_path / "cut"
    stopped_by(signal.SIGTERM, path, cut)
    checkpoint = cut / "checkpoints" / "student" / "last.pt"
    before = checkpoint.read_bytes()
    limit = len(before) // 2     # a real limit on the size of any file the process writes

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past it fails (EFBIG), it does not kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full_disk = kdreg_run(path, cut, preexec_fn=small_files)
    assert full_disk.returncode == 1, full_disk.stderr[-2000:]
    lines = [line for line in full_disk.stderr.splitlines() if line.startswith("failed:")]
    assert len(lines) == 1 and "cannot write the checkpoint" in lines[0] and "File too large" in lines[0]
    assert "the previous last.pt is intact" in lines[0] and "Traceback" not in full_disk.stderr
    assert checkpoint.read_bytes() == before and not checkpoint.with_suffix(".pt.tmp").exists()
    again = kdreg_run(path, cut)                      # nothing was lost
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_run(full, cut)


def test_a_second_sigterm_ends_at_once_and_sigint_cannot_request_a_checkpoint(tmp_path: Path) -> None:
    script = (
        "import os, signal, time\n"
        "from kdreg.engine import preempt\n"
        "with preempt.handling(preempt.parse_signals('TERM,USR1')):\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    print('requested', preempt.requested(), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "    print('still running', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), timeout=120)
    assert proc.stdout.splitlines() == ["requested SIGUSR1"]     # the second signal ended it
    assert proc.returncode == -signal.SIGTERM
    with pytest.raises(UserError) as bad:
        preempt.parse_signals("INT,KILL,BOGUS")
    assert bad.value.problems == [
        "SIGINT cannot request a checkpoint (it ends the run at once) @ --checkpoint-signals",
        "SIGKILL cannot request a checkpoint (it cannot be caught) @ --checkpoint-signals",
        "'BOGUS' is no signal of this system (e.g. TERM, USR1, USR2, HUP) @ --checkpoint-signals"]
    assert preempt.parse_signals("term, SIGUSR2,TERM") == (signal.SIGTERM, signal.SIGUSR2)


# ----------------------------------------------------------------------------- in one process: events
class SignalAt:
    """Sends this process ``sig`` during the first evaluation of a stage (its model's forward in
    eval mode) or when stage ``after_stage`` has finished."""

    def __init__(self, during_eval: bool = False, after_stage: str | None = None):
        self.during_eval, self.after_stage, self.fired = during_eval, after_stage, False

    def fire(self) -> None:
        if not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGUSR1)

    @hookimpl
    def kdreg_register_backbones(self, register):  # type: ignore[no-untyped-def]
        def signalling_exits(*, num_classes: int = 10) -> kdreg.FlexibleBackbone:
            model = kdreg.build_backbone("tiny_exits", num_classes=num_classes)
            forward = model.forward

            def forward_then_signal(x):  # type: ignore[no-untyped-def]
                if self.during_eval and not model.training:
                    self.fire()
                return forward(x)

            model.forward = forward_then_signal  # type: ignore[method-assign]
            return model

        register("signalling_exits", signalling_exits)

    @hookimpl
    def kdreg_stage_finished(self, run, stage, result):  # type: ignore[no-untyped-def]
        if stage == self.after_stage:
            self.fire()


TWO_STAGES = """
name = "events"
seed = 0
[data]
dataset = "synthetic"
batch_size = 32
val_split = 64
options = { train_size = 256, test_size = 64, num_classes = 4, image_size = 16 }
[train]
epochs = 3
optimizer = { lr = 0.05 }
log_interval = 2
[[stages]]
name = "teacher"
backbone = "signalling_exits"
graph = "ipkd"
[[stages]]
name = "student"
backbone = "tiny_slimmable"
graph = { name = "kd", teacher = "teacher" }
epochs = 1
"""


def _in_process(tmp_path: Path, plugin: SignalAt, name: str) -> Run:
    path = tmp_path / "events.toml"
    path.write_text(TWO_STAGES)
    plugins.reset(plugins.make_plugin_manager(extra=[plugin]))
    return Run.start(path, tmp_path / name, progress=False)


@pytest.mark.parametrize("where", ["during-evaluation", "between-stages"])
def test_a_signal_outside_the_steps_stops_at_the_next_checkpoint(tmp_path: Path, where: str,
                                                                  one_thread) -> None:  # type: ignore[no-untyped-def]
    plugin = SignalAt(during_eval=where == "during-evaluation", after_stage="teacher")
    try:
        full = _in_process(tmp_path, SignalAt(), "full")
        full.execute()
        cut = _in_process(tmp_path, plugin, "cut")
        with preempt.handling([signal.SIGUSR1]), pytest.raises(Checkpointed) as stop:
            cut.execute()
        # the first evaluation is the teacher's first epoch's: it stops after that epoch's checkpoint
        expected = ("stage teacher: after epoch 1 of 3" if where == "during-evaluation"
                    else "before stage student")
        assert str(stop.value) == f"{expected}, on SIGUSR1"
        state = last(tmp_path / "cut", "teacher")["state"]
        assert (state["epoch"], state["step"]) == ((1, 0) if where == "during-evaluation" else (3, 0))
        assert not (tmp_path / "cut" / "checkpoints" / "student").exists()
        plugins.reset(plugins.make_plugin_manager(extra=[SignalAt()]))
        Run.resume(tmp_path / "cut", progress=False).execute()
    finally:
        plugins.reset()
    assert_same_run(tmp_path / "full", tmp_path / "cut", stages=("teacher", "student"))


# ----------------------------------------------------------------------------- auto-resume refusals
def test_the_same_command_refuses_another_recipes_run_and_a_finished_one(tmp_path: Path, capsys,
                                                                         one_thread) -> None:  # type: ignore[no-untyped-def]
    path = recipe(tmp_path, False)
    path.write_text(path.read_text().replace("epochs = 2", "epochs = 1").replace("train_size = 400",
                                                                                 "train_size = 96"))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: run directory {out} holds a finished run of this recipe ({out / 'results.json'}); "
                   "choose another --out to train it again"]
    assert main(["run", str(path), "--out", str(out), "--set", "stages.student.lam=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: run directory {out} holds a run of another recipe (stages.student.lam: 0.8 there, "
                   f"0.5 here); choose another --out, or continue that run with `kdreg run --resume {out}`"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot   # nothing touched
    assert main(["run", str(path), "--max-restarts", "1"]) == 2
    assert "give --nproc N too @ --max-restarts" in capsys.readouterr().err
    assert main(["run", str(path), "--checkpoint-signals", "STOP"]) == 2
    assert "@ --checkpoint-signals" in capsys.readouterr().err


def test_checkpoint_every_takes_steps_or_minutes() -> None:
    base = '[[stages]]\nname = "a"\nbackbone = "resnet20"\n[train]\ncheckpoint_every = {}\n'
    assert checkpoint_interval(parse_recipe(base.format("50")).train.checkpoint_every) == (50, 0.0)
    assert checkpoint_interval(parse_recipe(base.format('"2.5min"')).train.checkpoint_every) == (0, 150.0)
    assert checkpoint_interval(parse_recipe(base.format("0")).train.checkpoint_every) == (0, 0.0)
    for bad in ("-1", '"soon"', "true", '"0min"'):
        with pytest.raises(RecipeError) as err:
            parse_recipe(base.format(bad))
        assert err.value.problems[0].endswith("@ recipe.train.checkpoint_every"), err.value.problems


def test_the_checkpoint_clock_saves_on_steps_time_and_signals() -> None:
    clock = preempt.CheckpointClock(steps=4)
    assert [clock.after_step(done, 10) for done in (3, 4, 8, 10)] == [
        (False, False), (True, False), (True, False), (False, False)]   # the epoch's end saves anyway
    timed = preempt.CheckpointClock(seconds=0.05)
    assert timed.after_step(1, 10) == (False, False)
    time.sleep(0.06)
    assert timed.after_step(2, 10) == (True, False)
    timed.saved()
    assert timed.after_step(3, 10) == (False, False)
    with preempt.handling([signal.SIGUSR1]):
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.CheckpointClock().after_step(5, 10) == (True, True)
        assert preempt.CheckpointClock().after_step(10, 10) == (False, False)  # after the epoch's own
        assert preempt.stop_agreed()
    assert preempt.requested() is None and not preempt.stop_agreed()


# ----------------------------------------------------------------------------- the loaders' position
def test_a_loader_started_after_k_batches_yields_the_rest_of_the_same_epoch() -> None:
    images = torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(70) % 4
    for world in (1, 2):
        for rank in range(world):
            loader = BatchLoader(images, labels, batch_size=8, device="cpu", train=True, seed=3,
                                 rank=rank, world_size=world)
            loader.set_epoch(2)
            whole = list(loader)
            loader.set_epoch(2, skip=3)
            rest = list(loader)
            assert len(rest) == len(whole) - 3
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[3:], rest))
            assert len(list(loader)) == len(whole)      # the skip is for one iteration only
    sampler = ShardSampler(50, train=True, seed=1, rank=1, world_size=2)
    sampler.set_epoch(4)
    items = list(sampler)
    sampler.set_epoch(4, skip=10)
    assert list(sampler) == items[10:] and len(sampler) == len(items) - 10
    with pytest.raises(ValueError):
        loader.set_epoch(0, skip=len(loader) + 1)


# ----------------------------------------------------------------------------- two processes
def workers_of(launcher: subprocess.Popen[str]) -> list[int]:
    """The kdreg processes torchrun started under ``launcher`` (its children), in pid order."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher.pid:
            found.append(int(stat.parent.name))
    return sorted(found)


@pytest.mark.processes
def test_two_processes_stopped_by_sigterm_resume_to_the_uninterrupted_run(
        tmp_path: Path, uninterrupted) -> None:  # type: ignore[no-untyped-def]
    path = recipe(tmp_path, True)
    full, cut = uninterrupted(True, 2), tmp_path / "cut"
    stopped = stop_mid_epoch(command(path, cut, "--nproc", "2"), cut, signal.SIGTERM)
    assert stopped.returncode == EXIT_RESUME, stopped.stderr[-3000:]
    assert "stopped by SIGTERM: the processes saved their checkpoint" in stopped.stderr
    saved = last(cut)
    assert 0 < saved["state"]["step"] < STEPS and len(saved["ranks"]) == 2
    assert all(r["partial"] is not None and r["buffers"] for r in saved["ranks"])
    again = subprocess.run([sys.executable, "-m", "kdreg", "run", "--resume", str(cut), "--nproc", "2",
                            "--no-progress"], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]     # --resume, the run directory alone
    assert_same_run(full, cut)


@pytest.mark.processes
def test_a_killed_process_restarts_from_the_last_checkpoint_until_restarts_run_out(
        tmp_path: Path, uninterrupted) -> None:  # type: ignore[no-untyped-def]
    path = recipe(tmp_path, True)
    full, cut = uninterrupted(True, 2), tmp_path / "cut"
    cmd = command(path, cut, "--nproc", "2", "--max-restarts", "1")
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    checkpoint = cut / "checkpoints" / "student" / "last.pt"
    try:
        wait_for(checkpoint, launcher)
        first = workers_of(launcher)
        assert len(first) == 2
        saved_at = checkpoint.stat().st_mtime_ns
        os.kill(first[1], signal.SIGKILL)            # torchrun restarts both: they resume
        end = time.monotonic() + 300
        while not (len(workers_of(launcher)) == 2 and set(workers_of(launcher)).isdisjoint(first)
                   and checkpoint.stat().st_mtime_ns > saved_at):   # the restarted ones saved
            assert launcher.poll() is None and time.monotonic() < end, launcher.communicate()[1][-3000:]
            time.sleep(0.05)
        os.kill(workers_of(launcher)[0], signal.SIGKILL)   # no restart left
        _, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "was killed by SIGKILL" in line]
    assert len(lines) == 1 and lines[0].startswith("failed: process ") and "after 1 restart(s)" in lines[0]
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr
    again = kdreg_run(path, cut, "--nproc", "2", "--max-restarts", "1")    # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(full, cut)


def test_the_launcher_names_a_killed_process_not_those_torchrun_stopped_after_it() -> None:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from kdreg.engine.launch import killed_processes

    def failure(code: int) -> ProcessFailure:
        return ProcessFailure(local_rank=0, pid=4242, exitcode=code, error_file="")

    # a process stopped on bad input (it said why); torchrun stopped the other with SIGTERM
    assert killed_processes({0: failure(-signal.SIGTERM), 1: failure(2)}) == []
    # a process killed (out of memory, say): named, whether its peer noticed first or not
    assert [r for r, _ in killed_processes({0: failure(1), 1: failure(-signal.SIGKILL)})] == [1]
    assert [r for r, _ in killed_processes({0: failure(-signal.SIGTERM), 1: failure(-signal.SIGKILL)})] == [1]
    assert [r for r, _ in killed_processes({0: failure(-signal.SIGTERM), 1: failure(-signal.SIGTERM)})] == [0]
