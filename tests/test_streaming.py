"""The streamed data path: folders of images of any sizes read by DataLoader workers, each
torchrun process its own shard; each model fed its own input statistics; bad input reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from kdreg import plugins
from kdreg.cli import main
from kdreg.data.loading import IN_MEMORY, STREAMED, load_data
from kdreg.data.sources import ImageStream
from kdreg.data.streaming import LOG_ENV, ShardSampler, StreamLoader, StreamSet
from kdreg.engine.run import Run
from kdreg.errors import DataError
from kdreg.hookspecs import hookimpl
from kdreg.recipe import DataConfig, load_recipe

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("cat", "dog", "emu")


def photo_folder(root: Path, train: int = 8, test: int = 3, seed: int = 0,
                 sizes: tuple[int, int] = (12, 48), test_dir: str = "val") -> Path:
    """JPEGs of mixed sizes and aspect ratios in root/train/<class>/ and root/<test_dir>/<class>/;
    each class has its own brightness, so a model can learn them."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), (test_dir, test)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(*sizes, size=2))
                pixels = (rng.random((h, w, 3)) * 70 + 30 + 70 * c).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


RECIPE = """
name = "photos"
seed = 0
[data]
dataset = "imagefolder"
root = "{root}"
batch_size = 6
eval_batch_size = 8
val_split = 6
image_size = {size}
augment = "imagenet"
workers = {workers}
[train]
epochs = {epochs}
device = "cpu"
channels_last = false
optimizer = {{ name = "sgd", lr = 0.02 }}
schedule = {{ name = "constant" }}
"""

STUDENT = """
[[stages]]
name = "student"
backbone = {{ name = "timm", model = "test_resnet" }}
{extra}
"""


def recipe_file(tmp_path: Path, root: Path, *, size: int = 64, workers: int = 2, epochs: int = 2,
                stages: str = STUDENT.format(extra=""), name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(RECIPE.format(root=root, size=size, workers=workers, epochs=epochs) + stages)
    return path


class Interrupt:
    """Stops the run after its first epoch, as Ctrl-C would."""

    @hookimpl
    def kdreg_epoch_finished(self, run, stage, record):  # type: ignore[no-untyped-def]
        if record["epoch"] == 1:
            raise KeyboardInterrupt


def _metrics(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- end to end
def test_a_folder_of_mixed_jpegs_trains_evaluates_resumes_and_exports(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = photo_folder(tmp_path / "photos")
    recipe = recipe_file(tmp_path, root)
    full = Run.start(recipe, tmp_path / "full", progress=False).execute()
    out = capsys.readouterr().out
    assert "data: streamed (2 loader workers per process), 64x64 images, augment imagenet" in out
    assert full["data"] == {"path": "streamed", "image_size": [64, 64], "train_images": 18,
                            "val_images": 6, "test_images": 9, "augment": "imagenet", "workers": 2,
                            "skip_bad_images": False, "skipped_images": 0}
    # stopped after its first epoch, resumed: bit-identical to the uninterrupted run
    plugins.reset(plugins.make_plugin_manager(extra=[Interrupt()]))
    try:
        with pytest.raises(KeyboardInterrupt):
            Run.start(recipe, tmp_path / "cut", progress=False).execute()
    finally:
        plugins.reset()
    torch.manual_seed(12345)  # whatever the global RNGs hold now must not matter
    resumed = Run.resume(tmp_path / "cut", progress=False).execute()
    assert [m["train_loss"] for m in _metrics(tmp_path / "full")] == \
           [m["train_loss"] for m in _metrics(tmp_path / "cut")]
    assert full["stages"][0]["test_accuracy"] == resumed["stages"][0]["test_accuracy"]
    a, b = (torch.load(tmp_path / d / "checkpoints/student/last.pt", weights_only=True)["model"]
            for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # evaluation and export of the streamed run
    assert main(["eval", str(tmp_path / "full")]) == 0
    accuracy = full["stages"][0]["test_accuracy"][0]
    assert f"full {accuracy:.2f}" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "full"), "--out", str(tmp_path / "net.pt2")]) == 0
    info = json.loads((tmp_path / "net.json").read_text())
    splits = load_data(load_recipe(recipe).data)
    assert info["input_size"] == [3, 64, 64] and info["mean"] == list(splits.mean)
    program = torch.export.load(str(tmp_path / "net.pt2")).module()
    assert program(torch.rand(2, 3, 64, 64)).shape == (2, 3)


# ----------------------------------------------------------------------------- normalisation
class InputsSeen:
    """Records what the first convolution of every stage's model receives, per stage."""

    def __init__(self) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {}

    @hookimpl
    def kdreg_run_started(self, run):  # type: ignore[no-untyped-def]
        for plan in run.plans:
            conv = next(m for m in plan.model.modules() if isinstance(m, torch.nn.Conv2d))
            conv.register_forward_pre_hook(
                lambda _m, args, name=plan.name: self.seen.setdefault(name, []).append(args[0].detach().clone()))


def test_a_pretrained_teacher_is_fed_its_pretrained_cfg_statistics(tmp_path: Path) -> None:
    import timm

    root = photo_folder(tmp_path / "photos")
    weights = tmp_path / "teacher.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), weights)
    stages = f"""
[[stages]]
name = "teacher"
backbone = {{ name = "timm", model = "test_resnet", pretrained_file = "{weights}" }}
epochs = 0
[[stages]]
name = "student"
backbone = {{ name = "timm", model = "test_resnet" }}
graph = {{ name = "kd", teacher = "teacher" }}
lam = 0.5
"""
    recipe = recipe_file(tmp_path, root, epochs=1, workers=0, stages=stages)
    text = recipe.read_text().replace('augment = "imagenet"',
                                      'augment = { name = "imagenet", mixup = 0.8, cutmix = 1.0 }')
    recipe.write_text(text)
    seen = InputsSeen()
    plugins.reset(plugins.make_plugin_manager(extra=[seen]))
    try:
        run = Run.start(recipe, tmp_path / "run", progress=False)
        run.execute()
    finally:
        plugins.reset()
    splits = load_data(run.recipe.data)
    data_mean, data_std = (torch.tensor(v).view(1, -1, 1, 1) for v in (splits.mean, splits.std))
    cfg_mean, cfg_std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.5)  # test_resnet's
    teacher_model = next(p.model for p in run.plans if p.name == "teacher")
    assert teacher_model.input_mean == (0.5, 0.5, 0.5) and teacher_model.input_std == (0.5, 0.5, 0.5)
    assert not torch.allclose(data_mean, cfg_mean, atol=0.01)
    # batches, not the zero probes that count MACs: the student's are its training steps, then
    # its evaluation; the teacher's its own evaluation, then one call per step of the student
    student, teacher = ([x for x in seen.seen[n] if x.abs().sum() > 0] for n in ("student", "teacher"))
    steps = len(student) - (len(splits.val) + 7) // 8 - (len(splits.test) + 7) // 8
    assert steps == 3
    for t, s in zip(teacher[-steps:], student[:steps]):
        x_student = s * data_std + data_mean              # the batch in [0, 1], as the student got it
        x_teacher = t * cfg_std + cfg_mean                # ... as the teacher got it
        assert torch.allclose(x_student, x_teacher, atol=1e-5)   # one (mixed) batch, two statistics
        assert float(x_student.min()) > -1e-5 and float(x_student.max()) < 1 + 1e-5
        assert not torch.allclose(s, t, atol=1e-3)


# ----------------------------------------------------------------------------- shards
@pytest.mark.processes
def test_each_of_two_torchrun_processes_reads_only_its_shard(tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "photos", train=10, test=4)
    stages = STUDENT.format(extra="").replace('{ name = "timm", model = "test_resnet" }', '"tiny_slimmable"')
    recipe = recipe_file(tmp_path, root, size=16, workers=1, epochs=1, stages=stages)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", **{LOG_ENV: str(logs)})
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "kdreg", "run", str(recipe), "--out", str(out),
                           "--nproc", "2", "--no-progress"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] and results["data"]["path"] == "streamed"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl", "recipe.toml",
                                                     "results.json"]
    read = {r: (logs / f"rank-{r}.log").read_text().splitlines() for r in (0, 1)}
    files = {str(p) for p in root.rglob("*.jpg")}
    assert set(read[0]) | set(read[1]) == files             # every image read once, by someone
    assert not set(read[0]) & set(read[1])                    # no process read another's shard
    for r in (0, 1):
        assert len(read[r]) == len(set(read[r])) and len(read[r]) <= len(files) // 2 + 2


def test_the_sampler_deals_disjoint_shards_and_draws_each_epoch_from_the_streams() -> None:
    one = ShardSampler(21, train=True, seed=3)
    two = [ShardSampler(21, train=True, seed=3, rank=r, world_size=2) for r in (0, 1)]
    positions = [p for p, _ in two[0]] + [p for p, _ in two[1]]
    assert len(positions) == 20 and len(set(positions)) == 20          # 21 - 21 % 2, disjoint
    assert sorted(p for p, _ in one) == list(range(21))
    first = list(one)
    assert list(ShardSampler(21, train=True, seed=3)) == first          # reproducible
    one.set_epoch(1)
    assert list(one) != first                                           # each epoch its own
    assert list(ShardSampler(21, train=True, seed=4)) != first          # each seed its own
    evaluation = [list(ShardSampler(5, train=False, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    assert evaluation == [[(0, 0), (2, 0), (4, 0)], [(1, 0), (3, 0)]]


def _stream(root: Path) -> tuple[ImageStream, Any]:
    config = attrs.evolve(DataConfig(), dataset="imagefolder", root=str(root), val_split=0,
                          image_size=16, in_memory=False, workers=0)
    splits = load_data(config)
    assert splits.streaming is not None and isinstance(splits.train, StreamSet)
    return splits, splits.streaming


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    splits, streaming = _stream(photo_folder(tmp_path / "photos", train=4, test=1))

    def epoch(workers: int, e: int) -> list[torch.Tensor]:
        s = attrs.evolve(streaming, workers=workers)
        loader = StreamLoader(splits.train, s, batch_size=4, device="cpu", train=True, seed=7,
                              num_classes=3)
        loader.set_epoch(e)
        return [t for batch in loader for t in batch]

    base = epoch(0, 1)
    assert all(torch.equal(a, b) for a, b in zip(base, epoch(2, 1)))
    assert not torch.equal(base[0], epoch(0, 2)[0])
    assert base[0].dtype == torch.float32 and float(base[0].min()) >= 0 and float(base[0].max()) <= 1


# ----------------------------------------------------------------------------- the path
def test_in_memory_auto_chooses_by_size_and_augmentation(tmp_path: Path) -> None:
    def path(**changes: Any) -> str:
        config = attrs.evolve(DataConfig(), **{"val_split": 0, **changes})
        return IN_MEMORY if load_data(config).streaming is None else STREAMED

    sample = {"dataset": "cifar10-sample", "root": str(tmp_path)}
    assert path(**sample) == IN_MEMORY
    assert path(**sample, in_memory=False) == STREAMED
    mixed = {"dataset": "imagefolder", "root": str(photo_folder(tmp_path / "mixed", 2, 1))}
    assert path(**mixed) == STREAMED
    same = {"dataset": "imagefolder", "root": str(photo_folder(tmp_path / "same", 2, 1, sizes=(9, 10)))}
    assert path(**same) == IN_MEMORY
    synthetic = {"dataset": "synthetic", "options": {"train_size": 8, "test_size": 4, "image_size": 8}}
    assert path(**synthetic) == IN_MEMORY
    streamed = load_data(attrs.evolve(DataConfig(), val_split=0, augment=attrs.evolve(
        DataConfig().augment, name="imagenet"), image_size=12, workers=0, **synthetic))
    assert streamed.streaming is not None and streamed.input_size == (12, 12)
    x, y = next(iter(StreamLoader(streamed.train, streamed.streaming, batch_size=4, device="cpu",
                                  train=True, seed=0, num_classes=10)))
    assert x.shape == (4, 3, 12, 12) and y.shape == (4,)


# ----------------------------------------------------------------------------- bad input
def test_a_truncated_image_names_its_file_or_is_skipped_and_counted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = photo_folder(tmp_path / "photos", train=4, test=2)
    bad = root / "train" / "dog" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])            # a truncated JPEG: its header still reads
    stages = STUDENT.format(extra="").replace('{ name = "timm", model = "test_resnet" }', '"tiny_slimmable"')
    recipe = recipe_file(tmp_path, root, size=16, workers=0, epochs=2, stages=stages)
    text = recipe.read_text().replace("val_split = 6", "val_split = 0")
    recipe.write_text(text)
    assert main(["run", str(recipe), "--out", str(tmp_path / "stopped"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and err[0].endswith("@ recipe.data.root"), err
    assert "skip_bad_images" in err[0]
    recipe.write_text(text + "")
    assert main(["run", str(recipe), "--out", str(tmp_path / "skipped"), "--no-progress",
                 "--set", "data.skip_bad_images=true"]) == 0
    results = json.loads((tmp_path / "skipped" / "results.json").read_text())
    assert results["data"]["skipped_images"] == 1          # one file, read in both epochs


class KillingReader:
    """A reader whose worker process dies (as the kernel's OOM killer would end it)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[Any, int]:
        os.kill(os.getpid(), signal.SIGKILL)
        return None, 0


def test_a_worker_that_dies_is_one_line_not_a_hang(tmp_path: Path) -> None:
    splits, streaming = _stream(photo_folder(tmp_path / "photos", train=2, test=1))
    data = StreamSet(KillingReader(), torch.arange(4), torch.zeros(4, dtype=torch.long))
    loader = StreamLoader(data, attrs.evolve(streaming, workers=1), batch_size=2, device="cpu",
                          train=True, seed=0, num_classes=3)
    with pytest.raises(DataError) as exc:
        list(loader)
    assert str(exc.value).count("\n") == 0
    assert "worker process died" in str(exc.value) and str(exc.value).endswith("@ recipe.data.workers")


@pytest.mark.parametrize(("break_it", "expected"), [
    (lambda r: (r / "train" / "emu").rename(r / "train" / "ostrich"),
     ("must hold the same class folders", "only in train: ostrich", "only in val: emu",
      "@ recipe.data.root")),
    (lambda r: [p.unlink() for p in (r / "val" / "dog").iterdir()],
     ("expected image files", "val/dog", "found none", "@ recipe.data.root")),
    (None, ("image_size", "@ recipe.data.in_memory")),
    ("size", ("'test_vit' does not support input size 4x4", "@ recipe.stages.student.backbone")),
])
def test_validate_reports_bad_data_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               break_it: Any, expected: tuple[str, ...]) -> None:
    root = photo_folder(tmp_path / "photos", train=2, test=1, sizes=(20, 21))
    recipe = recipe_file(tmp_path, root, size=64, workers=0, epochs=1)
    overrides: list[str] = []
    if break_it is None:
        overrides = ["--set", "data.in_memory=true", "--set", "data.augment=\"cifar\""]
    elif break_it == "size":   # a ViT of 16-pixel patches
        recipe.write_text(recipe.read_text().replace("test_resnet", "test_vit"))
        overrides = ["--set", "data.image_size=4"]
    else:
        break_it(root)
    assert main(["validate", str(recipe), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for fragment in expected:
        assert fragment in err[0], err


# ----------------------------------------------------------------------------- mixup / CutMix
def test_mixup_gives_soft_targets_drawn_from_the_batch_seed_and_ce_uses_them() -> None:
    from kdreg.data.transforms import BatchMix
    from kdreg.graph import TeacherGraph
    from kdreg.losses import cross_entropy, distillation_loss

    augment = attrs.evolve(DataConfig().augment, name="imagenet", mixup=0.8, cutmix=1.0)
    mix = BatchMix(augment, num_classes=3, device=torch.device("cpu"))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    a, ya = mix(x.clone(), y, seed=11)
    b, yb = mix(x.clone(), y, seed=11)
    c, _ = mix(x.clone(), y, seed=12)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)
    assert ya.shape == (4, 3) and torch.allclose(ya.sum(1), torch.ones(4))
    assert not torch.equal(a, x)
    logits = torch.randn(4, 3)
    expected = -(ya * torch.log_softmax(logits, -1)).sum(1).mean()
    assert torch.allclose(cross_entropy(logits, ya), expected)
    graph = TeacherGraph(2)                           # two sub-models, no teachers: CE each
    two = [logits, torch.randn(4, 3)]
    total = distillation_loss(two, ya, graph, lam=0.5, tau=1.0)
    assert torch.allclose(total, sum(cross_entropy(t, ya) for t in two))
    with pytest.raises(Exception, match="odd"):
        mix(torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2]), seed=0)


def test_per_image_timm_options_need_the_imagenet_transform(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = photo_folder(tmp_path / "photos", train=2, test=1)
    recipe = recipe_file(tmp_path, root, size=16, workers=0, epochs=1)
    assert main(["validate", str(recipe), "--set",
                 'data.augment={ name = "cifar", auto_augment = "rand-m9-mstd0.5" }']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("@ recipe.data.augment.auto_augment"), err
    assert main(["validate", str(recipe), "--set",
                 'data.augment={ name = "imagenet", auto_augment = "rand-m9-mstd0.5", re_prob = 0.25 }']) == 0


# ----------------------------------------------------------------------------- Hugging Face
def test_a_hugging_face_dataset_saved_on_disk_streams_through_timms_reader(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)

    def split(n: int) -> Any:
        images = [Image.fromarray((rng.random((int(h), int(w), 3)) * 255).astype(np.uint8))
                  for h, w in rng.integers(10, 30, size=(n, 2))]
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=list(CLASSES))})
        return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]},
                                          features=features)

    datasets.DatasetDict({"train": split(12), "test": split(6)}).save_to_disk(str(tmp_path / "hf"))
    config = attrs.evolve(DataConfig(), dataset="hfds", root=str(tmp_path / "hf"), val_split=3,
                          image_size=16, workers=0)
    splits = load_data(config)
    assert splits.streaming is not None and splits.classes == CLASSES
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 6)
    assert splits.test.labels.tolist() == [0, 1, 2, 0, 1, 2]
    loader = StreamLoader(splits.train, splits.streaming, batch_size=3, device="cpu", train=True,
                          seed=0, num_classes=3)
    batches = list(loader)
    assert len(batches) == 3 and all(x.shape == (3, 3, 16, 16) for x, _ in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(splits.train.labels.tolist())


@pytest.mark.processes
def test_bad_input_under_torchrun_exits_2_with_its_line_and_no_traceback(tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "photos", train=4, test=2)
    bad = root / "train" / "cat" / "002.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    stages = STUDENT.format(extra="").replace('{ name = "timm", model = "test_resnet" }', '"tiny_slimmable"')
    recipe = recipe_file(tmp_path, root, size=16, workers=0, epochs=1, stages=stages)
    recipe.write_text(recipe.read_text().replace("val_split = 6", "val_split = 0"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "kdreg", "run", str(recipe), "--out",
                           str(tmp_path / "run"), "--nproc", "2", "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(bad) in errors[0] and errors[0].endswith("@ recipe.data.root")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    others = [line for line in proc.stderr.splitlines() if line.startswith("failed: ")]
    assert all("another process of the run stopped first" in line for line in others), others


def test_mixed_targets_of_one_class_train_as_plain_labels(tmp_path: Path) -> None:
    """Mixup that never mixes (mix_prob 0) gives one-hot targets: the run matches the unmixed one
    (the loss to rounding, the training accuracy exactly), so soft targets count images, not
    classes, and the CE of one-hot targets is the CE of the labels."""
    root = photo_folder(tmp_path / "photos", train=4, test=2)
    stages = STUDENT.format(extra="").replace('{ name = "timm", model = "test_resnet" }', '"tiny_slimmable"')
    recipe = recipe_file(tmp_path, root, size=16, workers=0, epochs=1, stages=stages)
    records = []
    for name, augment in (("plain", '"imagenet"'), ("mixed", '{ name = "imagenet", mixup = 0.8, mix_prob = 0.0 }')):
        run = Run.start(recipe, tmp_path / name, overrides=[f"data.augment={augment}"], progress=False)
        run.execute()
        records.append(_metrics(tmp_path / name)[0])
    plain, mixed = records
    assert mixed["train_accuracy"] == plain["train_accuracy"]
    assert mixed["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
