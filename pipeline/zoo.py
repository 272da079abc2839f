"""Model definitions that torchvision lacks, for `module:pipeline.zoo:<factory>` model specs.

CIFAR ResNets (He et al. 2016, section 4.2): a 3x3 stem of 16 channels, three stages of BasicBlocks with
16, 32 and 64 channels (the first block of stages 2 and 3 at stride 2, its shortcut "option A": the input
subsampled and zero-padded with channels, no parameters), global average pooling and one linear layer.
Module names match the widely used akamaster/pytorch_resnet_cifar10 state dicts (``conv1``, ``bn1``,
``layer1.0.conv1``..., ``linear``), so those weights load with ``--weights``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride = stride
        self.pad = (c_out - c_in) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x
        if self.stride != 1 or self.pad:
            # Option A: every other pixel, zero channels added on both sides (no parameters).
            shortcut = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; `categories` names the classes for atlas pages."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c_in = [], width
        for index, c_out in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                blocks.append(BasicBlock(c_in, c_out, 2 if index > 0 and block == 0 else 1))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[-1], num_classes)
        self.categories = list(CIFAR10_CLASSES) if num_classes == 10 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet20() -> CifarResNet:
    """ResNet-20 (3 blocks per stage, 0.27 M parameters)."""
    return CifarResNet(3)


def resnet8() -> CifarResNet:
    """ResNet-8 (1 block per stage, 78 k parameters): small enough for quick tests and cluster checks."""
    return CifarResNet(1)
