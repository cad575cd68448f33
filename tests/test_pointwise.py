"""Strided 1x1 convolutions of few input channels go around oneDNN's broken AVX2 weight-gradient
kernel (a subsample, then a stride-1 conv), with the gradients of the convolution itself."""

from __future__ import annotations

import copy
import faulthandler
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kdreg
from kdreg.data import load_data
from kdreg.engine.assemble import DataShape, assemble
from kdreg.pointwise import avoids_strided_kernel, guard_convs, is_guarded, pointwise_conv2d

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_driver import step_gradients  # noqa: E402

from kdreg.engine.run import Run  # noqa: E402

# turning oneDNN off for a reference also sets its TF32 flag, which warns on this build
pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")


@pytest.fixture(autouse=True)
def end_a_hang() -> Iterator[None]:
    """oneDNN's broken kernel can spin for ever, out of reach of pytest's timeout: a test of this
    module that runs for 3 minutes ends the test process, printing every thread's stack."""
    faulthandler.dump_traceback_later(180, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _reference(x: torch.Tensor, w: torch.Tensor, stride: int) -> tuple[torch.Tensor, ...]:
    """Output and gradients from PyTorch's own convolution (oneDNN off, NCHW), in float64."""
    x64 = x.detach().double().contiguous().requires_grad_()
    w64 = w.detach().double().contiguous().requires_grad_()
    with torch.backends.mkldnn.flags(enabled=False):
        y = F.conv2d(x64, w64, stride=stride)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y, x64.grad, w64.grad


@settings(max_examples=25, deadline=None)
@given(ci=st.integers(1, 7), co=st.sampled_from([4, 8, 16]), hw=st.sampled_from([8, 16, 32]),
       stride=st.sampled_from([2, 3]), batch=st.sampled_from([8, 64]), channels_last=st.booleans())
def test_a_strided_1x1_conv_of_few_channels_has_the_convolutions_gradients(
        ci: int, co: int, hw: int, stride: int, batch: int, channels_last: bool) -> None:
    """Every shape oneDNN's AVX2 kernel gets wrong (measured: all of these, channels-last, on an
    AVX2 CPU) has the output and both gradients of the convolution."""
    g = torch.Generator().manual_seed(ci * 1000 + co * 10 + hw)
    x = torch.randn(batch, ci, hw, hw, generator=g)
    w = torch.randn(co, ci, 1, 1, generator=g)
    if channels_last:
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w.requires_grad_()
    y = pointwise_conv2d(x, w, None, stride)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    ref_y, ref_dx, ref_dw = _reference(x, w, stride)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), ref_dx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), ref_dw, rtol=1e-4, atol=1e-4)


def test_which_convs_go_around_the_kernel() -> None:
    assert avoids_strided_kernel(4, 1, 2, 0)
    assert avoids_strided_kernel(7, (1, 1), (2, 1), (0, 0))
    assert not avoids_strided_kernel(8, 1, 2, 0)          # 8 channels: the kernel is right
    assert not avoids_strided_kernel(4, 1, 1, 0)          # stride 1: the kernel copies nothing
    assert not avoids_strided_kernel(4, 3, 2, 1)          # a 3x3 conv: another kernel
    assert not avoids_strided_kernel(4, 1, 2, 1)          # padded: not a plain subsample
    assert not avoids_strided_kernel(4, 1, 2, "same")
    assert not avoids_strided_kernel(4, 1, 2, 0, dilation=2)


def test_guard_convs_changes_only_plain_strided_1x1_convs_of_few_channels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(4, 8, 1, 2), nn.Conv2d(8, 16, 1, 2),
                          nn.Conv2d(16, 16, 1, 1))
    plain = [m.forward for m in model]
    assert guard_convs(model) == ["1"]
    assert [is_guarded(m) for m in model] == [False, True, False, False]
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(model[1](x), plain[1](x))


@pytest.mark.parametrize("backbone", [
    '{ name = "slimmable_resnet8" }',            # its narrowest width's shortcut: 4 -> 8, stride 2
    # a third-party model with plain nn.Conv2d layers: layer1 has 4 channels, so layer2's
    # downsample is a 4 -> 8 conv of stride 2
    '{ name = "timm", model = "resnet18", model_options = { channels = [4, 8, 16, 32] } }',
])
def test_a_channels_last_training_step_has_the_gradients_of_an_nchw_one(tmp_path: Path, backbone: str) -> None:
    """One channels-last IPKD step on the CPU (batch 64) gives the gradients of the same step in
    NCHW, which oneDNN's broken AVX2 kernel never serves: on an AVX2 CPU the strided 1x1 convs'
    weight gradients were wrong before kdreg went around the kernel."""
    grads = {}
    for layout in ("true", "false"):
        recipe = tmp_path / f"channels-last-{layout}.toml"
        recipe.write_text(f"""
name = "pointwise"
seed = 0
[data]
dataset = "synthetic"
batch_size = 64
val_split = 8
options = {{ train_size = 96, test_size = 16, num_classes = 4, image_size = 32 }}
[train]
epochs = 1
channels_last = {layout}
[[stages]]
name = "student"
backbone = {backbone}
graph = {{ name = "ipkd-ta-m" }}
""")
        grads[layout], _ = step_gradients(str(recipe))
    assert set(grads["true"]) == set(grads["false"])
    for name, g in grads["false"].items():
        torch.testing.assert_close(grads["true"][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_a_cpu_stage_guards_the_plain_convs_it_trains(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(SMOKE_TIMM)
    run = Run.start(recipe, tmp_path / "unused", progress=False)
    splits = load_data(run.recipe.data)
    plan = assemble(run.recipe, DataShape.of(splits), seed=0)[0]
    convs = {n: m for n, m in plan.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert not any(is_guarded(m) for m in convs.values())
    run._trainer(plan, splits)
    assert sorted(n for n, m in convs.items() if is_guarded(m)) == ["net.layer2.0.downsample.0"]


SMOKE_TIMM = """
name = "pointwise"
[data]
dataset = "synthetic"
batch_size = 8
val_split = 8
options = { train_size = 32, test_size = 8, num_classes = 4, image_size = 16 }
[[stages]]
name = "student"
backbone = { name = "timm", model = "resnet18", model_options = { channels = [4, 8, 16, 32] } }
graph = { name = "none" }
"""


def test_a_slimmable_resnets_narrowest_width_has_the_gradients_of_nchw() -> None:
    """x0.25 of slimmable ResNet-8 (a 4 -> 8 shortcut of stride 2 at 32x32), channels-last, batch
    64: the gradients of the same model in NCHW (before kdreg went around the kernel this step
    spun for minutes on an AVX2 CPU). BatchNorm uses running statistics, so that rounding is not
    amplified by batch statistics."""
    torch.manual_seed(0)
    model = kdreg.build_backbone("slimmable_resnet8", num_classes=4, input_size=(32, 32)).eval()
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 4, (64,))
    F.cross_entropy(model.forward_submodel(x, 0), y).backward()
    F.cross_entropy(twin.forward_submodel(x.to(memory_format=torch.channels_last), 0), y).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
