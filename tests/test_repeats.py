"""Repeats over seeds: independent random streams per (seed, stage, epoch), the repeat directory
and its summary, and resuming only the seeds that did not finish."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from kdreg import plugins
from kdreg.cli import main
from kdreg.data import BatchLoader, load_data
from kdreg.engine.assemble import DataShape, assemble
from kdreg.engine.run import Run
from kdreg.hookspecs import hookimpl
from kdreg.recipe import load_recipe
from kdreg.streams import batch_seed, init_seed, stream_seed, train_seed

TWO_STAGES = """
[[stages]]
name = "second"
backbone = { name = "tiny_slimmable" }
"""


def _loader(seed: int) -> BatchLoader:
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return BatchLoader(images, torch.arange(64), batch_size=16, mean=[0.5] * 3, std=[0.25] * 3, device="cpu",
                       train=True, seed=seed)


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _stages(path: Path, seed: int, tmp_path: Path) -> list[tuple[dict[str, torch.Tensor], BatchLoader]]:
    """Every stage's initial weights and training batch loader, built as a run with ``seed`` builds them."""
    run = Run.start(path, tmp_path / f"unused-{seed}", overrides=[f"seed={seed}"], progress=False)
    splits = load_data(run.recipe.data)
    plans = assemble(run.recipe, DataShape.of(splits), seed=seed)
    return [({k: v.clone() for k, v in plan.model.state_dict().items()}, run._trainer(plan, splits).train_loader)
            for plan in plans]


def _equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- streams
def test_no_stream_of_one_seed_is_a_stream_of_another(smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # the loader itself: seed 0's epoch 1 is not seed 1's epoch 0 (as it was with seed + epoch)
    assert not _same(_loader(0).draws(1), _loader(1).draws(0))
    assert not _same(_loader(0).draws(0), _loader(0).draws(1))
    # a run's stages: (seed 0, stage 1) is not (seed 1, stage 0), in weights or in batches
    path = smoke_recipe(epochs=1, graph="none", extra=TWO_STAGES)
    s0, s1 = _stages(path, 0, tmp_path), _stages(path, 1, tmp_path)
    assert not _equal_weights(s0[1][0], s1[0][0])
    assert not _equal_weights(s0[0][0], s0[1][0])
    assert not _same(s0[1][1].draws(0), s1[0][1].draws(0))
    assert not _same(s0[0][1].draws(1), s1[0][1].draws(0))
    assert not _same(s0[0][1].draws(0), s0[1][1].draws(0))  # stages of one seed: their own batches
    # every stream of a grid of seeds, stages and epochs is its own
    keys = [(kind, s, i) for kind in ("init", "train") for s in range(6) for i in range(6)]
    seeds = [(init_seed if kind == "init" else train_seed)(s, i) for kind, s, i in keys]
    seeds += [stream_seed(batch_seed(s, i), e) for s in range(6) for i in range(6) for e in range(12)]
    assert len(set(seeds)) == len(seeds) == 72 + 432


def test_the_same_seed_stage_and_epoch_give_the_same_draws(smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert _same(_loader(3).draws(5), _loader(3).draws(5))
    assert stream_seed(7, "init", 2) == stream_seed(7, "init", 2) == init_seed(7, 2)
    assert 0 <= stream_seed(2**40, "x", 10**30) < 2**63
    path = smoke_recipe(epochs=1, graph="none", extra=TWO_STAGES)
    a, b = _stages(path, 4, tmp_path), _stages(path, 4, tmp_path / "again")
    for (wa, la), (wb, lb) in zip(a, b):
        assert _equal_weights(wa, wb)
        assert _same(la.draws(2), lb.draws(2))
    with pytest.raises(TypeError, match="ints or strings"):
        stream_seed(0, 1.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- a repeat
def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _check_summary(out: Path, seeds: list[int]) -> dict[str, Any]:
    """The summary equals mean and sample std recomputed from the seed runs' results.json."""
    summary = _json(out / "summary.json")
    runs = [_json(out / f"seed-{s}" / "results.json") for s in seeds]
    assert summary["recipe"] == "smoke" and summary["seeds"] == seeds and summary["finished"] is True
    assert isinstance(summary["kdreg_version"], str)
    assert [s["name"] for s in summary["stages"]] == [s["name"] for s in runs[0]["stages"]]
    for k, stage in enumerate(summary["stages"]):
        got = [r["stages"][k] for r in runs]
        assert stage["runs"] == len(seeds)
        for key in ("submodels", "params", "macs"):
            assert stage[key] == got[0][key]
        for key in ("test_accuracy", "val_accuracy"):
            columns = list(zip(*(g[key] for g in got)))
            assert stage[f"{key}_mean"] == pytest.approx([statistics.fmean(c) for c in columns])
            assert stage[f"{key}_std"] == pytest.approx([float(torch.tensor(c).std()) for c in columns])
        means = [g["mean_test_accuracy"] for g in got]
        assert stage["mean_test_accuracy_mean"] == pytest.approx(statistics.fmean(means))
        assert stage["mean_test_accuracy_std"] == pytest.approx(float(torch.tensor(means).std()))
    return summary  # type: ignore[no-any-return]


def test_a_repeat_writes_one_run_per_seed_and_the_summary(smoke_recipe, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    seen = StopSeed(None)
    argv = ["run", str(smoke_recipe(epochs=1, extra=TWO_STAGES)), "--seeds", "0,1", "--out", str(out), "--no-progress"]
    assert _run_with(seen, argv) == 0
    assert seen.rng[0, "second"] != seen.rng[1, "student"]   # (seed 0, stage 1) is not (seed 1, stage 0)
    assert len(set(seen.rng.values())) == 4
    assert sorted(p.name for p in out.iterdir()) == ["recipe.toml", "seed-0", "seed-1", "summary.json"]
    top = load_recipe(out / "recipe.toml")
    assert top.seeds == (0, 1)
    for s in (0, 1):
        run = out / f"seed-{s}"
        text = (run / "recipe.toml").read_text()
        assert "seeds" not in text and load_recipe(run / "recipe.toml") == top.__class__(
            **{**{f: getattr(top, f) for f in ("name", "data", "train", "stages")}, "seed": s})
        assert {"metrics.jsonl", "results.json", "checkpoints"} <= {p.name for p in run.iterdir()}
        assert _json(run / "results.json")["seed"] == s and _json(run / "results.json")["finished"] is True
        assert (run / "checkpoints" / "student" / "best.pt").is_file()
    _check_summary(out, [0, 1])
    loss = [_json_lines(out / f"seed-{s}" / "metrics.jsonl")[0]["train_loss"] for s in (0, 1)]
    assert loss[0] != loss[1]  # the seeds' runs differ
    w0, w1 = (torch.load(out / f"seed-{s}" / "checkpoints" / "student" / "best.pt", weights_only=False)["model"]
              for s in (0, 1))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    printed = capsys.readouterr().out
    assert "repeat 'smoke' over seeds 0, 1" in printed and " +- " in printed and "x0.25" in printed
    assert "stage second: 2 run(s), seeds 0, 1" in printed
    # a repeat with one seed: std 0
    one = tmp_path / "one"
    assert main(["run", str(smoke_recipe(epochs=1)), "--seeds", "3", "--out", str(one), "--no-progress"]) == 0
    stage = _json(one / "summary.json")["stages"][0]
    assert stage["runs"] == 1 and stage["mean_test_accuracy_std"] == 0.0 and set(stage["test_accuracy_std"]) == {0.0}


def _json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class StopSeed:
    """Stops the run of ``seed`` after its first epoch, as Ctrl-C would; records every epoch."""

    def __init__(self, seed: int | None) -> None:
        self.seed, self.epochs = seed, []  # type: ignore[var-annotated]
        self.rng: dict[tuple[int, str], int] = {}   # the global RNGs' seed while each stage trained

    @hookimpl
    def kdreg_epoch_finished(self, run, stage, record):  # type: ignore[no-untyped-def]
        self.epochs.append((run.recipe.seed, record["epoch"]))
        self.rng[run.recipe.seed, stage] = torch.initial_seed()
        if run.recipe.seed == self.seed and record["epoch"] == 1:
            raise KeyboardInterrupt


def _run_with(plugin: StopSeed, argv: list[str]) -> int:
    plugins.reset(plugins.make_plugin_manager(extra=[plugin]))
    try:
        return main(argv)
    finally:
        plugins.reset()


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_trains_only_the_unfinished_seeds(smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "rep"
    path = str(smoke_recipe(epochs=2))
    stop = StopSeed(1)
    assert _run_with(stop, ["run", path, "--seeds", "0,1", "--out", str(out), "--no-progress"]) == 130
    assert stop.epochs == [(0, 1), (0, 2), (1, 1)]
    partial = _json(out / "summary.json")
    assert partial["finished"] is False and partial["stages"][0]["runs"] == 1
    assert partial["stages"][0]["seeds"] == [0]
    seed0 = _snapshot(out / "seed-0")
    assert main(["run", "--resume", str(out), "--seeds", "0,1"]) == 2          # seeds are the directory's
    again = StopSeed(None)
    assert _run_with(again, ["run", "--resume", str(out), "--no-progress"]) == 0
    assert again.epochs == [(1, 2)]                      # seed 1 continues from its checkpoint; seed 0 rests
    assert _snapshot(out / "seed-0") == seed0            # bytes and modification times
    assert [m["epoch"] for m in _json_lines(out / "seed-1" / "metrics.jsonl")] == [1, 2]
    _check_summary(out, [0, 1])
    # a finished repeat resumed: nothing trained, the same summary
    before = _json(out / "summary.json")
    idle = StopSeed(None)
    assert _run_with(idle, ["run", "--resume", str(out), "--no-progress"]) == 0
    assert idle.epochs == [] and _json(out / "summary.json") == before


def test_one_seed_of_a_repeat_resumes_on_its_own(smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "rep"
    path = str(smoke_recipe(epochs=2))
    assert _run_with(StopSeed(0), ["run", path, "--seeds", "0,1", "--out", str(out), "--no-progress"]) == 130
    assert not (out / "seed-1").exists()
    alone = StopSeed(None)
    assert _run_with(alone, ["run", "--resume", str(out / "seed-0"), "--no-progress"]) == 0
    assert alone.epochs == [(0, 2)] and _json(out / "seed-0" / "results.json")["finished"] is True
    assert _json(out / "summary.json")["finished"] is False     # the repeat has not seen it yet
    rest = StopSeed(None)
    assert _run_with(rest, ["run", "--resume", str(out), "--no-progress"]) == 0
    assert rest.epochs == [(1, 1), (1, 2)]
    _check_summary(out, [0, 1])


# ----------------------------------------------------------------------------- bad input
def test_bad_seeds_are_errors_and_write_nothing(smoke_recipe, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = str(smoke_recipe(epochs=1))
    out = tmp_path / "rep"
    cases = [(["--seeds", "0,0,2"], "seed(s) 0 listed more than once @ recipe.seeds"),
             (["--seeds", "-1"], "seeds must be >= 0, got -1 @ recipe.seeds[0]"),
             (["--seeds", "0,x"], "--seeds takes integers separated by commas, e.g. --seeds 0,1,2; got '0,x' @ --seeds"),
             (["--set", "seeds=[1, true]"], "expected an integer, got a boolean @ recipe.seeds[1]"),
             (["--seeds", "0,1", "--set", "data.dataset=imagefolder", "--set", f"data.root={tmp_path / 'none'}"],
              "error: ")]
    for extra, message in cases:
        assert main(["run", path, "--out", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
        assert not out.exists(), extra  # not even the repeat's recipe.toml
    # a repeat directory is not one run
    assert main(["run", path, "--seeds", "0", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2
    assert "seeds = [0] is a repeat" in capsys.readouterr().err
    with pytest.raises(Exception, match="is a repeat"):
        Run.resume(out)
    # a seed directory holding another run is not silently reused
    (out / "seed-0" / "recipe.toml").write_text((out / "seed-0" / "recipe.toml").read_text()
                                                 .replace("lam = 0.8", "lam = 0.5"))
    (out / "seed-0" / "results.json").unlink()
    assert main(["run", "--resume", str(out)]) == 2
    assert "is not " in capsys.readouterr().err
