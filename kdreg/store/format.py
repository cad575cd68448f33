"""A teacher store's files, opening and checking one, and what it depends on.

A store is a directory:

- ``manifest.json``: the format and version, K (``views``), the number of training images, the
  classes, the outputs held (graph node, stage, sub-model), their dtype and top-k, each file's
  dtype and shape, and ``depends``: every setting the stored pixels and outputs depend on
  (:func:`teacher_depends`, :func:`data_depends`), compared with a recipe key by key. It is
  written last: a directory without it is a store whose ``kdreg teach`` did not finish.
- ``params.i16``: int16 ``[N, K, 3]``, each (image, view)'s crop offsets (row, column, in the
  reflect-padded image) and horizontal flip: the in-memory path's augmentation, enough to rebuild
  the view's pixels exactly; on the streamed path ``crops.i32``: int32 ``[N, K, 5]``, each
  (image, view)'s RandomResizedCrop box (top, left, height, width, in the source image's pixels)
  and flip (:mod:`kdreg.store.streamed`).
- per output ``j``: ``out-j.<dtype>`` ``[N * K, classes]`` (full logits), or top-k:
  ``out-j.values.<dtype>`` ``[N * K, k + 1]`` (the k largest logits and the rest's value, see
  :func:`full_logits`) and ``out-j.indices.i16`` ``[N * K, k]`` (``.i32`` beyond 32,767 classes);
  row ``n * K + v`` is image ``n``'s view ``v``.

Every array is raw little-endian memory (:class:`RawArray`), read with ``os.pread`` a batch of
rows at a time (consecutive rows in one read), never mapped: a run never loads a store whole, and
its resident memory does not grow with the store.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from kdreg.engine.device import resolve_device, resolve_precision
from kdreg.errors import UserError
from kdreg.streams import stream_seed

FORMAT = "kdreg-teacher-store"
VERSION = 1
MANIFEST = "manifest.json"
PARAMS_FILE = "params.i16"
#: the columns of ``params.i16``
PARAMS = ("row", "col", "flip")
#: the streamed path's params: int32 ``[N, K, 5]``
CROPS_FILE = "crops.i32"
#: the columns of ``crops.i32``: the RandomResizedCrop box in the source image's pixels, the flip
CROPS = ("top", "left", "height", "width", "flip")
#: storage dtypes of the outputs, with their file suffixes
DTYPES: dict[str, tuple[str, np.dtype[Any]]] = {"float16": ("f16", np.dtype("<f2")),
                                                "float32": ("f32", np.dtype("<f4"))}
_NUMPY: dict[str, np.dtype[Any]] = {"int16": np.dtype("<i2"), "int32": np.dtype("<i4"), "float16": np.dtype("<f2"),
          "float32": np.dtype("<f4")}


def sha256_file(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def teacher_depends(stage: Any, train: Any, where: str) -> dict[str, Any]:
    """What a frozen teacher stage's outputs depend on: its backbone (name and options), its
    weights (the ``init`` file's SHA-256; a backbone's pretrained weights are named by its
    options) and that it trains no epoch. ``stage``: a :class:`kdreg.recipe.StageConfig`;
    ``train``: its effective training settings."""
    weights = "none"
    if stage.init is not None:
        path = Path(stage.init).expanduser()
        if not path.is_file():
            raise UserError(f"checkpoint {stage.init} does not exist @ {where}.init")
        weights = sha256_file(path)
    key = f"teachers.{stage.name}"
    return {f"{key}.backbone": jsonable(stage.backbone.to_dict()), f"{key}.weights": weights,
            f"{key}.epochs": int(train.epochs)}


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def run_depends(recipe: Any, stage_name: str) -> dict[str, Any]:
    """What the stored outputs depend on besides the teachers and the data: the precision the
    teachers ran at (the student stage's, on the recipe's device)."""
    stage = recipe.stage(stage_name)
    dtype = resolve_precision(recipe.stage_train(stage).precision, resolve_device(recipe.train.device))
    return {"precision": precision_name(dtype)}


def augment_description(padding: int) -> str:
    """The in-memory path's augmentation, as a store records it."""
    return f"in memory: {padding}-pixel reflect-pad random crop, horizontal flip p = 0.5"


def data_depends(dataset: str, images: Tensor, labels: Tensor, num_classes: int,
                 padding: int) -> dict[str, Any]:
    """What the stored pixels depend on: the data set's name, its training images (their count
    and a hash of their bytes and labels: the split and subset drawn included), their size and
    channels, the classes and the augmentation."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(images.contiguous().numpy().tobytes())
    digest.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return {"data.dataset": dataset, "data.train_images": len(labels),
            "data.train_hash": f"blake2b:{digest.hexdigest()}",
            "data.image_size": [int(images.shape[2]), int(images.shape[3])],
            "data.in_chans": int(images.shape[1]), "data.num_classes": int(num_classes),
            "data.augment": augment_description(padding)}


def full_logits(values: Tensor, indices: Tensor, classes: int) -> Tensor:
    """Logits ``[B, classes]`` from a top-k row: the k stored logits at their classes, every other
    class at the stored rest value ``r = logsumexp(other logits) - log(classes - k)`` (the last
    column of ``values``). At temperature 1 its softmax is the teacher's top-k probabilities
    exactly, with the remaining mass spread evenly over the other classes (FKD's soft label)."""
    out = values[:, -1:].expand(len(values), classes).clone()
    return out.scatter_(1, indices, values[:, :-1])


def topk_row(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(values [B, k + 1], indices [B, k])`` of float32 logits ``[B, C]``, ``k < C``: the k
    largest and the rest value :func:`full_logits` spreads over the other classes."""
    top = logits.topk(k, dim=1)
    rest = logits.scatter(1, top.indices, float("-inf"))
    value = torch.logsumexp(rest, dim=1, keepdim=True) - math.log(logits.shape[1] - k)
    return torch.cat([top.values, value], dim=1), top.indices


class RawArray:
    """A raw little-endian array file of ``dtype`` and ``shape``, read and written by rows with
    ``os.pread`` / ``os.pwrite`` (a row: everything after the first axis)."""

    def __init__(self, path: Path, dtype: str, shape: list[int]):
        self.path, self.dtype, self.shape = path, _NUMPY[dtype], tuple(int(d) for d in shape)
        self.row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        self._fd: int | None = None
        self._pid = 0

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.shape[0]

    def _handle(self, write: bool = False) -> int:
        if self._fd is None or self._pid != os.getpid():   # a forked process opens its own
            self._fd = os.open(self.path, (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY, 0o644)
            self._pid = os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``."""
        size = (stop - start) * self.row_bytes
        data = os.pread(self._handle(), size, start * self.row_bytes)
        if len(data) != size:
            raise OSError(f"{self.path} ends early: {len(data)} of {size} bytes at row {start}")
        return np.frombuffer(data, self.dtype).reshape(stop - start, *self.shape[1:])

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (sorted ascending), each run of consecutive rows in one read."""
        if len(index) == 0:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        cuts = np.flatnonzero(np.diff(index) != 1) + 1
        return np.concatenate([self.read(int(run[0]), int(run[-1]) + 1) for run in np.split(index, cuts)])

    def write(self, start: int, values: np.ndarray) -> None:
        """Rows ``start:start + len(values)``."""
        data = np.ascontiguousarray(values, self.dtype).tobytes()
        offset, fd = start * self.row_bytes, self._handle(write=True)
        while data:
            done = os.pwrite(fd, data, offset)
            data, offset = data[done:], offset + done

    def sync(self) -> None:
        """Flush what was written to the disk."""
        os.fsync(self._handle(write=True))


@attrs.define(eq=False)
class TeacherStore:
    """An open store (:func:`open_store`): its manifest and its arrays, memory-mapped."""

    path: Path
    manifest: dict[str, Any]
    #: int16 ``[N, K, 3]``
    params: RawArray
    #: (stage, sub-model index) -> (logits or top-k values, top-k indices or None)
    arrays: dict[tuple[str, int], tuple[RawArray, RawArray | None]]

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    @property
    def images(self) -> int:
        return int(self.manifest["images"])

    @property
    def classes(self) -> int:
        return int(self.manifest["classes"])

    @property
    def topk(self) -> int:
        return int(self.manifest["topk"] or 0)

    @property
    def padding(self) -> int:
        return int(self.manifest["padding"])

    @property
    def depends(self) -> dict[str, Any]:
        return dict(self.manifest["depends"])

    @property
    def stages(self) -> dict[str, tuple[str, ...]]:
        """The teacher stages whose outputs it holds -> their sub-models' labels."""
        return {name: tuple(labels) for name, labels in self.manifest["stages"].items()}

    def holds(self, stage: str, index: int) -> bool:
        return (stage, index) in self.arrays

    def outputs_held(self) -> list[str]:
        return [o["node"] for o in self.manifest["outputs"]]

    def differences(self, actual: Mapping[str, Any], where: str) -> list[str]:
        """One line per recorded dependency whose value in ``actual`` differs from the store's."""
        mine = self.depends
        lines = []
        for key, value in actual.items():
            theirs, ours = mine.get(key, "unrecorded"), jsonable(value)
            if theirs != ours:
                lines.append(f"teacher store {self.path} was built for {key} = {_short(theirs)}, this "
                             f"recipe has {_short(ours)}; build the store again for it @ {where}")
        return lines

    def views_of(self, seed: int, epoch: int) -> Tensor:
        """Which stored view every training image shows in ``epoch`` (int64 ``[N]``), drawn from
        ``stream_seed(seed, epoch, "views")``: the same on every process and on resume."""
        gen = torch.Generator().manual_seed(stream_seed(seed, int(epoch), "views"))
        return torch.randint(0, self.views, (self.images,), generator=gen)

    def view_rows(self, views: Tensor) -> Tensor:
        """The stored parameters (int64 ``[N, columns]``) of view ``views[n]`` of every image ``n``."""
        chosen, step = views.numpy(), 1 << 16
        rows = np.concatenate([   # read in chunks of images: the whole file is never in memory
            self.params.read(start, min(start + step, self.images))[
                np.arange(min(step, self.images - start)), chosen[start:start + step]]
            for start in range(0, self.images, step)]) if self.images else np.zeros((0, self.params.shape[2]))
        return torch.from_numpy(rows.astype(np.int64))

    def view_params(self, views: Tensor) -> tuple[Tensor, Tensor]:
        """The crop offsets ``[N, 2]`` (int64) and flips ``[N]`` (bool) of view ``views[n]`` of
        every image ``n`` (the in-memory path's store)."""
        p = self.view_rows(views)
        return p[:, :2].contiguous(), p[:, 2] != 0

    def outputs(self, rows: np.ndarray) -> dict[tuple[str, int], Tensor]:
        """float32 logits ``[len(rows), classes]`` of every held output at store rows ``rows``
        (``image * K + view``), read from the files (top-k rows made whole by :func:`full_logits`)."""
        order = np.argsort(rows, kind="stable")     # ascending reads; the batch's order restored
        back = torch.from_numpy(np.argsort(order, kind="stable"))
        wanted = rows[order]
        out = {}
        for key, (values, indices) in self.arrays.items():
            v = torch.from_numpy(values.rows(wanted).astype(np.float32))
            if indices is not None:
                v = full_logits(v, torch.from_numpy(indices.rows(wanted).astype(np.int64)), self.classes)
            out[key] = v[back]
        return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def open_store(path: str | Path, where: str) -> TeacherStore:
    """The store at ``path``, checked: complete (its manifest written), of this format and
    version, every file present with the size its manifest gives. Anything else is one
    :class:`UserError` line naming the store and ``where`` (the recipe key)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"teacher store {path} does not exist; build it with `kdreg teach RECIPE "
                        f"--stage STAGE --views K --out {path}` @ {where}")
    manifest_file = root / MANIFEST
    if not manifest_file.is_file():
        raise UserError(f"teacher store {path} is incomplete: it has no {MANIFEST} (its kdreg teach "
                        f"did not finish); build it again @ {where}")
    try:
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, not {FORMAT!r}")
        if manifest.get("version") != VERSION:
            raise ValueError(f"version {manifest.get('version')!r}; this kdreg reads version {VERSION}")
        if manifest.get("complete") is not True:
            raise ValueError("it is not marked complete")
        files = manifest["files"]
        arrays: dict[str, RawArray] = {}
        for name, spec in files.items():
            file = root / name
            size = file.stat().st_size if file.is_file() else None
            need = math.prod(spec["shape"]) * _NUMPY[spec["dtype"]].itemsize
            if size != need:
                raise ValueError(f"{name} holds {'no file' if size is None else f'{size} bytes'}, its "
                                 f"manifest says {need}")
            arrays[name] = RawArray(file, spec["dtype"], spec["shape"])
        held: dict[tuple[str, int], tuple[RawArray, RawArray | None]] = {}
        for out in manifest["outputs"]:
            held[(out["stage"], int(out["index"]))] = (arrays[out["values"]],
                                                      arrays[out["indices"]] if out.get("indices") else None)
        params = arrays[manifest.get("params_file", PARAMS_FILE)]
        for key in ("views", "images", "classes", "padding", "depends", "stages"):
            manifest[key]  # noqa: B018 - a missing key is a corrupt manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        why = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
        raise UserError(f"teacher store {path} is corrupt ({MANIFEST}: {why}); build it again @ "
                        f"{where}") from None
    return TeacherStore(root, manifest, params, held)
