"""The model registry: every network ddpipe trains, built from a :class:`ModelSpec` (the config section that names
one: ``teacher.model``, ``evaluation.model``, ...). :data:`MODELS` is the only list of model names.

All builders take any input channel count and class count:

- ``convnet``: the DC-style ConvNet (Zhao et al.): ``depth`` blocks of conv3x3(width) - norm - ReLU - 2x2 pool,
  then a linear classifier. As in the DC reference code, a 28x28 input gets ``padding=3`` in the first conv
  so the feature maps are 32 -> 16 -> 8 -> 4.
- ``resnet18_small``: torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool (for <= 64 px images).
- ``wrn_16_2``: the Wide-ResNet 16-2 of the CIFAR literature (3 groups of 2 pre-activation blocks, widths 32/64/128),
  one of G-VBSM's small-image backbones.
- ``mobilenet_v2_small`` (``width_mult``) and ``shufflenet_v2_x0_5_small``: the CIFAR variants G-VBSM's small-image
  branches use (stride-1 stem; MobileNetV2's second stage at stride 1, ShuffleNetV2 without the max-pool), so a
  28-32 px input keeps 28 -> 14 -> 7 -> 4 px maps instead of falling to 1 px as it does in the 224 px designs.
- ``resnet18``, ``mobilenet_v2`` (``width_mult``), ``shufflenet_v2_x0_5``, ``efficientnet_b0``: torchvision
  builders, randomly initialised, with the first convolution rebuilt for the input channel count.
"""

from __future__ import annotations

import threading
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class ConvNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int, width=128, depth=3, norm="instance",
                 pooling="avg"):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for d in range(depth):
            pad = 3 if (d == 0 and image_size == 28) else 1
            layers.append(nn.Conv2d(c, width, 3, padding=pad))
            size = size + 2 * pad - 2
            if norm == "batch":
                layers.append(nn.BatchNorm2d(width))
            elif norm == "instance":
                layers.append(nn.GroupNorm(width, width, affine=True))
            layers.append(nn.ReLU(inplace=True))
            if pooling != "none" and size >= 2:
                layers.append(nn.AvgPool2d(2) if pooling == "avg" else nn.MaxPool2d(2))
                size //= 2
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = torch.relu(self.bn1(x))
        y = self.conv2(torch.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis) for small images: (depth - 4) / 6 blocks per group."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 16, k: int = 2):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for g, cout in enumerate(widths[1:]):
            for b in range(n):
                blocks.append(_WideBlock(cin, cout, 2 if (g > 0 and b == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _replace_first_conv(module: nn.Module, in_channels: int) -> None:
    """Rebuild the first Conv2d of a torchvision model for ``in_channels`` inputs."""
    for name, child in module.named_modules():
        if isinstance(child, nn.Conv2d):
            if child.in_channels == in_channels:
                return
            new = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                            bias=child.bias is not None)
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return


def _torchvision(name: str, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs)
    _replace_first_conv(model, in_channels)
    return model


def _resnet18_small(in_channels: int, num_classes: int) -> nn.Module:
    model = _torchvision("resnet18", in_channels, num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


# MobileNetV2's stages (expansion t, channels c, blocks n, stride s) for small images: the torchvision setting
# with the second stage at stride 1 (the CIFAR MobileNetV2 of G-VBSM's and the DC literature's code).
_MOBILENET_V2_SMALL = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def _mobilenet_v2_small(in_channels: int, num_classes: int, width_mult: float) -> nn.Module:
    model = _torchvision("mobilenet_v2", in_channels, num_classes, width_mult=width_mult,
                         inverted_residual_setting=_MOBILENET_V2_SMALL)
    model.features[0][0].stride = (1, 1)
    return model


def _shufflenet_v2_small(in_channels: int, num_classes: int) -> nn.Module:
    model = _torchvision("shufflenet_v2_x0_5", in_channels, num_classes)
    model.conv1[0].stride = (1, 1)
    model.maxpool = nn.Identity()
    return model


_INIT_LOCK = threading.Lock()  # the global RNG is shared by the flow's worker threads

# The model registry, the only list of model names (ModelSpec.name accepts its keys):
# name -> builder(spec, in_channels, num_classes, image_size).
MODELS: dict[str, Callable[["ModelSpec", int, int, int], nn.Module]] = {
    "convnet": lambda s, cin, k, size: ConvNet(cin, k, size, s.width, s.depth, s.norm, s.pooling),
    "resnet18_small": lambda s, cin, k, size: _resnet18_small(cin, k),
    "wrn_16_2": lambda s, cin, k, size: WideResNet(cin, k, 16, 2),
    "mobilenet_v2_small": lambda s, cin, k, size: _mobilenet_v2_small(cin, k, s.width_mult),
    "shufflenet_v2_x0_5_small": lambda s, cin, k, size: _shufflenet_v2_small(cin, k),
    "resnet18": lambda s, cin, k, size: _torchvision("resnet18", cin, k),
    "mobilenet_v2": lambda s, cin, k, size: _torchvision("mobilenet_v2", cin, k, width_mult=s.width_mult),
    "shufflenet_v2_x0_5": lambda s, cin, k, size: _torchvision("shufflenet_v2_x0_5", cin, k),
    "efficientnet_b0": lambda s, cin, k, size: _torchvision("efficientnet_b0", cin, k),
}


class ModelSpec(BaseModel):
    """A network from the model registry :data:`MODELS` (a config section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal[tuple(MODELS)] = Field(
        "convnet", description="Architecture name in the model registry (`*_small`: the CIFAR-style variants for <= 64 px "
        "images).")
    width_mult: float = Field(
        1.0, gt=0, description="mobilenet_v2 and mobilenet_v2_small only: channel width multiplier (G-VBSM uses 0.5)."
    )
    width: int = Field(128, ge=1, description="ConvNet only: channels of every conv layer.")
    depth: int = Field(3, ge=1, le=8, description="ConvNet only: number of conv-norm-relu-pool blocks.")
    norm: Literal["batch", "instance", "none"] = Field(
        "instance", description="ConvNet only: normalisation after each conv (instance = GroupNorm with one group per channel)."
    )
    pooling: Literal["avg", "max", "none"] = Field("avg", description="ConvNet only: 2x2 pooling after each block.")


def build_model(spec: ModelSpec, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build a randomly initialised network (use ``torch.manual_seed`` or a checkpoint for determinism)."""
    return MODELS[spec.name](spec, in_channels, num_classes, image_size)


def init_model(spec: ModelSpec, in_channels: int, num_classes: int, image_size: int, seed: int) -> nn.Module:
    """Build a network whose initial weights depend only on ``seed`` (global RNG untouched)."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec, in_channels, num_classes, image_size)
