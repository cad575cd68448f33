"""``kdreg export``: one sub-model of a run as a standalone network.

The sub-model's network comes from its backbone (:meth:`kdreg.FlexibleBackbone.export_submodel`):
a width as plain layers, an early exit truncated at its exit (everything up to it, the earlier
exits' heads included, as its anytime parameter count; only its own logits are returned), a plain
network (an STC student) as itself. Its parameters are the sub-model's ``count_params()``. :func:`export_submodel` loads a stage's selected weights, checks that the network
reproduces the sub-model's logits, and writes

- ``.pt2``: a ``torch.export`` program (load it with ``torch.export.load``; kdreg is not needed)
  that takes float images in [0, 1], ``[B, C, H, W]`` with any batch size, normalises them with
  the model's own mean and std (those it was trained or pretrained with: the data set's, or a
  pretrained configuration's; :mod:`kdreg.normalise`) and returns the logits ``[B, num_classes]``;
- ``.safetensors`` (``fmt="safetensors"``): the network's state dict, without the normalisation;

and a JSON file of the same stem beside it (:func:`describe`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from kdreg.backbone import FlexibleBackbone
from kdreg.errors import ExportError, UserError
from kdreg.measure import count_macs
from kdreg.normalise import input_stats

FORMATS = ("pt2", "safetensors")
FORMAT = "kdreg-export-1"
TOLERANCE = 1e-5


class Normalised(nn.Module):
    """``net((x - mean) / std)``: ``net`` fed with images in [0, 1]."""

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


def export_submodel(directory: str | Path, out: str | Path, *, label: str | None = None,
                    stage: str | None = None, fmt: str | None = None,
                    force: bool = False, calibrate: int | None = None) -> dict[str, Any]:
    """Write sub-model ``label`` (default: the full model) of ``stage`` (default: the run's last)
    of the run in ``directory`` to ``out`` as ``fmt`` (default: ``safetensors`` for a
    ``.safetensors`` file, else ``pt2``), and its description beside it; return the description.

    Refuses (:class:`UserError`) an unknown stage or label, a stage without selected weights or
    results, and an existing ``out`` or JSON file unless ``force``. Everything runs on the CPU.

    A universally slimmable stage (widths trained as a range) exports any width of its range
    (``label`` ``x0.6`` or ``0.6``; default: its largest), its BatchNorm statistics calibrated
    first on ``calibrate`` training images (default: the stage's ``train.calibrate_images``).
    """
    from kdreg.data.loading import load_data
    from kdreg.engine.run import Run
    from kdreg.rundirs import is_repeat, seed_dirs

    out = Path(out)
    fmt = fmt or ("safetensors" if out.suffix == ".safetensors" else "pt2")
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    meta = out.with_suffix(".json")
    if meta == out:
        raise UserError(f"--out {out} is where its description goes; give the network a .pt2 or "
                        ".safetensors name")
    for path in (out, meta):
        if path.exists() and not force:
            raise UserError(f"{path} exists; choose another --out or pass --force to overwrite it")
    seeds = seed_dirs(Path(directory)) if is_repeat(Path(directory)) else []
    if seeds:
        raise UserError(f"{directory} is a repeat of {len(seeds)} seed runs; export from one of "
                        f"them, e.g. {seeds[0]}")
    run = Run.resume(directory, progress=False)
    run.device = torch.device("cpu")
    names = [s.name for s in run.recipe.stages]
    stage = names[-1] if stage is None else stage
    if stage not in names:
        raise UserError(f"run {directory} has no stage {stage!r}; its stages: {', '.join(names)}")
    best = run.directory / "checkpoints" / stage / "best.pt"
    if not best.is_file():
        raise UserError(f"stage {stage!r} has no selected weights yet: {best} is missing")
    result = next((s for s in run.results.get("stages", []) if s.get("name") == stage), None)
    if result is None:
        raise UserError(f"stage {stage!r} has not finished: {run.directory / 'results.json'} has no "
                        f"entry for it (continue the run with `kdreg run --resume {directory}`)")
    # a stage learns only from earlier ones: the later ones need not be built
    run.recipe = attrs.evolve(run.recipe, stages=run.recipe.stages[:names.index(stage) + 1])
    splits = load_data(run.recipe.data)
    found = next(((plan, m) for plan, m in run.trained_stages(splits) if plan.name == stage),
                 None)
    plan, model = found if found is not None else (None, None)
    if model is None:
        raise UserError(f"stage {stage!r} cannot be loaded: an earlier stage has no selected "
                        "weights (checkpoints/<stage>/best.pt)")
    if getattr(model, "width_range", None) is not None:
        label, result = _range_width(run, plan, model, splits, label, result, calibrate)
    elif calibrate is not None:
        raise UserError(f"--calibrate: stage {stage!r} trains no width range; its BatchNorm "
                        "statistics are its own")
    labels = list(model.submodel_labels)
    label = labels[-1] if label is None else label
    if label not in labels:
        raise UserError(f"stage {stage!r} has no sub-model {label!r}; its sub-models: "
                        f"{', '.join(labels)}")
    index = labels.index(label)
    mean, std = input_stats(model) or (splits.mean, splits.std)  # the model's own statistics
    net = standalone(model, index, mean, std)
    info = describe(net, model, index, result, classes=splits.classes, mean=mean, std=std,
                    fmt=fmt)
    info.update(file=out.name, run=str(run.directory), recipe=run.recipe.name, stage=stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pt2":
        program = to_program(Normalised(net, mean, std).eval(),
                             (model.in_chans, *model.input_size))
        _atomic(out, lambda tmp: torch.export.save(program, tmp))
    else:
        _atomic(out, lambda tmp: save_safetensors(net, tmp, {"format": FORMAT, "label": label}))
    _atomic(meta, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    return info


def _range_width(run: Any, plan: Any, model: Any, splits: Any, label: str | None,
                 result: dict[str, Any], images: int | None) -> tuple[str, dict[str, Any]]:
    """Make width ``label`` (default: the range's largest) the model's one evaluated width and
    calibrate its statistics; return its label and the results of it that results.json holds
    (a width the run evaluated), else none."""
    from kdreg.calibrate import calibrate_on_training_images
    from kdreg.errors import OptionError
    from kdreg.streams import batch_seed

    r, stage = model.width_range, plan.name
    if label is None:
        width = r.max
    else:
        try:
            width = float(label.removeprefix("x"))
        except ValueError:
            raise UserError(f"stage {stage!r} trains the widths {r.min:g} to {r.max:g}; give a "
                            f"width in that range, e.g. --submodel x{r.max:g}, not {label!r}") from None
    try:
        model.set_eval_widths([width])
    except OptionError as exc:
        raise UserError(f"--submodel {label}: {exc} (stage {stage!r})") from None
    if images is not None and images < 1:
        raise UserError(f"--calibrate takes a number of training images >= 1, got {images}")
    count = images if images is not None else plan.train.calibrate_images
    calibrate_on_training_images(model, splits, images=count, batch_size=run.recipe.data.batch_size,
                                 device=run.device, seed=batch_seed(run.recipe.seed, plan.index))
    new = model.submodel_labels[0]
    known = list(result.get("submodels", []))
    own = {key: [values[known.index(new)]] for key, values in result.items()
           if new in known and isinstance(values, list) and len(values) == len(known)}
    return new, own


def standalone(model: FlexibleBackbone, index: int, mean: Sequence[float],
               std: Sequence[float]) -> nn.Module:
    """``model.export_submodel(index)``, in eval mode, checked to reproduce
    ``model.forward_submodel(x, index)`` on a random normalised batch (:class:`ExportError`
    otherwise)."""
    net = model.export_submodel(index).eval()
    label = model.submodel_labels[index]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, model.in_chans, *model.input_size, generator=gen)
    m = torch.tensor(list(mean)).view(1, -1, 1, 1)
    s = torch.tensor(list(std)).view(1, -1, 1, 1)
    x = (x - m) / s
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model.forward_submodel(x, index)
            try:
                got = net(x)
            except Exception as exc:  # noqa: BLE001 - the plugin's network; reported, not raised
                raise ExportError(f"the standalone network of sub-model {label!r} "
                                  f"({type(model).__name__}.export_submodel) fails: "
                                  f"{type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    if not isinstance(got, Tensor) or got.shape != want.shape:
        shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
        raise ExportError(f"the standalone network of sub-model {label!r} returns {shape}, "
                          f"not logits {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    if diff > TOLERANCE * (1.0 + float(want.abs().max())):
        raise ExportError(f"the standalone network of sub-model {label!r} does not reproduce its "
                          f"logits (largest difference {diff:.3g}); "
                          f"{type(model).__name__}.export_submodel is wrong")
    return net


def describe(net: nn.Module, model: FlexibleBackbone, index: int, result: dict[str, Any], *,
             classes: Sequence[str], mean: Sequence[float], std: Sequence[float],
             fmt: str) -> dict[str, Any]:
    """The JSON description of an exported sub-model: what it takes, what it returns, its
    parameters (results.json's count of that sub-model), the MACs of one image through it and
    results.json's (``run_macs``: for an early exit these count every earlier exit's head too,
    which the network holds but does not run) and test accuracy of that sub-model."""
    import kdreg

    size = (model.in_chans, *model.input_size)
    with torch.no_grad():
        macs = count_macs(lambda: net(torch.zeros(1, *size)))

    def of(key: str) -> Any:
        values = result.get(key)
        return values[index] if isinstance(values, list) and len(values) > index else None

    return {
        "format": FORMAT,
        "kdreg_version": kdreg.__version__,
        "file_format": fmt,
        "label": model.submodel_labels[index],
        "submodel_index": index,
        "classes": list(classes),
        "input_size": list(size),
        "input": ("float32 [B, C, H, W] in [0, 1], normalised inside" if fmt == "pt2" else
                  "float32 [B, C, H, W], normalised: (x - mean) / std on [0, 1] images"),
        "mean": list(mean),
        "std": list(std),
        "params": sum(p.numel() for p in net.parameters()),
        "macs": macs,
        "run_macs": of("macs"),
        "test_accuracy": of("test_accuracy"),
    }


def to_program(module: nn.Module, size: Sequence[int]) -> torch.export.ExportedProgram:
    """``module`` as a ``torch.export`` program with a dynamic batch dimension, checked to give
    the module's outputs."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, *size, generator=gen)
    batch = torch.export.Dim("batch")
    try:
        with torch.no_grad():
            program = torch.export.export(module, (x,), dynamic_shapes={"x": {0: batch}})
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported with its reason
        text = str(exc).strip().splitlines()
        raise ExportError(f"torch.export cannot trace the network: {type(exc).__name__}: "
                          f"{text[0] if text else ''}") from None
    with torch.no_grad():
        diff = float((program.module()(x) - module(x)).abs().max())
    if diff > TOLERANCE:
        raise ExportError(f"the exported program differs from the network by {diff:.3g}")
    return program


def save_safetensors(net: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """The network's state dict (every tensor its own copy) as a safetensors file."""
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def _atomic(path: Path, write: Any) -> None:
    """``write(tmp)`` then move ``tmp`` to ``path``: no half-written file is left at ``path``."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # same folder, same suffix
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
