"""Untrusted files never run code: checkpoints are read weights-only, archives and images checked.

Every malicious checkpoint here is a real pickle whose unpickling would run a shell command that
creates a marker file; each test checks the command is refused (exit 2, a line naming the file
and the global it would import) and that the marker never appears.
"""

from __future__ import annotations

import io
import os
import random
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdreg import plugins
from kdreg.cli import main
from kdreg.engine import checkpoint
from kdreg.engine.run import Run
from kdreg.errors import CheckpointError, DataError
from kdreg.hookspecs import hookimpl
from kdreg_plugins import datasets as builtin

ROOT = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling this runs ``touch <marker>`` through the shell."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def write_malicious(path: Path, marker: Path) -> None:
    """A checkpoint as kdreg writes them (a torch zip file), whose model entry runs a command."""
    torch.save({"format": checkpoint.FORMAT, "model": Payload(marker)}, path)


def refused(capsys: pytest.CaptureFixture[str], path: Path, marker: Path, where: str = "") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert f"checkpoint {path} is not weights-only: it would import posix.system" in lines[0], err
    assert "--trust-checkpoints" in lines[0]
    assert where in lines[0]
    assert "Traceback" not in err
    assert not marker.exists(), "the checkpoint ran its command"
    return lines[0]


TEACHER = """
name = "init"
[data]
dataset = "synthetic"
batch_size = 32
val_split = 32
options = {{ train_size = 128, test_size = 32, num_classes = 4, image_size = 16 }}
[train]
epochs = 1
[[stages]]
name = "teacher"
backbone = {{ name = "resnet8" }}
init = "{init}"
epochs = 0
"""


def test_a_malicious_init_is_refused_at_validate_and_run(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    marker, evil = tmp_path / "marker", tmp_path / "teacher.pt"
    write_malicious(evil, marker)
    recipe = tmp_path / "r.toml"
    recipe.write_text(TEACHER.format(init=evil))
    assert main(["validate", str(recipe)]) == 2
    refused(capsys, evil, marker, "@ recipe.stages.teacher.init")
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    refused(capsys, evil, marker, "@ recipe.stages.teacher.init")
    assert not (tmp_path / "out").exists()


def test_a_plain_pickle_is_refused_naming_its_global(tmp_path: Path) -> None:
    import pickle

    marker, evil = tmp_path / "marker", tmp_path / "state.pkl"
    evil.write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=4))
    with pytest.raises(CheckpointError, match="it would import posix.system"):
        checkpoint.load(evil)
    assert checkpoint.unsafe_globals(evil) == ["posix.system"]
    assert not marker.exists()


def test_init_accepts_safetensors_and_plain_state_dicts(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    import kdreg

    model = kdreg.build_backbone("resnet8", num_classes=4)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        fresh = kdreg.build_backbone("resnet8", num_classes=4)
        checkpoint.load_weights(fresh, tmp_path / name)
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, state[key]), (name, key)
        recipe = tmp_path / f"{name}.toml"
        recipe.write_text(TEACHER.format(init=tmp_path / name))
        assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="broken.safetensors is not a readable safetensors file"):
        checkpoint.load(tmp_path / "broken.safetensors")


def test_an_old_checkpoint_needs_the_explicit_opt_in(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint as earlier kdreg versions wrote it (numpy's RNG state inside) is refused,
    and read with --trust-checkpoints, which says what it allows."""
    import kdreg

    model = kdreg.build_backbone("resnet8", num_classes=4)
    old = tmp_path / "old.pt"
    torch.save({"format": checkpoint.FORMAT, "model": model.state_dict(),
                "rng": {"numpy": np.random.get_state(), "python": random.getstate()}}, old)
    recipe = tmp_path / "r.toml"
    recipe.write_text(TEACHER.format(init=old))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "it would import numpy." in err and "@ recipe.stages.teacher.init" in err, err
    try:
        assert main(["validate", str(recipe), "--trust-checkpoints"]) == 0
    finally:
        checkpoint.trust_checkpoints(False)
    err = capsys.readouterr().err
    assert f"--trust-checkpoints: reading {old} with Python's full unpickler" in err
    assert "it can run any code the file holds" in err


def test_the_rng_state_is_weights_only_and_restores_every_stream(tmp_path: Path) -> None:
    path = tmp_path / "rng.pt"
    random.random()
    np.random.standard_normal(3)  # a cached gaussian is part of numpy's state
    checkpoint.save(path, rng=checkpoint.rng_state())
    expected = (torch.rand(4), [random.random() for _ in range(4)], np.random.standard_normal(4))
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    state = torch.load(path, weights_only=True)["rng"]  # plain types only
    checkpoint.set_rng_state(state)
    again = (torch.rand(4), [random.random() for _ in range(4)], np.random.standard_normal(4))
    assert torch.equal(expected[0], again[0])
    assert expected[1] == again[1]
    assert np.array_equal(expected[2], again[2])


# ------------------------------------------------------------------------------------ run dirs

SMOKE = """
name = "smoke"
[data]
dataset = "synthetic"
batch_size = 32
val_split = 32
options = { train_size = 128, test_size = 32, num_classes = 4, image_size = 16 }
[train]
epochs = 2
optimizer = { lr = 0.05 }
[[stages]]
name = "student"
backbone = { name = "resnet8" }
"""


class StopAfterOneEpoch:
    @hookimpl
    def kdreg_epoch_finished(self, run, stage, record):  # type: ignore[no-untyped-def]
        if record["epoch"] == 1:
            raise KeyboardInterrupt


@pytest.fixture
def interrupted_run(tmp_path: Path) -> Path:
    """A run stopped after its first of two epochs: last.pt and best.pt on disk, results too."""
    recipe = tmp_path / "smoke.toml"
    recipe.write_text(SMOKE)
    plugins.reset(plugins.make_plugin_manager(extra=[StopAfterOneEpoch()]))
    try:
        with pytest.raises(KeyboardInterrupt):
            Run.start(recipe, tmp_path / "run", progress=False).execute()
    finally:
        plugins.reset()
    return tmp_path / "run"


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    recipe = tmp_path / "smoke.toml"
    recipe.write_text(SMOKE)
    Run.start(recipe, tmp_path / "run", progress=False).execute()
    return tmp_path / "run"


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_replaced_last_checkpoint_stops_resume_and_loses_nothing(
        interrupted_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = interrupted_run.parent / "marker"
    last = interrupted_run / "checkpoints" / "student" / "last.pt"
    write_malicious(last, marker)
    before = _files(interrupted_run)
    assert main(["run", "--resume", str(interrupted_run), "--no-progress"]) == 2
    refused(capsys, last, marker)
    assert _files(interrupted_run) == before


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_replaced_best_checkpoint_is_refused_by_eval_and_export(
        finished_run: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    interrupted_run = finished_run
    marker = interrupted_run.parent / "marker"
    best = interrupted_run / "checkpoints" / "student" / "best.pt"
    write_malicious(best, marker)
    before = _files(interrupted_run)
    extra = ["--out", str(interrupted_run.parent / "model.pt2")] if command == "export" else []
    assert main([command, str(interrupted_run), *extra]) == 2
    refused(capsys, best, marker)
    assert _files(interrupted_run) == before
    assert not (interrupted_run.parent / "model.pt2").exists()


def test_kdregs_own_checkpoints_are_weights_only(interrupted_run: Path) -> None:
    for name in ("last.pt", "best.pt"):
        data = torch.load(interrupted_run / "checkpoints" / "student" / name, weights_only=True)
        assert data["format"] == checkpoint.FORMAT and data["model"]


# ------------------------------------------------------------------------------------ archives

def _png_bytes(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


BAD_MEMBERS = {
    "parent path": ("train/a/../../../evil.png", tarfile.REGTYPE, ""),
    "absolute path": ("/tmp/kdreg-evil.png", tarfile.REGTYPE, ""),
    "symbolic link": ("train/a/link.png", tarfile.SYMTYPE, "/etc/passwd"),
    "hard link": ("train/a/hard.png", tarfile.LNKTYPE, "train/a/0.png"),
    "character device": ("train/a/dev.png", tarfile.CHRTYPE, ""),
    "block device": ("train/a/blk.png", tarfile.BLKTYPE, ""),
    "fifo": ("train/a/fifo.png", tarfile.FIFOTYPE, ""),
}


@pytest.mark.parametrize("case", list(BAD_MEMBERS))
def test_a_crafted_archive_is_refused_and_writes_nothing_outside(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name, kind, link = BAD_MEMBERS[case]
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDREG_CACHE", str(cache))
    archive = tmp_path / "data" / "evil.tar"
    archive.parent.mkdir()
    png = _png_bytes()
    with tarfile.open(archive, "w") as tar:
        for member in ("train/a/0.png", "test/a/0.png"):  # good members first: extraction starts
            info = tarfile.TarInfo(member)
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        if kind == tarfile.REGTYPE:
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
        else:
            tar.addfile(info)
    outside = {p for p in Path("/tmp").glob("kdreg-evil*")}
    with pytest.raises(DataError) as exc:
        builtin.imagefolder(root=archive)
    assert str(exc.value).count("\n") == 0
    assert f"refusing to extract {archive}: member {name!r}" in str(exc.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")
                  if p.is_file()) == [Path("data/evil.tar")], "something was extracted"
    assert {p for p in Path("/tmp").glob("kdreg-evil*")} == outside


# ------------------------------------------------------------------------------------ images

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds a few bytes of data: what a
    decompression bomb looks like to a reader before it decodes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _folder_with(tmp_path: Path, bad: bytes) -> Path:
    root = tmp_path / "images"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "0.png").write_bytes(_png_bytes())
    (root / "train" / "a" / "1.png").write_bytes(bad)
    return root


def test_an_image_bomb_is_refused_naming_the_file(tmp_path: Path) -> None:
    root = _folder_with(tmp_path, _png_header_only(60_000, 60_000))
    with pytest.raises(DataError) as exc:
        builtin.imagefolder(root=root, use_cache=False)
    message = str(exc.value)
    assert message.count("\n") == 0
    assert f"image {root / 'train' / 'a' / '1.png'} has 60000x60000 = 3,600,000,000 pixels" in message
    assert "max_image_pixels" in message


def test_the_image_pixel_limit_is_an_option(tmp_path: Path) -> None:
    root = _folder_with(tmp_path, _png_bytes(8))
    with pytest.raises(DataError, match=r"0\.png has 8x8 = 64 pixels, more than the limit of 63"):
        builtin.imagefolder(root=root, use_cache=False, max_image_pixels=63)
    data = builtin.imagefolder(root=root, use_cache=False, max_image_pixels=64)
    assert len(data.train_labels) == 2


# ------------------------------------------------------------------------------------ recipes

ESCAPE = SMOKE.replace('name = "smoke"', 'name = "../../escaped"').replace(
    'name = "student"', 'name = "a/../../../stage"')


def test_names_cannot_lead_out_of_the_run_directory(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The run's and the stages' names become folder names; none may leave the run directory."""
    recipe = tmp_path / "work" / "r.toml"
    recipe.parent.mkdir()
    recipe.write_text(ESCAPE)
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "run name '../../escaped' names a folder of the run directory" in err and "@ recipe.name" in err
    assert "stage name 'a/../../../stage' names a folder" in err and "@ recipe.stages[0].name" in err
    cwd = os.getcwd()
    os.chdir(recipe.parent)
    try:
        assert main(["run", str(recipe), "--no-progress"]) == 2
    finally:
        os.chdir(cwd)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [Path("work"), Path("work/r.toml")]


def test_no_recipe_string_reaches_a_shell() -> None:
    """kdreg starts processes only through torchrun's agent, run in-process (``kdreg run --nproc``:
    an argument list, no shell), and a SLURM task's ``kdreg run`` (``kdreg submit``: the argument
    list ``[python, "-m", "kdreg", "run", ...]``, no shell); it evaluates no string as code: a
    recipe's strings can name files and plugins, never run a command."""
    import ast

    from kdreg.slurm import run_command

    command = run_command(Path("r.toml"), Path("out"), ["data.root=$(touch x)"], "USR2")
    assert command[:5] == [sys.executable, "-m", "kdreg", "run", "r.toml"]
    assert "--set=data.root=$(touch x)" in command      # one argument, never parsed by a shell

    found = []
    for path in sorted([*(ROOT / "kdreg").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            where = f"{path.relative_to(ROOT)}:{node.lineno} {func}"
            if func in ("eval", "exec", "os.system", "os.popen", "compile") or func.startswith("os.exec"):
                found.append(where)
            if func.startswith("subprocess."):
                shell = [k for k in node.keywords if k.arg == "shell"]
                if shell or not node.args or isinstance(node.args[0], ast.Constant | ast.JoinedStr):
                    found.append(where)
                else:
                    found.append(f"{path.relative_to(ROOT)} {func}")
    # the SLURM task's child: run_command's argument list (above)
    assert found == ["kdreg/slurm.py subprocess.Popen"], found


def test_a_malicious_timm_weights_file_is_refused(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """What a built-in plugin loads is read weights-only too: timm's ``pretrained_file``."""
    marker, evil = tmp_path / "marker", tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": Payload(marker)}, evil)
    recipe = tmp_path / "r.toml"
    recipe.write_text(TEACHER.format(init="").replace('init = ""\n', "").replace(
        '{ name = "resnet8" }', f'{{ name = "timm", model = "resnet18", pretrained_file = "{evil}" }}'))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "posix.system" in err and str(evil) in err, err
    assert "@ recipe.stages.teacher.backbone.pretrained_file" in err
    assert not marker.exists()
