"""The slimmable layers' fast paths compute what plain slicing computes.

``corner`` (a contiguous weight slice whose gradient is written into one full-size zero tensor)
must give the outputs and gradients of ``F.conv2d`` / ``F.linear`` on ``weight[:cout, :cin]``, at
every width and when the widths' gradients accumulate; MobileNet-V1's channels-last CPU forward
must give the logits and gradients of the NCHW forward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdreg_plugins.backbones.mobilenet_v1 import SlimmableMobileNetV1
from kdreg_plugins.backbones.slimmable import (
    SlimmableBackbone,
    SlimmableConv2d,
    SlimmableLinear,
    chunk_corner,
    corner,
)

CHANNELS = ([3, 5, 8], [4, 6, 9])


def _plain(layer, x, i):
    """The layer's output at width ``i`` from plain slices of leaf copies of its parameters."""
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    cin, cout = layer.in_list[i], layer.out_list[i]
    if isinstance(layer, SlimmableLinear):
        return F.linear(x, w[:cout, :cin], b[:cout]), (w, b)
    groups = cin if layer.depthwise else 1
    ws = w[:cout] if layer.depthwise else w[:cout, :cin]
    return F.conv2d(x, ws, b[:cout], layer.stride, layer.padding, 1, groups), (w, b)


def _layers():
    torch.manual_seed(0)
    return [
        SlimmableConv2d(*CHANNELS, 1),
        SlimmableConv2d(CHANNELS[1], CHANNELS[1], 3, 2, 1, depthwise=True),
        SlimmableLinear(*CHANNELS),
    ]


def _input(layer, i):
    if isinstance(layer, SlimmableLinear):
        return torch.randn(4, layer.in_list[i], requires_grad=True)
    return torch.randn(4, layer.in_list[i], 7, 7, requires_grad=True)


@pytest.mark.parametrize("layer", _layers(), ids=["pointwise", "depthwise", "linear"])
def test_every_width_matches_plain_slicing(layer) -> None:
    for i in range(layer.num_widths):
        layer.zero_grad(set_to_none=True)
        layer.width_index = i
        x = _input(layer, i)
        out = layer(x)
        x_ref = x.detach().clone().requires_grad_()
        ref, (w, b) = _plain(layer, x_ref, i)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(layer.weight.grad, w.grad, rtol=0, atol=0)
        torch.testing.assert_close(layer.bias.grad, b.grad, rtol=0, atol=0)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
        # outside the used corner the gradient is exactly zero
        assert layer.weight.grad.abs().sum() == w.grad.abs().sum()


@pytest.mark.parametrize("layer", _layers(), ids=["pointwise", "depthwise", "linear"])
def test_gradients_accumulate_over_widths_largest_first(layer) -> None:
    layer.zero_grad(set_to_none=True)
    w_sum = torch.zeros_like(layer.weight)
    b_sum = torch.zeros_like(layer.bias)
    for i in reversed(range(layer.num_widths)):
        layer.width_index = i
        x = _input(layer, i).detach()
        out = layer(x)
        ref, (w, b) = _plain(layer, x, i)
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        w_sum += w.grad
        b_sum += b.grad
    torch.testing.assert_close(layer.weight.grad, w_sum)
    torch.testing.assert_close(layer.bias.grad, b_sum)


def test_corner_is_the_weight_at_full_size_and_a_view_without_grad() -> None:
    w = torch.randn(6, 5, 1, 1, requires_grad=True)
    assert corner(w, 6, 5) is w
    part = corner(w, 4, 3)
    assert part.shape == (4, 3, 1, 1) and part.is_contiguous() and part.grad_fn is not None
    with torch.no_grad():
        view = corner(w, 4, 3)
    assert view.grad_fn is None and view.data_ptr() == w.data_ptr()
    torch.testing.assert_close(view, w[:4, :3])


@pytest.mark.parametrize("tail", [False, True], ids=["first", "last"])
@pytest.mark.parametrize("order", ["wide-first", "narrow-first"])
def test_chunk_corner_is_each_chunks_rows_and_its_gradients_those_of_plain_indexing(tail: bool, order: str) -> None:
    """A fused q, k, v weight (3 chunks of 6 rows, 5 columns) and bias at 2 and 4 rows per chunk:
    the values of indexing a view of each chunk, and (the second width's gradient added into the
    first's in place, or the first into a full zero tensor) the same accumulated gradients."""
    torch.manual_seed(0)
    w, b = torch.randn(18, 5, requires_grad=True), torch.randn(18, requires_grad=True)
    w0, b0 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    x = torch.randn(7, 5)
    sizes = [(2, 3), (4, 5)] if order == "narrow-first" else [(4, 5), (2, 3)]
    for rows, cols in sizes:
        span = slice(6 - rows, None) if tail else slice(rows)
        cspan = slice(5 - cols, None) if tail else slice(cols)
        plain_w = w0.view(3, 6, 5)[:, span, cspan].reshape(3 * rows, cols)
        plain_b = b0.view(3, 6)[:, span].reshape(3 * rows)
        fast_w, fast_b = chunk_corner(w, 3, rows, cols, tail=tail), chunk_corner(b, 3, rows, tail=tail)
        assert torch.equal(fast_w, plain_w) and torch.equal(fast_b, plain_b) and fast_w.is_contiguous()
        g = torch.randn(7, 3 * rows)
        (F.linear(x[:, cspan], fast_w, fast_b) * g).sum().backward()
        (F.linear(x[:, cspan], plain_w, plain_b) * g).sum().backward()
    torch.testing.assert_close(w.grad, w0.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.grad, b0.grad, rtol=0, atol=1e-6)
    assert chunk_corner(w, 3, 6, 5) is w and chunk_corner(b, 3, 6) is b
    with torch.no_grad():
        assert chunk_corner(w, 3, 2, 3).grad_fn is None


def test_mobilenet_channels_last_forward_matches_nchw() -> None:
    torch.manual_seed(0)
    model = SlimmableMobileNetV1(10, widths=(0.25, 1.0)).double()  # float64: no rounding noise
    model.train()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for i in range(model.num_submodels):
        model.set_width(i)
        grads = []
        logits = []
        for forward in (model.forward_width, lambda h: SlimmableBackbone.forward_width(model, h)):
            model.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            out = forward(xi)
            out.square().sum().backward()
            logits.append(out.detach())
            grads.append([xi.grad] + [p.grad for p in model.parameters() if p.grad is not None])
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-9, atol=1e-12)
        assert len(grads[0]) == len(grads[1]) > 2
        for a, b in zip(*grads):   # float64 sums in other orders: cancellation noise of the scale
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10 * max(1.0, float(b.abs().max())))
    # the channels-last path is the one taken on the CPU
    seen = []
    hook = model.stem[1].depthwise[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model.forward_submodel(x, 0)
    hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("order", ["largest first", "smallest first", "hooked"])
def test_narrow_gradients_add_into_the_weights_gradient_in_any_order(order: str) -> None:
    """A narrow width's gradient goes into ``weight.grad`` in place when the wider widths made it
    (and nothing hooks the weight), else through autograd's accumulation: the same sums either
    way, in the weight's channels-last layout too."""
    torch.manual_seed(0)
    layer = SlimmableConv2d(*CHANNELS, 3, padding=1).to(memory_format=torch.channels_last)
    seen = []
    if order == "hooked":
        layer.weight.register_hook(lambda g: seen.append(g.shape) or g)
    widths = range(layer.num_widths)
    w_sum = torch.zeros_like(layer.weight)
    for i in (widths if order == "smallest first" else reversed(widths)):
        layer.width_index = i
        x = _input(layer, i).detach().contiguous(memory_format=torch.channels_last)
        out = layer(x)
        ref, (w, _) = _plain(layer, x, i)
        if i < layer.num_widths - 1:
            assert corner(layer.weight, layer.out_list[i], layer.in_list[i]).is_contiguous(
                memory_format=torch.channels_last)
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        w_sum += w.grad
    torch.testing.assert_close(layer.weight.grad, w_sum)
    assert len(seen) == (layer.num_widths if order == "hooked" else 0)   # the hook saw every width


def test_a_switch_finds_the_layers_once_and_anew_after_forget_layers() -> None:
    from torch import nn

    from kdreg_plugins.backbones.slimmable import forget_layers, set_width_index

    net = nn.Sequential(SlimmableLinear([2, 4], [3, 6]), nn.ReLU(), SlimmableLinear([3, 6], [5, 5]))
    set_width_index(net, 0)
    assert [net[0].width_index, net[2].width_index] == [0, 0]
    net[2] = SlimmableLinear([3, 6], [5, 5])          # replaced after the first switch
    set_width_index(net, 1)
    set_width_index(net, 0)
    assert net[2].width_index == 1                    # not among the layers found then
    forget_layers(net)
    set_width_index(net, 0)
    assert [net[0].width_index, net[2].width_index] == [0, 0]
    with pytest.raises(IndexError, match="width index 2 out of range 0..1"):
        set_width_index(net, 2)
