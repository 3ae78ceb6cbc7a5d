"""ResNet-50 (He et al., 2015) without torchvision, with torchvision-compatible parameter names.

Used by ``sealtorch demo`` and ``sealtorch bench load``: about 25.6 M parameters, so the
benchmark loads a realistic mix of large conv weights and many small batch-norm tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck block with an optional projection shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """ResNet with bottleneck blocks; ``layers=(3, 4, 6, 3)`` is ResNet-50."""

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes = 64
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000) -> ResNet:
    """An (untrained, default-initialized) ResNet-50."""
    return ResNet((3, 4, 6, 3), num_classes)


@torch.no_grad()
def make_resnet50(seed: int = 0) -> ResNet:
    """A ResNet-50 in eval mode whose every parameter and buffer is a function of ``seed``.

    Weights are drawn from a private generator (the global RNG is untouched), with scales that
    keep activations finite, so two calls with one seed give bit-identical models and outputs.
    """
    model = resnet50()
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bn3.weight"):
            p.uniform_(0.0, 0.2, generator=g)  # damp residual branches: stable deep activations
        elif "bn" in name or "downsample.1" in name:
            if name.endswith("weight"):
                p.uniform_(0.8, 1.2, generator=g)
            else:
                p.uniform_(-0.1, 0.1, generator=g)
        elif p.dim() > 1:
            fan_in = p[0].numel()
            p.normal_(0.0, math.sqrt(2.0 / fan_in), generator=g)
        else:
            p.uniform_(-0.01, 0.01, generator=g)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.uniform_(-0.1, 0.1, generator=g)
        elif name.endswith("running_var"):
            b.uniform_(0.5, 1.5, generator=g)
    return model.eval()
