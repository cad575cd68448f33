"""Training-step throughput of a backbone under each teacher graph, measured side by side.

    python benchmarks/step_throughput.py --backbone slimmable_mobilenet_v1 --batch 128

Prints images per second per graph and the ratio to training without distillation (``none``), so
the cost of the distillation terms is read off one run on one machine.
"""

from __future__ import annotations

import argparse
import time

import torch

import kdreg
from kdreg.engine.step import LossSettings, backward


def measure(model: kdreg.FlexibleBackbone, graph: kdreg.TeacherGraph, batch: int, steps: int,
            device: torch.device) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    settings = LossSettings(graph, lam=0.8, tau=1.0, divergence="ce")
    model.train()
    for i in range(steps + 1):
        if i == 1:  # the first step warms up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        backward(model, x, y, settings)
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="slimmable_mobilenet_v1")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--graphs", nargs="+", default=["none", "ipkd", "ipkd-ta-1", "ipkd-ta-m"])
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = kdreg.build_backbone(args.backbone, num_classes=10).to(device)
    print(f"{args.backbone} on {device}, batch {args.batch}, {model.num_submodels} sub-models, "
          f"{torch.get_num_threads()} CPU threads")
    base = None
    for name in args.graphs:
        rate = measure(model, kdreg.get_teacher_graph(name, model.num_submodels), args.batch, args.steps, device)
        base = base or rate
        print(f"  {name:10s} {rate:8.1f} img/s   x{rate / base:.3f} of {args.graphs[0]}")


if __name__ == "__main__":
    main()
