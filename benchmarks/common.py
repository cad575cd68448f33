"""What the figure families of ``benchmarks/run.py`` share: the run's settings, a figure, a
family's declaration, and the models, batches and trainer several families build.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

import kdreg
from kdreg.data import Splits, TensorSet, channel_stats
from kdreg.engine.step import LossSettings, Teachers
from kdreg.engine.trainer import StageTrainer
from kdreg.recipe import OptimizerConfig, ScheduleConfig, TrainConfig

NUM_CLASSES = 10
IPKD_LAM, IPKD_TAU = 0.5, 1.0  # the slimmable steps
LR = 0.1


@attrs.frozen
class Settings:
    device: torch.device
    batch: int = 128
    steps: int = 20
    warmup: int = 3
    size: int = 32
    images: int = 50_000
    loader_steps: int = 40
    data: str | None = None
    workers: int = 2                   # loader worker processes of the streamed figures
    stream_images: int = 2_000         # stream_loader_ratio's folder
    memory_images: tuple[int, int] = (2_000, 8_000)
    stream_rounds: int = 5
    memory_repeats: int = 3            # stream_memory_ratio's runs of each size
    vit_depth: int = 12                # the transformer figures' blocks (DeiT-Ti's 12)
    #: the trainer's ``train.channels_last`` (the trainer-based figures); None: the recipe default
    channels_last: bool | None = None


@attrs.define
class Figure:
    value: float | int | None
    note: str = ""
    details: dict[str, Any] = attrs.field(factory=dict)


#: what a family's job returns: its figures, in the order of the job's names
Measured = Figure | tuple[Figure, ...]


@attrs.frozen
class Job:
    """Figures measured together (one alternation, one model): their names, in the order
    ``measure(settings, workdir)`` returns them."""

    figures: tuple[str, ...]
    measure: Callable[[Settings, Path], Measured]


@attrs.frozen
class Family:
    """A family of figures: its jobs, run in this order, and ``targets``: figure -> (comparison,
    bound) of each figure judged (one it measures with no target is reported beside the others);
    ``relative``: figure -> the figure its bound is a multiple of (the bound: its number x that
    figure)."""

    jobs: tuple[Job, ...]
    targets: dict[str, tuple[str, float]]
    relative: dict[str, str] = attrs.field(factory=dict)

    @property
    def figures(self) -> tuple[str, ...]:
        return tuple(name for job in self.jobs for name in job.figures)


# ------------------------------------------------------------------------------ building blocks
def mobilenet(s: Settings) -> kdreg.FlexibleBackbone:
    torch.manual_seed(0)
    model = kdreg.build_backbone("slimmable_mobilenet_v1", num_classes=NUM_CLASSES,
                                 input_size=(s.size, s.size))
    return model.to(s.device).train()


def batch(s: Settings, seed: int = 0, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = size or s.size
    x = torch.randn(s.batch, 3, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (s.batch,), generator=g)
    return x.to(s.device), y.to(s.device)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4, nesterov=True)


def train_config(s: Settings) -> TrainConfig:
    """A recipe's defaults but for one epoch, SGD at lr 0.1, cosine, fp32."""
    layout = {} if s.channels_last is None else {"channels_last": s.channels_last}
    return TrainConfig(epochs=1, optimizer=OptimizerConfig(lr=LR, momentum=0.9, weight_decay=5e-4),
                       schedule=ScheduleConfig(name="cosine"), device="auto", precision="fp32",
                       **layout)


def synthetic_splits(n: int, size: int, seed: int = 0) -> Splits:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    mean, std = channel_stats(images[:5000])
    empty = TensorSet(images[:0], labels[:0])
    return Splits(TensorSet(images, labels), empty, empty, classes=[str(k) for k in range(NUM_CLASSES)],
                  mean=mean, std=std)


def trainer(s: Settings, model: kdreg.FlexibleBackbone, loss: LossSettings, directory: Path,
            teachers: Teachers | None = None, splits: Splits | None = None) -> StageTrainer:
    """The engine's stage trainer, as a run builds it (no progress bar, no files written)."""
    splits = splits or synthetic_splits(2 * s.batch, s.size)
    return StageTrainer(name="bench", model=model, splits=splits, train_cfg=train_config(s), loss=loss,
                        device=s.device, seed=0, batch_size=s.batch, eval_batch_size=s.batch,
                        directory=directory, notify=lambda record: None, progress=False,
                        teachers=teachers)


def ipkd_ta_m(n: int) -> LossSettings:
    return LossSettings(kdreg.get_teacher_graph("ipkd-ta-m", n), IPKD_LAM, IPKD_TAU)


def run_epoch(tr: StageTrainer, loader: Any) -> None:
    tr.train_loader = loader
    tr.train_epoch(0, 1)

