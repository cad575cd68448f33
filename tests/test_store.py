"""Teacher stores (kdreg teach, teacher_store): the stored views rebuilt through the live teacher
give the stored outputs; a KD run from a float32 store is the live-teacher run on the same views
bit for bit; resume and two processes; the top-k target; every refusal, and a teach that fails
leaves nothing."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdreg.cli import main
from kdreg.data.loading import load_data
from kdreg.engine import preempt
from kdreg.engine.assemble import DataShape, assemble
from kdreg.engine.run import Run
from kdreg.engine.step import Teachers
from kdreg.errors import Checkpointed
from kdreg.normalise import normalise
from kdreg.recipe import load_recipe
from kdreg.stages import freeze
from kdreg.store.format import MANIFEST, full_logits, open_store, topk_row
from kdreg.store.replay import StoredOutputs, StoredTeachers
from kdreg.store.teach import teach

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "ddp_driver.py"

RECIPE = """
name = "store"
seed = 0
[data]
dataset = "synthetic"
batch_size = 16
val_split = 16
options = {{ train_size = 80, test_size = 16, num_classes = 4, image_size = 8 }}
[train]
epochs = 2
optimizer = {{ lr = 0.05 }}
log_interval = 1
[[stages]]
name = "teacher"
backbone = {{ name = "tiny_slimmable", widths = [1.0], channels = 12 }}
init = "{init}"
epochs = 0
[[stages]]
name = "student"
backbone = {{ name = "tiny_slimmable", widths = [0.5, 1.0], channels = 4 }}
graph = {{ name = "kd", teacher = "teacher" }}
lam = 0.8
tau = 2.0
{store}
"""


class World:
    """A teacher checkpoint, the recipe and stores built from it, in one folder."""

    def __init__(self, root: Path):
        self.root = root
        self.init = root / "teacher.pt"
        torch.manual_seed(123)
        from kdreg.create import create

        teacher = create("backbone", "tiny_slimmable", {"widths": [1.0], "channels": 12},
                         provided={"num_classes": 4, "in_chans": 3, "input_size": (8, 8)}, path="t")
        torch.save(teacher.state_dict(), self.init)
        self.stores: dict[str, Path] = {}

    def recipe(self, store: Path | None = None, name: str = "recipe.toml", extra: str = "") -> Path:
        path = self.root / name
        line = f'teacher_store = "{store}"' if store is not None else ""
        path.write_text(RECIPE.format(init=self.init, store=line) + extra)
        return path

    def store(self, kind: str) -> Path:
        """``f32`` (float32 full, the teachers' batch the run's), ``f16`` or ``top2``."""
        if kind not in self.stores:
            out = self.root / f"store-{kind}"
            teach(load_recipe(self.recipe()), "student", 3, out, topk=2 if kind == "top2" else 0,
                  dtype="float32" if kind == "f32" else "float16", progress=False)
            self.stores[kind] = out
        return self.stores[kind]

    def teacher(self) -> torch.nn.Module:
        """The live teacher as a run builds it (its weights, its input statistics), frozen."""
        recipe = load_recipe(self.recipe())
        plans = assemble(recipe, DataShape.of(load_data(recipe.data)), seed=recipe.seed)
        return freeze(plans[0].model)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("store"))


def rebuilt(images: torch.Tensor, params: torch.Tensor, padding: int) -> torch.Tensor:
    """Each image's view from its stored (row, col, flip), independently of the loader: reflect
    padding, the crop, the flip; float in [0, 1]."""
    h, w = images.shape[2:]
    padded = F.pad(images.float(), (padding,) * 4, mode="reflect")
    out = torch.stack([padded[n, :, r:r + h, c:c + w] for n, (r, c, _) in enumerate(params.tolist())])
    flip = params[:, 2].bool()
    out[flip] = out[flip].flip(-1)
    return out / 255.0


@pytest.mark.parametrize("kind", ["f16", "top2"])
def test_stored_views_through_the_live_teacher_give_the_stored_outputs(world: World, kind: str) -> None:
    store = open_store(world.store(kind), "test")
    recipe = load_recipe(world.recipe())
    train = load_data(recipe.data).train
    n, k = store.images, store.views
    assert (n, k, store.classes) == (64, 3, 4) and store.stages == {"teacher": ("x1.0",)}
    params = torch.from_numpy(store.params.read(0, n).astype("int64")).view(n * k, 3)
    assert params[:, :2].min() == 0 and params[:, :2].max() == 8 and 0 < params[:, 2].float().mean() < 1
    x = rebuilt(train.images.repeat_interleave(k, dim=0), params, store.padding)
    teacher = world.teacher()
    with torch.no_grad():
        live = teacher.forward_submodel(normalise(teacher, x), 0)   # as a step feeds it
    stored = store.outputs(torch.arange(n * k).numpy())[("teacher", 0)]
    if kind == "f16":
        assert stored.abs().max() > 0.01
        torch.testing.assert_close(stored, live, rtol=1e-3, atol=1e-3)   # fp16 rounding
        assert torch.equal(stored, live.half().float())
    else:   # the two largest logits at their classes, every other class at the rest value
        top = live.topk(2, dim=1)
        rest = torch.logsumexp(live.scatter(1, top.indices, -math.inf), 1) - math.log(2)
        assert torch.equal(stored.topk(2, dim=1).indices.sort(1).values, top.indices.sort(1).values)
        torch.testing.assert_close(stored.gather(1, top.indices), top.values, rtol=1e-3, atol=1e-3)
        others = torch.ones_like(live, dtype=torch.bool).scatter(1, top.indices, False)
        torch.testing.assert_close(stored[others].view(-1, 2), rest[:, None].expand(-1, 2), rtol=1e-3, atol=1e-3)


def test_the_top_k_target_is_the_teachers_top_k_probabilities_with_the_rest_spread_evenly() -> None:
    """FKD's soft label at temperature 1: the k largest probabilities exact, the remaining mass
    split evenly over the other classes."""
    z = torch.tensor([[3.0, -1.0, 0.5, 2.0, -2.0, 0.0]], dtype=torch.float64)
    values, indices = topk_row(z, 2)
    assert indices.tolist() == [[0, 3]]
    p = torch.softmax(z, 1)[0]
    target = torch.softmax(full_logits(values, indices, 6), 1)[0]
    assert torch.allclose(target[[0, 3]], p[[0, 3]], atol=1e-12)
    rest = (1 - p[0] - p[3]) / 4
    assert torch.allclose(target[[1, 2, 4, 5]], rest.expand(4), atol=1e-12)


def test_each_epoch_shows_every_image_at_a_stored_view_chosen_by_its_streams(world: World) -> None:
    path = world.store("f16")
    store = open_store(path, "test")
    recipe = load_recipe(world.recipe(path))
    train = load_data(recipe.data).train
    stored = StoredTeachers(store, {"teacher:x1.0": ("teacher", 0)})
    loader = stored.loader(train.images, train.labels, batch_size=16, device=torch.device("cpu"),
                           seed=7, rank=0, world_size=1)
    chosen = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        x = torch.cat([b[0] for b in batches])
        rows = torch.cat([b[2] for b in batches])
        assert len(set(rows.tolist())) == 64 and set((rows // 3).tolist()) == set(range(64))
        assert torch.equal(rows % 3, store.views_of(7, epoch)[rows // 3])
        params = torch.from_numpy(store.params.read(0, 64).astype("int64")).view(-1, 3)[rows]
        assert torch.equal(x, rebuilt(train.images[rows // 3], params, store.padding))
        chosen.append(store.views_of(7, epoch))
        loader.set_epoch(epoch, skip=2)      # a resumed epoch: the same rows from its third batch
        assert torch.equal(torch.cat([b[2] for b in loader]), rows[32:])
    assert not torch.equal(chosen[0], chosen[1]) and set(chosen[0].tolist()) == {0, 1, 2}
    assert torch.equal(store.views_of(7, 1), chosen[1])


def _same_runs(a: Path, b: Path) -> None:
    left = torch.load(a / "checkpoints" / "student" / "last.pt", weights_only=False)
    right = torch.load(b / "checkpoints" / "student" / "last.pt", weights_only=False)
    for key, value in left["model"].items():
        assert torch.equal(value, right["model"][key]), key
    ra, rb = (json.loads((d / "results.json").read_text())["stages"] for d in (a, b))
    assert [s["test_accuracy"] for s in ra] == [s["test_accuracy"] for s in rb]
    assert [s["val_accuracy"] for s in ra] == [s["val_accuracy"] for s in rb]
    ma, mb = ([{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_second")}
               for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
    assert ma == mb and len(ma) == 2


@pytest.fixture(scope="module")
def store_run(world: World) -> Path:
    out = world.root / "from-store"
    Run.start(world.recipe(world.store("f32"), "f32.toml"), out, progress=False).execute()
    return out


def test_a_kd_run_from_a_float32_store_is_the_live_teacher_run_on_the_same_views_bit_for_bit(
        world: World, store_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = json.loads((store_run / "results.json").read_text())
    assert [s["name"] for s in results["stages"]] == ["student"]      # the teacher is not built
    assert results["stages"][0]["teachers"] == ["teacher"]
    teacher = world.teacher()
    calls = []

    def live(self: StoredTeachers, rows: torch.Tensor) -> Teachers:   # the live teacher instead
        calls.append(len(rows))
        return Teachers({"teacher": teacher}, self.nodes)

    monkeypatch.setattr(StoredTeachers, "at", live)
    out = world.root / "live"
    Run.start(world.recipe(world.store("f32"), "live.toml"), out, progress=False).execute()
    assert calls == [16] * 8
    _same_runs(store_run, out)
    # and the store's outputs matter: a live run on other views (the plain loader) differs
    monkeypatch.undo()
    plain = world.root / "plain"
    Run.start(world.recipe(None, "plain.toml"), plain, progress=False).execute()
    with pytest.raises(AssertionError):
        _same_runs(store_run, plain)


def stopped_at_read(reads: int, recipe: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run ``recipe`` into ``out`` with a SIGUSR1 sent during its ``reads``-th read of stored
    outputs (it checkpoints after that step and stops): the saved state (epoch, step)."""
    steps = []
    read = StoredOutputs.outputs

    def signalling(self: StoredOutputs, x: torch.Tensor, dtype: torch.dtype | None) -> Any:
        steps.append(1)
        if len(steps) == reads:
            os.kill(os.getpid(), signal.SIGUSR1)
        return read(self, x, dtype)

    with monkeypatch.context() as patch:
        patch.setattr(StoredOutputs, "outputs", signalling)
        run = Run.start(recipe, out, progress=False)
        with preempt.handling([signal.SIGUSR1]), pytest.raises(Checkpointed):
            run.execute()
    state: dict[str, Any] = torch.load(out / "checkpoints" / "student" / "last.pt", weights_only=False)["state"]
    return state


def test_a_run_from_a_store_stopped_mid_epoch_resumes_to_the_uninterrupted_run(
        world: World, store_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = world.root / "cut"
    state = stopped_at_read(6, world.recipe(world.store("f32"), "cut.toml"), out, monkeypatch)
    assert (state["epoch"], state["step"]) == (1, 2)    # epoch 2, step 2 (4 steps an epoch)
    Run.resume(out, progress=False).execute()
    _same_runs(store_run, out)


@pytest.mark.processes
def test_two_processes_read_their_shards_of_the_store_and_give_the_combined_batchs_gradients(
        world: World, streamed: StreamWorld) -> None:
    """In memory (batch 16) and streamed (loader workers rebuilding the stored views, batch 8),
    both taken by the same two torchrun processes."""
    sys.path.insert(0, str(DRIVER.parent))
    from ddp_driver import step_gradients

    recipes = {"memory": (world.recipe(world.store("f32"), "ddp.toml"), world.root / "grads.pt", 8),
               "streamed": (streamed.recipe(streamed.store, "ddp.toml"), streamed.root / "grads.pt", 4)}
    jobs = world.root / "jobs.json"
    jobs.write_text(json.dumps([["grads", str(recipe), str(out)] for recipe, out, _ in recipes.values()]))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(DRIVER), "jobs", str(jobs)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind, (recipe, out, half) in recipes.items():
        two = torch.load(out, weights_only=False)
        one, _ = step_gradients(str(recipe))
        assert two["world"] == 2 and set(two["grads"]) == set(one), kind
        for name, g in one.items():   # float32 sums of two halves: a rounding error of the tensor's scale
            torch.testing.assert_close(two["grads"][name], g, rtol=1e-5,
                                       atol=max(1e-7, 2e-6 * g.abs().max().item()), msg=f"{kind}: {name}")
        rows = [torch.load(f"{out}.rows{r}", weights_only=False) for r in range(2)]
        assert len(rows[0]) == len(rows[1]) == half and not set(rows[0].tolist()) & set(rows[1].tolist()), kind


# ----------------------------------------------------------------------------- refusals
def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(argv) == 2
    return capsys.readouterr().err.strip().splitlines()


REFUSED_RUNS = {
    "teacher weights": ("--set", "stages.teacher.init={other}",
                        "was built for teachers.teacher.weights = \"sha256:"),
    "teacher backbone": ("--set", "stages.teacher.backbone.channels=8",
                         "was built for teachers.teacher.backbone = {\"name\": \"tiny_slimmable\", "
                         "\"widths\": [1.0], \"channels\": 12}, this recipe has {\"name\": \"tiny_slimmable\", "
                         "\"widths\": [1.0], \"channels\": 8}"),
    "data": ("--set", "data.options.train_size=96", "was built for data.train_images = 64, this recipe has 80"),
    "classes": ("--set", "data.options.num_classes=5", "holds 4 classes but this stage predicts 5"),
    "auto_augment": ("--set", "data.augment.auto_augment=\"rand-m9\"", "@ recipe.data.augment.auto_augment"),
    "color_jitter": ("--set", "data.augment.color_jitter=0.4", "@ recipe.data.augment.color_jitter"),
    "re_prob": ("--set", "data.augment.re_prob=0.25", "@ recipe.data.augment.re_prob"),
    "mixup": ("--set", "data.augment.mixup=0.2", "@ recipe.data.augment.mixup"),
    "cutmix": ("--set", "data.augment.cutmix=1.0", "@ recipe.data.augment.cutmix"),
    "streamed": ("--set", "data.in_memory=false", "are not files on disk (image 0); a teacher store on the "
                 "streamed path identifies them by their files' names and sizes @ recipe.data.in_memory"),
    "feature losses": ("--set", "stages.student.feature_losses=[{name=\"at\", points=[\"stage1\"]}]",
                       "holds its logits alone; drop teacher_store or the feature losses "
                       "@ recipe.stages.student.feature_losses"),
}


@pytest.mark.parametrize("case", list(REFUSED_RUNS))
def test_a_run_that_the_store_cannot_serve_is_refused_in_one_line(
        world: World, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    other = world.root / "other.pt"
    if not other.exists():
        state = torch.load(world.init, weights_only=False)
        torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other)
    flag, value, expected = REFUSED_RUNS[case]
    out = world.root / f"refused-{case.replace(' ', '-')}"
    lines = _refused(["run", str(world.recipe(world.store("f16"))), "--out", str(out), "--no-progress",
                      flag, value.replace("{other}", str(other))], capsys)
    assert len(lines) == (2 if case == "data" else 1) and expected in lines[0], lines   # data: its hash too
    assert all(line.startswith("error: ") and " @ " in line for line in lines)
    assert not out.exists()


def test_a_bridge_with_a_store_is_refused(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    extra = 'bridge = { name = "stc", teacher = "teacher", student_split = "stage2", teacher_split = "stage2" }\n'
    lines = _refused(["validate", str(world.recipe(world.store("f16"), "bridge.toml", extra))], capsys)
    assert any("a teacher store holds its logits alone; drop teacher_store or the bridge "
               "@ recipe.stages.student.bridge" in line for line in lines), lines


def test_a_missing_incomplete_or_corrupt_store_is_refused(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    broken = world.root / "broken"
    shutil.copytree(world.store("f16"), broken)
    recipe = str(world.recipe(broken, "broken.toml"))
    out = world.root / "never"
    where = "@ recipe.stages.student.teacher_store"
    data = broken / "out-0.f16"
    data.write_bytes(data.read_bytes()[:-2])
    lines = _refused(["run", recipe, "--out", str(out)], capsys)
    assert lines == [f"error: {recipe}: teacher store {broken} is corrupt ({MANIFEST}: out-0.f16 holds 1534 "
                     f"bytes, its manifest says 1536); build it again {where}"]
    manifest = json.loads((broken / MANIFEST).read_text())
    (broken / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    assert "it is not marked complete" in _refused(["run", recipe, "--out", str(out)], capsys)[0]
    (broken / MANIFEST).unlink()
    lines = _refused(["run", recipe, "--out", str(out)], capsys)
    assert lines == [f"error: {recipe}: teacher store {broken} is incomplete: it has no {MANIFEST} (its kdreg "
                     f"teach did not finish); build it again {where}"]
    shutil.rmtree(broken)
    assert "does not exist; build it with `kdreg teach" in _refused(["run", recipe, "--out", str(out)], capsys)[0]
    assert not out.exists()


def test_teach_refusals_write_nothing(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(world.recipe())
    out = world.root / "not-written"
    base = ["teach", recipe, "--stage", "student", "--views", "2", "--out", str(out), "--no-progress"]
    assert _refused(base + ["--topk", "4"], capsys) == [
        "error: --topk 4 keeps every one of the 4 classes; store full logits (--topk 0) instead @ --topk"]
    lines = _refused(base + ["--set", "stages.teacher.epochs=1"], capsys)
    assert lines == ["error: stage 'teacher' trains in this recipe (epochs = 1); a teacher store holds a frozen "
                     "teacher's outputs: train it first, then give its best.pt as init with epochs = 0 "
                     "@ recipe.stages.teacher.epochs"]
    assert "@ recipe.data.augment.mixup" in _refused(base + ["--set", "data.augment.mixup=0.2"], capsys)[0]
    assert _refused(["teach", recipe, "--stage", "teacher", "--views", "2", "--out", str(out)], capsys) == [
        "error: stage 'teacher' learns from no frozen earlier stage (its graph 'none' names none): there is "
        "nothing to store @ recipe.stages.teacher.graph"]
    assert not out.exists()
    existing = world.store("f16")
    before = {p.name: p.stat().st_mtime_ns for p in existing.iterdir()}
    assert _refused(["teach", recipe, "--stage", "student", "--views", "2", "--out", str(existing)], capsys) == [
        f"error: {existing} exists; a store is never written over: choose another --out or remove it @ --out"]
    assert {p.name: p.stat().st_mtime_ns for p in existing.iterdir()} == before


def test_an_interrupted_teach_leaves_no_store(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    outputs = Teachers.outputs

    def interrupted(self: Teachers, x: torch.Tensor, dtype: torch.dtype | None) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return outputs(self, x, dtype)

    monkeypatch.setattr(Teachers, "outputs", interrupted)
    parent = world.root / "interrupted"
    parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        teach(load_recipe(world.recipe()), "student", 2, parent / "store", progress=False)
    assert list(parent.iterdir()) == []


def test_a_sweep_builds_a_missing_store_once_and_every_point_reads_it(
        world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from kdreg.store import teach as teach_module

    built = []
    real = teach_module.teach

    def counting(*args: Any, **kw: Any) -> Path:
        built.append((args[1], args[2], kw.get("topk")))
        return real(*args, **kw)

    monkeypatch.setattr(teach_module, "teach", counting)
    store = world.root / "built-by-the-sweep"
    recipe = world.recipe(store, "sweep.toml", "teacher_store_views = 2\nteacher_store_topk = 2\n")
    assert main(["validate", str(recipe)]) == 0       # a store its run will build: checked, not built
    assert built == [] and not store.exists()
    out = world.root / "sweep"
    assert main(["sweep", str(recipe), "--grid", "stages.student.lam=0.5,0.9", "--out", str(out),
                 "--no-progress"]) == 0
    assert built == [("student", 2, 2)]
    opened = open_store(store, "test")
    assert (opened.views, opened.topk) == (2, 2)
    for lam in ("0.5", "0.9"):
        stages = json.loads((out / f"lam={lam}" / "seed-0" / "results.json").read_text())["stages"]
        assert [(s["name"], s["teacher_store"]) for s in stages] == [("student", str(store))]
    # a stage that asks for other views than the store holds is refused, the store kept
    lines = _refused(["run", str(recipe), "--out", str(world.root / "no"), "--set",
                      "stages.student.teacher_store_views=3"], capsys)
    assert lines == [f"error: {recipe}: teacher store {store} holds 2 views, top-k 2; this stage asks for 3, "
                     f"top-k 2; build the store again for it @ recipe.stages.student.teacher_store_views"]
    assert built == [("student", 2, 2)] and not (world.root / "no").exists()


@pytest.mark.parametrize("axis", ["data.options.image_size=8,12", "stages.teacher.backbone.channels=12,16",
                                  "train.precision=fp32,bf16", "stages.student.teacher_store_views=2,3"])
def test_a_sweep_varying_what_its_store_depends_on_is_refused_before_anything_runs(
        world: World, axis: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = world.root / "never-built"
    recipe = world.recipe(store, "sweep-bad.toml", "teacher_store_views = 2\n")
    out = world.root / "refused-sweep"
    lines = _refused(["sweep", str(recipe), "--grid", axis, "--grid", "stages.student.lam=0.5,0.9",
                      "--out", str(out), "--no-progress"], capsys)
    key, values = axis.split("=")
    first, second = values.split(",")
    assert len(lines) == 1 and lines[0].endswith("@ --grid"), lines
    assert f"would share teacher store {store}, which depends on {key} (" in lines[0]
    assert f"points {key.rsplit('.', 1)[1]}={first},lam=0.5 and {key.rsplit('.', 1)[1]}={second},lam=0.5" in lines[0]
    assert not out.exists() and not store.exists()
    # what the store does not depend on may vary: the batch, how the data is read, the student
    assert sweep_plan_ok(recipe, ["data.batch_size=8,16", "stages.student.tau=1,4", "stages.student.lam=0.1,0.5"])


def sweep_plan_ok(recipe: Path, grid: list[str]) -> bool:
    from kdreg.sweep import Sweep

    Sweep.plan(recipe, grid, out=recipe.parent / "unused-sweep")
    return True


# ----------------------------------------------------------------------------- the streamed path
STREAM_RECIPE = """
name = "streamed-store"
seed = 0
[data]
dataset = "imagefolder"
root = "{root}"
batch_size = 8
val_split = 8
in_memory = false
image_size = 16
workers = 1
""" + RECIPE[RECIPE.index("[train]"):]     # the in-memory test's stages


def image_folder(root: Path) -> Path:
    """4 classes of PNG images of 16 to 32 pixels a side (their sizes differ: the streamed path):
    6 training images each (8 of the 24 drawn for validation), 2 test images each."""
    from PIL import Image

    rng = torch.Generator().manual_seed(5)
    for split, count in (("train", 6), ("test", 2)):
        for c in range(4):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                h, w = torch.randint(16, 33, (2,), generator=rng).tolist()
                pixels = torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8)
                pixels[..., c % 3] //= 2         # a little of the class in the pixels
                Image.fromarray(pixels.numpy()).save(root / split / f"c{c}" / f"{i}.png")
    return root


class StreamWorld:
    """An image folder, a teacher for it and its float32 store of 2 views."""

    def __init__(self, root: Path):
        from kdreg.create import create

        self.root, self.folder = root, image_folder(root / "images")
        self.init = root / "teacher.pt"
        torch.manual_seed(321)
        teacher = create("backbone", "tiny_slimmable", {"widths": [1.0], "channels": 12},
                         provided={"num_classes": 4, "in_chans": 3, "input_size": (16, 16)}, path="t")
        torch.save(teacher.state_dict(), self.init)
        self.store = root / "store"
        teach(load_recipe(self.recipe()), "student", 2, self.store, dtype="float32", progress=False)

    def recipe(self, store: Path | None = None, name: str = "recipe.toml", folder: Path | None = None) -> Path:
        path = self.root / name
        line = f'teacher_store = "{store}"' if store is not None else ""
        path.write_text(STREAM_RECIPE.format(root=folder or self.folder, init=self.init, store=line))
        return path

    def teacher(self) -> torch.nn.Module:
        recipe = load_recipe(self.recipe())
        return freeze(assemble(recipe, DataShape.of(load_data(recipe.data)), seed=recipe.seed)[0].model)


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory) -> StreamWorld:
    return StreamWorld(tmp_path_factory.mktemp("streamed-store"))


def test_streamed_stored_boxes_are_the_live_draws_and_give_the_stored_outputs_through_the_live_teacher(
        streamed: StreamWorld) -> None:
    from PIL import Image

    from kdreg.data.streaming import open_image
    from kdreg.data.transforms import seeded
    from kdreg.store.format import CROPS_FILE
    from kdreg.streams import stream_seed

    store = open_store(streamed.store, "test")
    recipe = load_recipe(streamed.recipe())
    splits = load_data(recipe.data)
    train = splits.train
    assert splits.streaming is not None and store.manifest["params_file"] == CROPS_FILE
    n, k = store.images, store.views
    assert (n, k, store.classes) == (16, 2, 4)
    crops = torch.from_numpy(store.params.read(0, n).astype("int64")).view(n * k, 5)
    seeds = torch.randint(0, 2**62, (n, k), generator=torch.Generator().manual_seed(
        stream_seed(recipe.seed, "store", "views"))).view(-1).tolist()
    views = []
    for row, (i, j, h, w, flip) in enumerate(crops.tolist()):
        index = int(train.index[row // k])
        with Image.open(train.reader.filename(index, absolute=True)) as image:
            full = image.convert("RGB")
        assert min(i, j) >= 0 and min(h, w) > 0 and i + h <= full.height and j + w <= full.width
        view = full.resize((16, 16), Image.Resampling.BILINEAR, box=(j, i, j + w, i + h))
        if flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(view).copy()).permute(2, 0, 1)
        with seeded(seeds[row]):   # the live streamed transform at the view's seed: the same pixels
            live_view = splits.streaming.train_transform(open_image(train.reader[index][0]))
        assert torch.equal(live_view, pixels), row
        views.append(pixels)
    assert 0 < crops[:, 4].float().mean() < 1 and len(set(map(tuple, crops[:, 2:4].tolist()))) > n
    x = torch.stack(views).float() / 255.0
    teacher = streamed.teacher()
    with torch.no_grad():
        live = torch.cat([teacher.forward_submodel(normalise(teacher, part), 0) for part in x.split(8)])
    stored = store.outputs(torch.arange(n * k).numpy())[("teacher", 0)]
    assert stored.abs().max() > 0.01     # float32: equal but for the last bits of another memory format
    torch.testing.assert_close(stored, live, rtol=1e-5, atol=1e-6)



@pytest.fixture(scope="module")
def streamed_store_run(streamed: StreamWorld) -> Path:
    out = streamed.root / "from-store"
    Run.start(streamed.recipe(streamed.store, "f32.toml"), out, progress=False).execute()
    return out


def test_a_streamed_kd_run_from_a_float32_store_is_the_live_teacher_run_on_the_same_views_bit_for_bit(
        streamed: StreamWorld, streamed_store_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdreg.streams import batch_seed

    store_run = streamed_store_run
    results = json.loads((store_run / "results.json").read_text())
    assert [s["name"] for s in results["stages"]] == ["student"] and results["data"]["path"] == "streamed"
    teacher = streamed.teacher()
    calls, loaders = [], []

    def live(self: StoredTeachers, rows: torch.Tensor) -> Teachers:   # the live teacher instead
        calls.append(rows.tolist())
        return Teachers({"teacher": teacher}, self.nodes)

    monkeypatch.setattr(StoredTeachers, "at", live)
    made = StoredTeachers.stream_loader
    monkeypatch.setattr(StoredTeachers, "stream_loader",
                        lambda self, *a, **kw: loaders.append(1) or made(self, *a, **kw))
    out = streamed.root / "live"
    Run.start(streamed.recipe(streamed.store, "live.toml"), out, progress=False).execute()
    assert loaders == [1] and [len(r) for r in calls] == [8] * 4
    for epoch, rows in enumerate((calls[0] + calls[1], calls[2] + calls[3])):    # each image once, its view
        rows_t = torch.tensor(rows)
        assert sorted((rows_t // 2).tolist()) == list(range(16))
        assert torch.equal(rows_t % 2, open_store(streamed.store, "t").views_of(
            batch_seed(0, 1), epoch)[rows_t // 2])
    _same_runs(store_run, out)
    monkeypatch.undo()
    plain = streamed.root / "plain"        # the live loader's own views: another run
    Run.start(streamed.recipe(None, "plain.toml"), plain, progress=False).execute()
    with pytest.raises(AssertionError):
        _same_runs(store_run, plain)


def test_a_streamed_run_from_a_store_stopped_mid_epoch_resumes_to_the_uninterrupted_run(
        streamed: StreamWorld, streamed_store_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after the second epoch's first step (the loader's worker had read ahead); the
    resumed run's loader starts at the epoch's second batch, its rows and rebuilt views those of
    the uninterrupted run."""
    out = streamed.root / "cut"
    state = stopped_at_read(3, streamed.recipe(streamed.store, "cut.toml"), out, monkeypatch)
    assert (state["epoch"], state["step"]) == (1, 1)    # epoch 2, step 1 (2 steps an epoch)
    Run.resume(out, progress=False).execute()
    _same_runs(streamed_store_run, out)


def test_a_streamed_store_refuses_a_changed_image_folder_in_one_line(
        streamed: StreamWorld, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from PIL import Image

    copy = streamed.root / "copied"
    shutil.copytree(streamed.folder, copy)
    recipe = streamed.recipe(streamed.store, "changed.toml", folder=copy)
    from kdreg.store.replay import data_problems

    stored = StoredTeachers(open_store(streamed.store, "t"), {}, "recipe.stages.student.teacher_store")
    data = load_recipe(recipe).data
    splits = load_data(data)
    assert data_problems(stored, data.dataset, splits) == []    # the same files elsewhere
    image = copy / splits.train.reader.filename(int(splits.train.index[5]))   # a training image
    size = image.stat().st_size
    Image.new("RGB", (20, 20), (9, 9, 9)).save(image)
    assert image.stat().st_size != size
    out = streamed.root / "refused"
    lines = _refused(["run", str(recipe), "--out", str(out), "--no-progress"], capsys)
    assert len(lines) == 1 and "teacher store" in lines[0] and "was built for data.train_files = " in lines[0]
    assert lines[0].endswith("@ recipe.stages.student.teacher_store") and not out.exists()
