"""Started by torchrun from tests/test_distributed.py (real processes, the gloo backend).

    torchrun --nproc_per_node 2 tests/ddp_driver.py grads RECIPE OUT_FILE
        one training step's gradients (every BatchNorm in eval mode, so the combined batch gives
        the same gradients whatever the split) and how often each DDP bucket was all-reduced
    torchrun --nproc_per_node 2 tests/ddp_driver.py grads-train RECIPE OUT_FILE
        the same with the trained modules in train mode (BatchNorm normalises each process's
        shard by the shard's own statistics); each rank also writes the shard it trained on to
        OUT_FILE.rank<r>
    torchrun --nproc_per_node 2 tests/ddp_driver.py jobs JOBS_FILE
        each ``[mode, recipe, out]`` of the JSON list in JOBS_FILE in turn, in the same two
        processes (one process group; each job assembles its run afresh)
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from kdreg.data import load_data
from kdreg.engine import distributed
from kdreg.engine.assemble import DataShape, assemble
from kdreg.engine.run import Run
from kdreg.engine.step import stage_backward
from kdreg.stages import freeze

#: the trained modules of the last step (model, bridge, feature losses), for their buffers
STEPPED: list[torch.nn.Module] = []
#: the teacher store rows of the last step's batch (a stage with teacher_store)
ROWS: list[torch.Tensor] = []


def step_gradients(recipe_path: str, *, train_mode: bool = False,
                   batch: tuple[torch.Tensor, torch.Tensor] | None = None,
                   ) -> tuple[dict[str, torch.Tensor], dict[int, int]]:
    """The gradients of one step of the recipe's last stage (its model's and its bridge's; earlier
    stages frozen as they were built) and the number of all-reduces of each gradient bucket (empty
    in one process): :func:`step` without its batch."""
    grads, reduced, _ = step(recipe_path, train_mode=train_mode, batch=batch)
    return grads, reduced


def step(recipe_path: str, *, train_mode: bool = False, batch: tuple[torch.Tensor, torch.Tensor] | None = None,
         ) -> tuple[dict[str, torch.Tensor], dict[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """:func:`step_gradients` and the batch this process stepped on (on the CPU): ``batch`` when
    given, else this process's share of the first training batch. ``train_mode``: the trained
    modules in train mode (BatchNorm on the batch's own statistics); otherwise in eval mode
    (running statistics: the same gradients for any split of the batch)."""
    run = Run.start(recipe_path, Path("unused-run-dir"), progress=False)
    splits = load_data(run.recipe.data)
    plans = [p.to(run.device) for p in assemble(run.recipe, DataShape.of(splits), seed=run.recipe.seed)]
    for earlier in plans[:-1]:
        freeze(earlier.model)
    plan = plans[-1]
    trainer = run._trainer(plan, splits)
    reduced: Counter[int] = Counter()
    if trainer.runner.ddp is not None:
        def counting(state, bucket):  # type: ignore[no-untyped-def]  # (no string annotations: DDP checks them)
            reduced[bucket.index()] += 1
            return default_hooks.allreduce_hook(state, bucket)

        trainer.runner.ddp.register_comm_hook(None, counting)
    for module in plan.modules():
        module.train(train_mode)
    indices, teachers = None, trainer.teachers
    if batch is None:
        trainer.train_loader.set_epoch(0)
        x, y, *rest = next(iter(trainer.train_loader))
        if trainer.store is not None:            # the batch's rows of the teacher store
            ROWS.append(rest[0].cpu())
            teachers = trainer.store.at(rest.pop())
        indices = rest[0] if rest else None      # a feature loss that reads them (CRD)
    else:
        x, y = (t.to(run.device) for t in batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    stage_backward(trainer.runner, x, y, trainer.loss, teachers, indices)
    grads = {f"{k}.{n}": p.grad.detach().clone() for k, m in enumerate(plan.modules())
             for n, p in m.named_parameters() if p.grad is not None}
    STEPPED.append(torch.nn.ModuleList(plan.modules()))
    return grads, dict(reduced), (x.detach().cpu(), y.detach().cpu())


def main(mode: str, recipe: str, out: str) -> None:
    if mode in ("grads", "grads-train"):
        grads, reduced, shard = step(recipe, train_mode=mode == "grads-train")
        if mode == "grads-train":
            torch.save(shard, f"{out}.rank{distributed.rank()}")
        # the buffers the step changed in each process (CRD's memory banks)
        buffers = {name: b.detach().cpu().clone() for name, b in STEPPED[-1].named_buffers()}
        torch.save(buffers, f"{out}.buffers{distributed.rank()}")
        if ROWS:
            torch.save(ROWS[-1], f"{out}.rows{distributed.rank()}")
        if distributed.is_main():
            torch.save({"grads": grads, "reduced": reduced, "world": distributed.world_size()}, out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def jobs(path: str) -> None:
    """Every job of the JSON list at ``path``, in turn (see the module's docstring)."""
    for mode, recipe, out in json.loads(Path(path).read_text()):
        STEPPED.clear()
        ROWS.clear()
        main(mode, recipe, out)


if __name__ == "__main__":
    if sys.argv[1] == "jobs":
        jobs(sys.argv[2])
    else:
        main(*sys.argv[1:4])     # a failure ends this process at once: torchrun then stops the others
    distributed.shutdown()
