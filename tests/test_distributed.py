"""Data-parallel training under real torchrun processes (the gloo backend on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kdreg.cli import main
from kdreg.engine.launch import torchrun_command

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "ddp_driver.py"
sys.path.insert(0, str(DRIVER.parent))
from conftest import SMOKE  # noqa: E402
from ddp_driver import step_gradients  # noqa: E402


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"    # a process that aborts prints its Python stack
    return env


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=240)


def _torchrun_step(*args: str) -> subprocess.CompletedProcess[str]:
    """``_torchrun`` of a run that writes nothing but its output file, started once more if a
    process died of SIGABRT (once in CI a worker of this run aborted without a Python error; a few
    hundred starts here never did). A failure of kdreg's own comes back on the second start and
    fails the test; the first start's abort is reported as a warning, with its output."""
    proc = _torchrun(*args)
    if proc.returncode != 0 and "SIGABRT" in proc.stderr:
        warnings.warn(f"a torchrun worker aborted; started again. Its output:\n{_why(proc)}", stacklevel=2)
        proc = _torchrun(*args)
    return proc


WHY = ("[rank", "Error", "error", "terminate", "what()", "Fatal Python", "File \"", "Signal", "signal")


def _why(proc: subprocess.CompletedProcess[str]) -> str:
    """The processes' own error lines, C++ aborts and Python stacks among them (torchrun's
    summary alone says little); the end of stderr when none is there."""
    lines = proc.stderr.splitlines()
    picked = [line for line in lines if any(mark in line for mark in WHY)]
    return "\n".join((picked or lines)[-60:])


def _kdreg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kdreg", *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=240)


STC = """
[[stages]]
name = "teacher"
backbone = "wrn16_2"
[[stages]]
name = "stc"
backbone = "resnet8"
graph = { name = "kd", teacher = "teacher" }
bridge = { name = "stc", teacher = "teacher", student_split = "layer2", teacher_split = "layer2", alpha = 0.5 }
"""


FITNET = """
[[stages]]
name = "teacher"
backbone = "resnet14"
[[stages]]
name = "fitnet"
backbone = "resnet8"
graph = { name = "kd", teacher = "teacher" }
feature_losses = [{ name = "fitnet", student_points = ["layer2"], teacher_points = ["layer3"] },
                  { name = "at", points = ["layer1", "layer2"] }]
"""


CRD = FITNET.replace('[{ name = "fitnet", student_points = ["layer2"], teacher_points = ["layer3"] },\n'
                     '                  { name = "at", points = ["layer1", "layer2"] }]',
                     '[{ name = "crd", points = ["layer3"], negatives = 16 }]')


def _step_recipe(folder: Path, backbone: str) -> Path:
    """The one-epoch smoke recipe of ``backbone``: a slimmable or early-exit network under
    IPKD-TA-M, or a ResNet-8 student of a frozen teacher stage (``stc``, ``fitnet``, ``crd``)."""
    path = folder / f"{backbone}.toml"
    graph = "ipkd-ta-m" if backbone.startswith("tiny") else "none"
    text = SMOKE.format(epochs=1, backbone=backbone if backbone.startswith("tiny") else "resnet8", graph=graph)
    if not backbone.startswith("tiny"):
        text = text[:text.index("[[stages]]")] + {"stc": STC, "fitnet": FITNET, "crd": CRD}[backbone]
    path.write_text(text)
    return path


#: the two-process steps the tests below compare: (driver mode, recipe)
STEPS = [("grads", b) for b in ("tiny_slimmable", "tiny_exits", "stc", "fitnet", "crd")] + [
    ("grads-train", b) for b in ("tiny_slimmable", "stc")]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Every step of :data:`STEPS` taken by the same two torchrun processes (one start, not one
    per test): ``(mode, backbone) -> (recipe, output file)``."""
    folder = tmp_path_factory.mktemp("ddp-steps")
    made = {(mode, b): (_step_recipe(folder, b), folder / f"{mode}-{b}.pt") for mode, b in STEPS}
    jobs = folder / "jobs.json"
    jobs.write_text(json.dumps([[mode, str(r), str(out)] for (mode, _), (r, out) in made.items()]))
    proc = _torchrun_step(str(DRIVER), "jobs", str(jobs))
    assert proc.returncode == 0, _why(proc)
    return made


@pytest.mark.processes
@pytest.mark.parametrize("backbone", ["tiny_slimmable", "tiny_exits", "stc", "fitnet"])
def test_two_processes_give_the_gradients_of_the_combined_batch(two_processes, backbone: str) -> None:  # type: ignore[no-untyped-def]
    """Each process takes half of the global batch; after the step's all-reduce every gradient
    (every width's BatchNorm parameters included; an STC bridge's adapter and a FitNet
    regressor too) is the one-process gradient of the whole batch, and each gradient bucket was
    all-reduced once per step, not once per width."""
    recipe, out = two_processes["grads", backbone]   # stc, fitnet: through a frozen teacher
    two = torch.load(out, weights_only=False)
    one, reduced = step_gradients(str(recipe))
    assert two["world"] == 2 and reduced == {}
    assert set(two["grads"]) == set(one)
    bn = [n for n in one if ".bn." in n or "bn" in n.split(".")[-2]]
    if backbone == "tiny_slimmable":
        assert len(bn) >= 8  # per-width BatchNorm parameters are among the compared gradients
    if backbone == "stc":
        assert any(n.startswith("1.adapter.") for n in one)   # the bridge's own parameters
    if backbone == "fitnet":
        assert any(n.startswith("1.regressors.0.0.") for n in one)   # the regressor's own
    for name, g in one.items():   # float32 sums of two halves: a rounding error of the tensor's scale
        scale = max(1e-7, 2e-6 * g.abs().max().item())
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-5, atol=scale, msg=name)
    assert two["reduced"] and set(two["reduced"].values()) == {1}, two["reduced"]


@pytest.mark.processes
def test_crds_memory_banks_take_every_process_batch(two_processes) -> None:  # type: ignore[no-untyped-def]
    """Under torchrun each process's CRD memory banks are updated with the whole global batch:
    the same in both processes, and the same rows as one process stepping on that batch."""
    from ddp_driver import STEPPED, step

    recipe, out = two_processes["grads", "crd"]
    ranks = [torch.load(f"{out}.buffers{r}", weights_only=False) for r in range(2)]
    step(str(recipe))        # one process, the whole first batch (the same global batch)
    one = {name: b.detach() for name, b in STEPPED[-1].named_buffers()}
    memory = [name for name in one if "memory" in name]
    assert len(memory) == 2
    for name in memory:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], one[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.processes
@pytest.mark.parametrize("backbone", ["tiny_slimmable", "stc"])
def test_two_processes_in_train_mode_give_the_mean_of_each_shards_gradients(
        two_processes, backbone: str) -> None:  # type: ignore[no-untyped-def]
    """BatchNorm in train mode normalises each process's shard by that shard's own statistics
    (no SyncBatchNorm on the CPU), so two processes do not compute the gradient of the combined
    batch. What they do compute, and what this asserts: after the all-reduce every gradient
    (every width's private BatchNorm; an STC student's BatchNorms and its adapter's) is the mean
    of the two one-process gradients, each taken in train mode on one process's shard alone.
    The one-process gradient of the combined batch differs from it (BatchNorm's statistics
    depend on the batch), so the comparison would catch a combined-batch normalisation too."""
    recipe, out = two_processes["grads-train", backbone]
    two = torch.load(out, weights_only=False)
    shards = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]
    assert two["world"] == 2 and [len(y) for _, y in shards] == [16, 16]   # batch_size 32 in halves
    assert not torch.equal(shards[0][0], shards[1][0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # as the workers (OMP_NUM_THREADS=1): the same CPU kernels
    try:
        halves = [step_gradients(str(recipe), train_mode=True, batch=shard)[0] for shard in shards]
        combined, _ = step_gradients(str(recipe), train_mode=True, batch=(
            torch.cat([shards[0][0], shards[1][0]]), torch.cat([shards[0][1], shards[1][1]])))
    finally:
        torch.set_num_threads(threads)
    assert set(two["grads"]) == set(halves[0]) == set(halves[1]) == set(combined)
    bn = [n for n in combined if ".bn" in n or "bn" in n.split(".")[-2] or n.startswith("1.adapter.1.")]
    if backbone == "tiny_slimmable":
        assert len(bn) >= 8        # per-width BatchNorm parameters are among the compared gradients
    else:
        assert {"1.adapter.0.weight", "1.adapter.1.weight", "1.adapter.1.bias"} <= set(combined)
    for name in combined:
        mean = (halves[0][name] + halves[1][name]) / 2
        torch.testing.assert_close(two["grads"][name], mean, rtol=1e-5, atol=1e-7, msg=name)
    # BatchNorm in train mode matters here: the combined batch's gradients are not these
    differs = [n for n in combined
               if not torch.allclose(combined[n], two["grads"][n], rtol=1e-3, atol=1e-5)]
    assert len(differs) > len(combined) // 2, differs
    assert two["reduced"] and set(two["reduced"].values()) == {1}, two["reduced"]


@pytest.mark.processes
def test_a_two_process_run_writes_one_set_of_files_and_evaluates_its_shards(
        smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recipe = smoke_recipe(epochs=2)
    text = recipe.read_text().replace("log_interval = 2", 'log_interval = 2\nloggers = ["jsonl", "csv"]')
    recipe.write_text(text.replace("lr = 0.05", "lr = 0.003"))  # not 100 %: shards' accuracies differ
    full = tmp_path / "full"
    proc = _kdreg("run", str(recipe), "--out", str(full), "--nproc", "2")
    assert proc.returncode == 0, _why(proc)
    assert sorted(p.name for p in full.iterdir()) == ["checkpoints", "metrics-student.csv", "metrics.jsonl",
                                                      "recipe.toml", "results.json"]
    lines = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]          # one line per epoch: rank 0 alone writes
    assert len((full / "metrics-student.csv").read_text().splitlines()) == 3   # header + 2 epochs
    results = json.loads((full / "results.json").read_text())
    assert results["finished"] and len(results["stages"]) == 1
    assert proc.stdout.count("stage student") <= 2        # the console speaks once, not per process
    # each process evaluated its shard; the summed counts are the whole test split's accuracy
    single = _kdreg("eval", str(full))
    assert single.returncode == 0, single.stderr
    accs = ", ".join(f"{label} {a:.2f}" for label, a in zip(results["stages"][0]["submodels"],
                                                            results["stages"][0]["test_accuracy"]))
    assert accs in single.stdout, (accs, single.stdout)
    assert not all(a == 100.0 for a in results["stages"][0]["test_accuracy"])


def test_nproc_checks_the_recipe_before_starting_processes(smoke_recipe, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    recipe = smoke_recipe(epochs=1)
    assert main(["run", str(recipe), "--out", str(tmp_path / "x"), "--nproc", "2",
                 "--set", "stages.student.lam=7"]) == 2
    assert "lam" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_batch_size_is_global_and_must_split(smoke_recipe, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Checked before torchrun starts any process (and by each process, against its world)."""
    recipe = smoke_recipe(epochs=1, extra="")
    recipe.write_text(recipe.read_text().replace("batch_size = 32", "batch_size = 33"))
    assert main(["run", str(recipe), "--out", str(tmp_path / "x"), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert "batch_size 33 does not split over 2 processes" in err and "@ recipe.data.batch_size" in err
    assert not (tmp_path / "x").exists()
    from kdreg.engine.run import check_processes  # each process, under the world torchrun made
    from kdreg.errors import UserError
    from kdreg.recipe import load_recipe

    os.environ["WORLD_SIZE"] = "4"
    try:
        with pytest.raises(UserError, match="batch_size 33 does not split over 4 processes"):
            check_processes(load_recipe(recipe))
    finally:
        del os.environ["WORLD_SIZE"]


def test_torchrun_command() -> None:
    assert torchrun_command(4, ["run", "r.toml"])[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "kdreg", "run", "r.toml"]
