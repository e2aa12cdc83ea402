"""Classifiers in a registry. Every model takes pixel-space input in [0, 1] and normalises it
itself with the input spec's mean/std, so triggers, generators and attacks all work in pixel space."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from defense.registry import Registry
from defense.spec import InputSpec, require


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Gradients flow through `module` to its inputs, but none are computed for its parameters
    (DHBE's student during the G and Gp steps, a model a blend pattern is inverted on)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


ModelFactory = Callable[[InputSpec], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


def build_model(name: str, spec: InputSpec) -> nn.Module:
    return MODELS.get(name)(spec)


class Normalise(nn.Module):
    """Fixed input normalisation; non-persistent buffers so weights files hold only learned state."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std


class Classifier(nn.Module):
    """normalise -> features (conv trunk ending in its last conv block) -> pooled linear head."""

    def __init__(self, spec: InputSpec, features: nn.Module, feature_channels: int) -> None:
        super().__init__()
        self.normalise = Normalise(spec)
        self.features = features
        self.head = nn.Linear(feature_channels, spec.num_classes)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalise(pixels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.forward_features(pixels), 1).flatten(1))


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@MODELS.register("small-cnn")
def small_cnn(spec: InputSpec) -> nn.Module:
    """16-32-64 channels, two stride-2 stages: fast on CPU for the digits set."""
    features = nn.Sequential(
        _conv_bn_relu(spec.channels, 16),
        _conv_bn_relu(16, 32, stride=2 if spec.height >= 8 else 1),
        _conv_bn_relu(32, 64, stride=2 if spec.height >= 16 else 1),
    )
    return Classifier(spec, features, 64)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet(spec: InputSpec, blocks: tuple[int, int, int, int]) -> nn.Module:
    """CIFAR ResNet: 3x3 stem with stride 1 and no max-pool, as in the DHBE paper."""
    layers: list[nn.Module] = [_conv_bn_relu(spec.channels, 64)]
    cin = 64
    for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            layers.append(BasicBlock(cin, width, stride))
            cin = width
    return Classifier(spec, nn.Sequential(*layers), 512)


@MODELS.register("resnet18")
def resnet18(spec: InputSpec) -> nn.Module:
    return _resnet(spec, (2, 2, 2, 2))


@MODELS.register("resnet34")
def resnet34(spec: InputSpec) -> nn.Module:
    return _resnet(spec, (3, 4, 6, 3))


class WideBlock(nn.Module):
    """Pre-activation wide residual block (Zagoruyko & Komodakis 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def wide_resnet(spec: InputSpec, depth: int, widen: int) -> nn.Module:
    require((depth - 4) % 6 == 0, f"WideResNet depth must be 6n+4, got {depth}")
    per_stage = (depth - 4) // 6
    widths = [16 * widen, 32 * widen, 64 * widen]
    layers: list[nn.Module] = [nn.Conv2d(spec.channels, 16, 3, 1, 1, bias=False)]
    cin = 16
    for stage, width in enumerate(widths):
        for index in range(per_stage):
            layers.append(WideBlock(cin, width, 2 if stage > 0 and index == 0 else 1))
            cin = width
    layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
    return Classifier(spec, nn.Sequential(*layers), cin)


for _depth, _widen in ((16, 1), (16, 2), (16, 4), (40, 1), (40, 2), (40, 4)):
    MODELS.register(f"wrn-{_depth}-{_widen}")(lambda spec, d=_depth, w=_widen: wide_resnet(spec, d, w))
