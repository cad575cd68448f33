"""``kdreg submit`` (kdreg/slurm.py): its options, the sbatch script submitit writes from them, and
real jobs through submitit's local executor: a time limit that signals, a step checkpoint, a
requeue and a resume to the result of an uninterrupted run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from kdreg import slurm
from kdreg.cli import main

needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                    reason="kdreg submit needs submitit (pip install 'kdreg[slurm]')")


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 5400), ("0:40", 40), ("1:30:00", 5400), ("2-0", 172800), ("1-2:30", 95400), ("1-00:00:05", 86405)])
def test_time_formats(text: str, seconds: int) -> None:
    assert slurm.parse_time(text) == seconds


def test_bad_options_one_line_each(smoke_recipe, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["submit", str(smoke_recipe()), "--time", "1:xx", "--nodes", "0", "--gpus-per-node", "4",
                 "--tasks-per-node", "2", "--max-requeues", "-1", "--sbatch", "constraint"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert [line.rsplit("@ ", 1)[-1] for line in err] == [
        "--time", "--nodes", "--tasks-per-node", "--max-requeues", "--sbatch"]
    assert all(line.startswith("error: ") for line in err)
    assert main(["submit", str(smoke_recipe()), "--local"]) == 2
    assert "needs the job's time limit" in capsys.readouterr().err
    assert main(["submit", str(smoke_recipe()), "--local", "--nodes", "2", "--time", "10"]) == 2
    assert "--local runs on this machine, one node" in capsys.readouterr().err
    assert main(["submit", str(smoke_recipe()), "--time", "1", "--signal-delay", "60"]) == 2
    assert "must be shorter than --time" in capsys.readouterr().err


def test_recipe_checked_before_submission(smoke_recipe, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # batch_size 32 over 3 processes, and a wrong key: refused before anything is submitted
    code = main(["submit", str(smoke_recipe()), "--local", "--tasks-per-node", "3", "--time", "10",
                 "--set", "train.epochz=1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "epochz" in err
    assert main(["submit", str(smoke_recipe()), "--local", "--tasks-per-node", "3", "--time", "10",
                 "--out", str(tmp_path / "run")]) == 2
    assert "does not split over the job's 3 processes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.submitit").exists()


@needs_submitit
@pytest.mark.skipif(shutil.which("srun") is not None, reason="SLURM is installed here")
def test_no_slurm_here(smoke_recipe, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["submit", str(smoke_recipe()), "--time", "10", "--out", str(tmp_path / "run")]) == 2
    assert "no SLURM here (srun is not on the PATH)" in capsys.readouterr().err


@needs_submitit
def test_sbatch_script(tmp_path: Path) -> None:
    """The parameters kdreg gives submitit's SlurmExecutor, as submitit writes them in the script."""
    from submitit.slurm.slurm import _make_sbatch_string

    res = slurm.resources(time="4:00:30", nodes=2, gpus_per_node=4, cpus_per_task=8, partition="gpu",
                          account="proj", signal_delay=180, sbatch=["constraint=a100"])
    script = _make_sbatch_string(command="python -m submitit.core._submit x", folder=tmp_path,
                                 **slurm.slurm_parameters(res, "kdreg-smoke"))
    flags = {line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")}
    assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--partition=gpu",
            "--account=proj", "--time=241", "--signal=USR2@180", "--requeue", "--constraint=a100",
            "--job-name=kdreg-smoke"} <= flags
    assert any(line.startswith("srun --unbuffered") for line in script.splitlines())


@needs_submitit
def test_torch_distributed_variables_from_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """Task 3 of a 2 x 4 job, as submitit's SLURM job environment reads SLURM's variables."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    for name, value in {"SLURM_JOB_ID": "811", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0",
                        "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    env = slurm.distributed_env(SlurmJobEnvironment(), attempt=0)
    assert {k: v for k, v in env.items() if k != "MASTER_PORT"} == {
        "RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07"}
    port = int(env["MASTER_PORT"])
    assert slurm.PORTS[0] <= port <= slurm.PORTS[1]
    assert slurm.distributed_env(SlurmJobEnvironment(), attempt=0)["MASTER_PORT"] == str(port)  # every task
    monkeypatch.setenv("MASTER_PORT", "29400")
    assert slurm.distributed_env(SlurmJobEnvironment(), attempt=1)["MASTER_PORT"] == "29400"


def test_one_process_per_gpu() -> None:
    res = slurm.resources(time="60", nodes=3, gpus_per_node=8)
    assert (res.tasks_per_node, res.tasks) == (8, 24)
    assert slurm.resources(time="60", tasks_per_node=2, local=True).tasks == 2


RECIPE = """
name = "submitted"
seed = 0
[data]
dataset = "synthetic"
batch_size = 32
val_split = 64
options = { train_size = 1088, test_size = 64, num_classes = 4, image_size = 16 }
[train]
epochs = 4
optimizer = { lr = 0.05 }
schedule = { name = "cosine" }
log_interval = 8
[[stages]]
name = "teacher"
backbone = "tiny_exits"
graph = "ipkd"
[[stages]]
name = "student"
backbone = "tiny_slimmable"
graph = { name = "kd", teacher = "teacher" }
lam = 0.8
tau = 2.0
"""


def kdreg(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kdreg", *args], env=env, capture_output=True, text=True,
                          timeout=280)


def weights(run: Path) -> dict[str, Any]:
    return {f"{p.parent.name}/{p.name}": torch.load(p, map_location="cpu", weights_only=True)
            for p in sorted((run / "checkpoints").glob("*/*.pt"))}


def without_seconds(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in stage.items() if k != "seconds"} for stage in results["stages"]]


def timings(run: Path, started: float) -> tuple[float, float]:
    """A finished run's start-up (to its run directory) and training, in seconds."""
    created = (run / "recipe.toml").stat().st_mtime
    return created - started, (run / "results.json").stat().st_mtime - created


@dataclass
class Job:
    done: subprocess.CompletedProcess[str]
    log: str           # task 0's stdout and stderr, every attempt
    attempts: int
    stops: list[str]   # kdreg run's line for each checkpointed stop


def submit_local(recipe: Path, out: Path, signal_at: int, env: dict[str, str]) -> Job:
    """``kdreg submit --local --wait``, the warning signal ``signal_at`` s after the job starts."""
    limit = signal_at + 30   # 30 s for the step checkpoint
    done = kdreg("submit", str(recipe), "--out", str(out), "--local", "--wait",
                 "--time", f"{limit // 60}:{limit % 60:02d}", "--signal-delay", "30", env=env)
    log = "".join(p.read_text() for p in sorted(out.with_name(out.name + ".submitit").glob("*_0_log.*")))
    assert done.returncode == 0, f"{done.stdout}{done.stderr}{log}"
    attempts = int(re.search(r"done after (\d+) attempt", done.stdout)[1])  # type: ignore[index]
    stops = [line for line in log.splitlines() if line.startswith("checkpointed") and "(exit code 75)" in line]
    return Job(done, log, attempts, stops)


@pytest.mark.processes
@needs_submitit
def test_a_time_limit_checkpoints_requeues_and_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """submitit's local executor signals the job before its time limit; the job checkpoints a
    step, requeues itself and resumes: the weights and results of a run that was not stopped."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    started = time.time()
    done = kdreg("run", str(recipe), "--out", str(ref), "--no-progress", env=env)
    assert done.returncode == 0, done.stderr
    # the signal should land when the job has trained ~40 % of the run, at this machine's speed;
    # where a busy machine made it miss the training, once or twice more, at the job's speed
    startup, training = timings(ref, started)
    tries = []
    for k in range(3):
        signal_at = math.ceil(startup + 0.4 * training) + 1
        job = submit_local(recipe, tmp_path / f"run{k}", signal_at, env)
        tries.append(f"signal at {signal_at} s (start-up {startup:.1f} s, training {training:.1f} s): "
                     f"{job.stops[0] if job.stops else 'not stopped'}")
        if job.stops and "stage " in job.stops[0] and "before stage" not in job.stops[0]:
            break
        if job.stops:   # signalled before training began: later
            startup += 0.3 * training
        else:           # not signalled: the job's own start-up and training
            stamp = re.search(r"\((\S+ \S+)\) - Starting with", job.log)[1]  # type: ignore[index]
            startup, training = timings(tmp_path / f"run{k}", datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp())
    else:
        pytest.fail("the signal never landed in training: " + "; ".join(tries))
    assert job.attempts >= 2 and len(job.stops) == job.attempts - 1, job.log
    assert "SIGUSR2" in job.stops[0] and "stopped to resume (exit code 75)" in job.log
    run = tmp_path / f"run{k}"
    results = [json.loads((r / "results.json").read_text()) for r in (ref, run)]
    assert without_seconds(results[0]) == without_seconds(results[1])
    ref_weights, run_weights = weights(ref), weights(run)
    assert ref_weights.keys() == run_weights.keys() and len(ref_weights) == 4
    for name, checkpoint in ref_weights.items():
        for key, tensor in checkpoint["model"].items():
            assert torch.equal(tensor, run_weights[name]["model"][key]), f"{name}: {key}"
    # the finished run is not submitted again
    assert main(["submit", str(recipe), "--out", str(run), "--local", "--time", "10"]) == 2
