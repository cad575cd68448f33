"""Which parameters weight decay may exempt, by kind: the optimizer's rule, which a backbone that
builds its own parameter copies (a slimmable model's narrow widths) can ask too."""

from __future__ import annotations

from typing import Literal

from torch import nn

NoDecayKind = Literal["depthwise", "norm", "bias", "other"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def no_decay_kind(module: nn.Module, param_name: str) -> NoDecayKind | None:
    """Why parameter ``param_name`` of ``module`` (its direct owner) may be exempt from weight decay.

    ``"norm"`` for normalisation layers (BatchNorm, GroupNorm, LayerNorm, and the vectors of any
    class whose name contains ``Norm``, such as timm's RmsNorm; their biases too), ``"bias"`` for
    other biases, ``"depthwise"`` for the weight of a depthwise conv (``groups == in_channels >
    1``), ``"other"`` for any other parameter of at most one dimension (layer scales, tokens of
    size 1), and ``None`` for weights that always take weight decay (regular conv and linear
    weights). ``optimizer.no_decay`` names the kinds to exempt.
    """
    param = getattr(module, param_name)
    if isinstance(module, _NORM_TYPES) or (
            param.ndim <= 1 and "norm" in type(module).__name__.lower()):
        return "norm"
    if param_name == "bias" or param_name.endswith("_bias"):
        return "bias"
    if isinstance(module, nn.modules.conv._ConvNd) and param_name == "weight" and (
            getattr(module, "depthwise", False) is True
            or 1 < module.groups == module.in_channels):
        return "depthwise"
    if param.ndim <= 1:
        return "other"
    return None
