"""Precision, memory format, compilation and host synchronisation of the training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdreg
from kdreg.engine.run import Run
from kdreg.engine.step import LossSettings, stage_backward


def _logits(seed: int, n: int, batch: int, classes: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(4 * torch.randn(batch, classes, generator=g)).requires_grad_() for _ in range(n)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 5), graph=st.sampled_from(["ipkd", "ipkd-ta-1", "ipkd-ta-m"]),
       tau=st.floats(1.0, 6.0), divergence=st.sampled_from(["kl", "ce"]))
def test_the_loss_and_its_gradient_are_fp32_under_bf16_autocast(seed: int, n: int, graph: str, tau: float,
                                                                  divergence: str) -> None:
    """The graph loss is computed in fp32 whatever the step's autocast: the same value and the
    same gradient as outside autocast (under bf16, an einsum would otherwise run in bf16)."""
    g = kdreg.get_teacher_graph(graph, n)
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(seed))
    results = []
    for amp in (False, True):
        logits = _logits(seed, n, 16, 10)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = kdreg.distillation_loss(logits, labels, g, lam=0.7, tau=tau, divergence=divergence)
        loss.backward()
        assert loss.dtype == torch.float32
        results.append((loss.detach(), [a.grad for a in logits]))
    (l32, g32), (l16, g16) = results
    torch.testing.assert_close(l16, l32, rtol=1e-6, atol=1e-6)
    for a, b in zip(g16, g32):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_single_pass_bf16_step_logs_the_fp32_loss_of_its_logits() -> None:
    """An early-exit step under bf16: the model runs in bf16, the loss it logs is the fp32 graph
    loss of the (upcast) logits."""
    torch.manual_seed(0)
    model = kdreg.build_backbone("tiny_exits", num_classes=10)
    graph = kdreg.get_teacher_graph("ipkd-ta-m", model.num_submodels)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = stage_backward(model, x, y, LossSettings(graph, 0.8, 3.0, dtype=torch.bfloat16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits[0].dtype == torch.bfloat16
    expected = kdreg.distillation_loss([a.float() for a in logits], y, graph, lam=0.8, tau=3.0)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)


def test_fp16_without_cuda_exits_2_and_writes_nothing(smoke_recipe, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from kdreg.cli import main

    assert main(["run", str(smoke_recipe(epochs=1)), "--out", str(tmp_path / "run"),
                 "--set", "train.precision=fp16", "--set", "train.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "precision 'fp16' needs a CUDA device" in err and "@ recipe.train.precision" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_bf16_cpu_run_trains_and_evaluates(smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = smoke_recipe(epochs=2, backbone="tiny_exits", extra="")
    path.write_text(path.read_text().replace("log_interval = 2", 'log_interval = 2\nprecision = "bf16"'))
    results = Run.start(path, tmp_path / "run", progress=False).execute()
    stage = results["stages"][0]
    assert len(stage["test_accuracy"]) == 3 and all(0 <= a <= 100 for a in stage["test_accuracy"])
    losses = [json.loads(m)["train_loss"] for m in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[1] < losses[0]   # it learns


def _with_train_keys(path: Path, keys: str) -> Path:
    path.write_text(path.read_text().replace("log_interval = 2", "log_interval = 2\n" + keys))
    return path


def _losses(directory: Path) -> list[float]:
    return [json.loads(m)["train_loss"] for m in (directory / "metrics.jsonl").read_text().splitlines()]


def test_channels_last_trains_the_same_model(smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    plain = Run.start(_with_train_keys(smoke_recipe(epochs=1), "channels_last = false"), tmp_path / "plain",
                      progress=False).execute()
    run = Run.start(_with_train_keys(smoke_recipe(epochs=1, extra=" "), "channels_last = true"),
                    tmp_path / "cl", progress=False)
    cl = run.execute()
    conv = next(m for m in run.plans[0].model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.shape[1] > 1
    assert _losses(tmp_path / "cl") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-4)
    assert cl["stages"][0]["params"] == plain["stages"][0]["params"]


def test_compile_traces_the_step_and_falls_back_with_a_message(smoke_recipe, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    plain = smoke_recipe(epochs=1, backbone="tiny_exits")
    Run.start(plain, tmp_path / "plain", progress=False).execute()
    torch._dynamo.reset()
    compiled = _with_train_keys(smoke_recipe(epochs=1, backbone="tiny_exits", extra=" "),
                                'compile = true\ncompile_backend = "eager"')
    torch._dynamo.utils.counters.clear()
    Run.start(compiled, tmp_path / "compiled", progress=False).execute()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1   # dynamo traced the model
    assert "torch.compile" not in capsys.readouterr().err
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-5)
    broken = _with_train_keys(smoke_recipe(epochs=1, backbone="tiny_exits", extra="  "),
                              'compile = true\ncompile_backend = "no-such-backend"')
    Run.start(broken, tmp_path / "broken", progress=False).execute()
    err = capsys.readouterr().err
    assert "torch.compile (backend 'no-such-backend') failed" in err and "training without it" in err
    assert _losses(tmp_path / "broken") == _losses(tmp_path / "plain")


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.numpy,
             torch.Tensor.cpu, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in self.READS:
            self.reads.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_a_host_read() -> None:
    with HostReads() as mode:
        if torch.ones(2).any():
            pass
    assert mode.reads == ["__bool__"]


@pytest.mark.parametrize("backbone, graph", [("tiny_slimmable", "ipkd-ta-m"), ("tiny_exits", "ipkd-ta-m"),
                                             ("tiny_slimmable", "subset")])
def test_a_training_step_reads_nothing_from_the_device(backbone: str, graph: str) -> None:
    torch.manual_seed(0)
    model = kdreg.build_backbone(backbone, num_classes=10)
    options = {"teachers": {"0": [2, 3]}} if graph == "subset" else {}
    g = kdreg.get_teacher_graph(graph, model.num_submodels, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    settings_ = LossSettings(g, 0.8, 3.0)
    stage_backward(model, x, y, settings_)     # warm-up (graph constants made once)
    with HostReads() as mode:
        opt.zero_grad(set_to_none=True)
        stage_backward(model, x, y, settings_)
        opt.step()
    assert mode.reads == []
