"""Training one stage: epochs, evaluation, model selection, checkpoints and metrics."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from tqdm import tqdm

from kdreg.backbone import FlexibleBackbone
from kdreg.data.batches import BatchLoader
from kdreg.data.loading import batches
from kdreg.data.splits import Splits, TensorSet
from kdreg.data.streaming import StreamLoader, StreamSet
from kdreg.engine import checkpoint, distributed, preempt
from kdreg.engine.evaluate import evaluate
from kdreg.engine.host_memory import keep_freed_memory
from kdreg.engine.optim import build_optimizer, lr_factor, set_lr
from kdreg.engine.runner import build_runner
from kdreg.engine.step import LossSettings, Teachers, stage_backward
from kdreg.errors import CheckpointError, KdregError
from kdreg.pointwise import guard_convs
from kdreg.recipe import TrainConfig, checkpoint_interval
from kdreg.store.replay import StoredTeachers
from kdreg.streams import stream_seed


class TrainingFailed(KdregError):
    """The run itself failed (exit code 1), e.g. the loss diverged."""


@attrs.define
class StageState:
    """What a stage carries from epoch to epoch (and into its checkpoint)."""

    epoch: int = 0                       # completed epochs
    best_epoch: int = 0                  # 1-based; 0: none yet
    best_val: list[float] = attrs.field(factory=list)
    seconds: float = 0.0
    step: int = 0                        # steps of epoch ``epoch + 1`` done (a mid-epoch checkpoint)


@attrs.define(slots=False)
class StageTrainer:
    name: str
    model: FlexibleBackbone
    splits: Splits
    train_cfg: TrainConfig
    loss: LossSettings
    device: torch.device
    seed: int
    batch_size: int
    eval_batch_size: int
    directory: Path
    notify: Callable[[dict[str, Any]], None]     # run events (after the checkpoint)
    progress: bool = True                        # a progress bar, when stderr is a terminal
    teachers: Teachers | None = None             # frozen earlier stages this stage learns from
    store: StoredTeachers | None = None          # a teacher store in their place (teacher_store)

    def __attrs_post_init__(self) -> None:
        s, cfg = self.splits, self.train_cfg
        #: the bridge and the feature losses' own parameters: trained with the model, saved and
        #: resumed with it, used at training only (never exported)
        self.extras = torch.nn.ModuleList(self.loss.trained_modules())
        trained = torch.nn.ModuleList([self.model, *self.extras]) if len(self.extras) else self.model
        self._trained = trained   # what the optimizer steps: its buffers are saved per process
        if self.device.type == "cpu":
            keep_freed_memory()
            guard_convs(trained)   # strided 1x1 convs of few channels: around a broken oneDNN kernel
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(trained, cfg.optimizer, self.device)
        world = distributed.world_size()
        self.train_loader: BatchLoader | StreamLoader
        if self.store is not None and isinstance(s.train, StreamSet):   # every image at a stored view
            assert s.streaming is not None
            self.train_loader = self.store.stream_loader(
                s.train, s.streaming, num_classes=s.num_classes, batch_size=self.batch_size // world,
                device=self.device, seed=self.seed, rank=distributed.rank(), world_size=world)
        elif self.store is not None:
            assert isinstance(s.train, TensorSet)
            self.train_loader = self.store.loader(s.train.images, s.train.labels,
                                                  batch_size=self.batch_size // world, device=self.device,
                                                  seed=self.seed, rank=distributed.rank(), world_size=world)
        else:
            self.train_loader = batches(s, "train", batch_size=self.batch_size // world, device=self.device,
                                        train=True, seed=self.seed, rank=distributed.rank(), world_size=world)
        if len(self.train_loader) == 0:
            raise TrainingFailed(f"stage {self.name}: no full training batch of {self.batch_size} images")
        self.train_loader.with_indices = self.loss.needs_indices
        self.runner = build_runner(self.model, self.loss.bridge, self.device, features=self.loss.features,
                                   sync_bn=cfg.sync_bn, compile=cfg.compile, compile_backend=cfg.compile_backend)
        self.state = StageState()
        self._calibration: BatchLoader | StreamLoader | None = None   # made at the first calibration
        steps, seconds = checkpoint_interval(cfg.checkpoint_every)
        self.clock = preempt.CheckpointClock(steps, seconds)
        #: the epoch in progress as a mid-epoch checkpoint left it (this process's sums and time)
        self._partial: dict[str, Any] | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.directory / "checkpoints" / self.name

    def eval_loader(self, part: str) -> BatchLoader | StreamLoader:
        return eval_loader(self.splits, part, self.eval_batch_size, self.device)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, filename: str, **content: Any) -> None:
        """Write ``checkpoints/<stage>/<filename>``: rank 0 alone (the others read it after a barrier)."""
        if distributed.is_main():
            checkpoint.save(self.checkpoint_dir / filename, stage=self.name, **content)

    def save_last(self, partial: dict[str, Any] | None = None) -> None:
        """``last.pt``: everything the stage's future depends on. ``partial``: this process's
        sums of the epoch in progress (a mid-epoch checkpoint). Every process gives its own
        random streams, sums and (under torchrun) buffers, which are not the same everywhere
        inside an epoch; rank 0 writes them all."""
        mine: dict[str, Any] = {"rng": checkpoint.rng_state(), "partial": partial}
        if distributed.world_size() > 1:   # BatchNorm statistics differ until the epoch's average
            mine["buffers"] = {k: b.detach().cpu().clone() for k, b in self._trained.named_buffers()
                               if b.is_floating_point()}
        ranks = distributed.all_gather(mine)
        self._save("last.pt", model=self.model.state_dict(),
                   optimizer=self.optimizer.state_dict(), state=attrs.asdict(self.state),
                   rng=ranks[0]["rng"], ranks=ranks,
                   scaler=self.loss.scaler.state_dict() if self.loss.scaler else None,
                   bridge=self.loss.bridge.state_dict() if self.loss.bridge is not None else None,
                   feature_losses=[e.loss.state_dict() for e in self.loss.features])
        self.clock.saved()

    def resume(self) -> None:
        data = checkpoint.load(self.checkpoint_dir / "last.pt")
        self.model.load_state_dict(data["model"])
        if self.loss.bridge is not None and data.get("bridge") is not None:
            self.loss.bridge.load_state_dict(data["bridge"])
        for edge, state in zip(self.loss.features, data.get("feature_losses") or []):
            edge.loss.load_state_dict(state)
        self.optimizer.load_state_dict(data["optimizer"])
        self.state = StageState(**data["state"])
        ranks, world = data.get("ranks"), distributed.world_size()
        mine = ranks[distributed.rank()] if ranks is not None and len(ranks) == world else None
        if self.state.step and mine is None:
            raise CheckpointError(
                f"{self.checkpoint_dir / 'last.pt'} stopped inside epoch {self.state.epoch + 1} "
                f"(step {self.state.step}) with {len(ranks or [None])} process(es); resume it with as "
                f"many (kdreg run --nproc {len(ranks or [None])}), not {world}")
        checkpoint.set_rng_state(mine["rng"] if mine is not None else data["rng"])
        if mine is not None and mine.get("buffers"):
            buffers = dict(self._trained.named_buffers())
            for key, value in mine["buffers"].items():
                buffers[key].copy_(value)
        self._partial = mine.get("partial") if mine is not None else None
        if self.loss.scaler is not None and data.get("scaler"):
            self.loss.scaler.load_state_dict(data["scaler"])

    # ------------------------------------------------------------------ loop
    def fit(self) -> StageState:
        epochs = self.train_cfg.epochs
        has_val = len(self.splits.val.labels) > 0
        val_loader = self.eval_loader("val") if has_val else None
        while self.state.epoch < epochs:
            epoch = self.state.epoch
            t0 = time.perf_counter() - (self._partial or {}).get("seconds", 0.0)
            train = self.train_epoch(epoch, epochs, t0)
            self.calibrate()
            val = evaluate(self.model, val_loader, device=self.device, dtype=self.loss.dtype) if val_loader else []
            self.state.seconds += time.perf_counter() - t0
            self.state.epoch, self.state.step = epoch + 1, 0
            mean_val = sum(val) / len(val) if val else None
            improved = mean_val is not None and (not self.state.best_val or mean_val > _mean(self.state.best_val))
            if improved or not has_val:
                self.state.best_epoch, self.state.best_val = epoch + 1, val
                self._save("best.pt", epoch=epoch + 1, model=self.model.state_dict())
            record = {"stage": self.name, "epoch": epoch + 1, **train, "val_accuracy": val,
                      "mean_val_accuracy": mean_val, "best_epoch": self.state.best_epoch,
                      "seconds": round(time.perf_counter() - t0, 3)}
            self.save_last()
            self.notify(record)                      # run events: the loggers write the record
            if preempt.stop_agreed():                # a signal during the epoch's evaluation
                raise preempt.stopped(f"stage {self.name}: after epoch {epoch + 1} of {epochs}")
        return self.state

    def train_epoch(self, epoch: int, epochs: int, started: float | None = None) -> dict[str, Any]:
        """Train epoch ``epoch`` (0-based) from the step ``state.step`` a mid-epoch checkpoint
        left it at; ``started``: when the epoch began (``time.perf_counter()``; default now)."""
        model, loader, opt = self.model, self.train_loader, self.optimizer
        model.train()
        self.extras.train()
        first = self.state.step
        loader.set_epoch(epoch, skip=first)
        steps = len(loader)
        base_lr = self.train_cfg.optimizer.lr
        partial, self._partial = self._partial or {}, None
        loss_sum = partial["loss_sum"].to(self.device) if partial else torch.zeros((), device=self.device)
        correct = (partial["correct"].to(self.device) if partial else
                   torch.zeros(model.num_train_submodels, dtype=torch.long, device=self.device))
        seen = int(partial.get("seen", 0))
        world = distributed.world_size()
        channels_last = self.train_cfg.channels_last
        bar = tqdm(total=steps, initial=first, desc=f"{self.name} {epoch + 1}/{epochs}", unit="batch",
                   leave=False, file=sys.stderr, dynamic_ncols=True,
                   disable=not (self.progress and distributed.is_main() and stderr_is_terminal()))
        t0 = time.perf_counter() if started is None else started
        lr = base_lr
        loss = attrs.evolve(self.loss, epoch=epoch + 1)   # the epoch reaches warm-ups (DKD's)
        for step, (x, y, *indices) in enumerate(loader, start=first):
            teachers = self.teachers if self.store is None else self.store.at(indices.pop())
            lr = base_lr * lr_factor(self.train_cfg.schedule, epoch + step / steps, epochs)
            set_lr(opt, lr)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            model.begin_step(stream_seed(self.seed, epoch, "submodels", step))  # the same on every process
            out = stage_backward(self.runner, x, y, loss, teachers, indices[0] if indices else None)
            if self.loss.scaler is not None:
                self.loss.scaler.step(opt)
                self.loss.scaler.update()
            else:
                opt.step()
            loss_sum += out.loss
            correct += out.correct
            seen += len(y) * world               # images (y is [B, classes] under mixup)
            if (step + 1) % self.train_cfg.log_interval == 0 or step + 1 == steps:
                # every process reads the mean over all of them: a loss that diverges anywhere
                # stops every process at the same step
                mean_loss = (distributed.all_reduce_sum(loss_sum.clone()) / (world * (step + 1))).item()
                if not math.isfinite(mean_loss):
                    bar.close()
                    raise TrainingFailed(
                        f"stage {self.name}: the loss became {mean_loss} in epoch {epoch + 1}, step {step + 1}; "
                        "lower the learning rate or check the data"
                    )
                bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}", lr=f"{lr:.3g}")
            bar.update(1)
            save, stop = self.clock.after_step(step + 1, steps)
            if save:
                self.state.step = step + 1
                self.save_last(partial={"loss_sum": loss_sum.detach().cpu(), "correct": correct.cpu(),
                                        "seen": seen, "seconds": time.perf_counter() - t0})
            if stop:
                bar.close()
                raise preempt.stopped(f"stage {self.name}: epoch {epoch + 1} of {epochs}, step {step + 1} "
                                      f"of {steps}")
        bar.close()
        distributed.average_buffers(model)
        if self.loss.bridge is not None:
            distributed.average_buffers(self.loss.bridge)
        totals = distributed.all_reduce_sum(torch.cat([loss_sum.view(1), correct.to(loss_sum.dtype)]))
        elapsed = time.perf_counter() - t0
        return {
            "lr": lr,
            "train_loss": (totals[0] / (world * steps)).item(),
            "train_accuracy": [100.0 * c / seen for c in totals[1:].tolist()],
            "images_per_second": round(seen / elapsed, 1),
        }

    def calibrate(self) -> None:
        """Recompute the normalisation statistics of the evaluated sub-models on
        ``train.calibrate_images`` training images, when the model needs it (widths trained as a
        range: :meth:`kdreg.FlexibleBackbone.needs_calibration`)."""
        if not self.model.needs_calibration():
            return
        from kdreg.calibrate import calibrate, calibration_batches

        world = distributed.world_size()
        if self._calibration is None:   # made once: its images move to the device once
            self._calibration = calibration_batches(self.splits, batch_size=self.batch_size // world,
                                                    device=self.device, seed=self.seed,
                                                    rank=distributed.rank(), world_size=world)
        self._calibration.set_epoch(0)   # the same batches at every calibration
        calibrate(self.model, self._calibration, max(1, self.train_cfg.calibrate_images // world))
        distributed.average_buffers(self.model)

    def load_best(self) -> None:
        """Put the selected epoch's weights into the model (what later stages and the test use)."""
        distributed.barrier()  # rank 0 has written it
        self.model.load_state_dict(checkpoint.load(self.checkpoint_dir / "best.pt")["model"])

    def test(self) -> list[float]:
        return evaluate(self.model, self.eval_loader("test"), device=self.device, dtype=self.loss.dtype)

    def load_only(self) -> StageState:
        """A stage that is loaded, not trained (``epochs = 0``): its weights as they are are the
        selected ones, evaluated on the validation split."""
        has_val = len(self.splits.val.labels) > 0
        self.calibrate()
        val = evaluate(self.model, self.eval_loader("val"), device=self.device,
                       dtype=self.loss.dtype) if has_val else []
        self.state = StageState(epoch=0, best_epoch=0, best_val=val)
        self._save("best.pt", epoch=0, model=self.model.state_dict())
        return self.state


def eval_loader(splits: Splits, part: str, batch_size: int, device: torch.device) -> BatchLoader | StreamLoader:
    """Fixed-order, unaugmented batches of ``splits.<part>`` (``val`` or ``test``) on ``device``,
    unnormalised (each model normalises its own input); this process's shard under torchrun."""
    return batches(splits, part, batch_size=batch_size, device=device, train=False, seed=0,
                   rank=distributed.rank(), world_size=distributed.world_size())


def stderr_is_terminal() -> bool:
    """Whether the progress bar can redraw in place: not into a pipe or a file (CI, nohup, a log),
    where the console's line per epoch is the progress."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed
        return False


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
