"""VGG-8 / VGG-11 / VGG-13 with BN for CIFAR, the RepDistiller layout (fully connected layers
removed; RepDistiller's ``vgg8_bn``, ``vgg11_bn``, ``vgg13_bn`` in ``models/vgg.py``).

Five conv groups (3x3 conv with bias - BN - ReLU each) with 64, 128, 256, 512, 512 channels
(VGG-8: one conv per group, RepDistiller's configuration "S"; VGG-11: 1, 1, 2, 2, 2 convs;
VGG-13: 2 convs per group), 2x2 max pooling between groups 1-2, 2-3 and 3-4, global average
pooling and one linear classifier. As in the reference, the pooling between groups 4 and 5 only
runs for inputs of 64 pixels or more (Tiny-ImageNet); on 32x32 the last two groups both run at
4x4. Parameters on CIFAR-10 / CIFAR-100: VGG-8 3,918,858 / 3,965,028; VGG-11 9,231,114 /
9,277,284; VGG-13 9,416,010 / 9,462,180.

Split points are the outputs of the conv groups (after the group's last ReLU, before the pooling
that follows it: RepDistiller's ``f0..f4``), so that their resolutions match the stage outputs of
the CIFAR ResNets and WRNs (32, 16, 8) and a 1x1 adapter can bridge them (STC's VGG-13 <-
WRN-46-4). For a 32x32 input:

======  ===========================  ========  ==========
name    content                      channels  resolution
======  ===========================  ========  ==========
layer1  group 1                      64        32x32
layer2  max pool, group 2            128       16x16
layer3  max pool, group 3            256       8x8
layer4  max pool, group 4            512       4x4
layer5  group 5                      512       4x4
======  ===========================  ========  ==========

The back from ``layer5`` is global average pooling and the classifier.
"""

from __future__ import annotations

from torch import nn

from kdreg_plugins.backbones.cifar_resnet import (
    PoolLinear,
    StagedBackbone,
    check_num_classes,
    init_weights,
)

#: Output channels of each conv, per group.
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class CifarVGG(StagedBackbone):
    """VGG with BN for CIFAR; ``config`` lists each group's conv widths."""

    stage_names = ("layer1", "layer2", "layer3", "layer4", "layer5")

    def __init__(
        self,
        config: tuple[tuple[int, ...], ...],
        num_classes: int,
        *,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
    ):
        super().__init__()
        self.in_chans = in_chans
        self.input_size = (int(input_size[0]), int(input_size[1]))
        pool_before = (False, True, True, True, min(self.input_size) >= 64)
        cin = in_chans
        for k, (widths, pool) in enumerate(zip(config, pool_before)):
            layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if pool else []
            for cout in widths:
                layers += [nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout),
                           nn.ReLU(inplace=True)]
                cin = cout
            self.add_module(self.stage_names[k], nn.Sequential(*layers))
        self.head = PoolLinear(cin, check_num_classes(num_classes))
        init_weights(self, linear_std=0.01)


def _factory(name: str):  # type: ignore[no-untyped-def]
    def build(
        *, num_classes: int, in_chans: int = 3, input_size: tuple[int, int] = (32, 32)
    ) -> CifarVGG:
        return CifarVGG(CONFIGS[name], num_classes, in_chans=in_chans, input_size=input_size)

    build.__name__ = build.__qualname__ = f"build_{name}"
    build.__doc__ = f"{name.upper()} with BN for CIFAR (no fully connected layers but the last)."
    return build


#: Parameters and MACs of one 32x32 image on CIFAR-100, for the descriptions.
SIZES = {
    "vgg8": "3.97 M params, 96.2 M MACs",
    "vgg11": "9.28 M params, 209 M MACs",
    "vgg13": "9.46 M params, 285 M MACs",
}


def register(register) -> None:  # type: ignore[no-untyped-def]
    for name in CONFIGS:
        register(name, _factory(name), f"{name.upper()} with BN for CIFAR (RepDistiller layout); "
                                       f"{SIZES[name]} on CIFAR-100")
