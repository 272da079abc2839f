"""Networks for tests/compare/test_compare.py, importable as ``module:compare_models:<factory>`` (in Ray workers too):
one small random CNN, the same network with relu2's channels permuted consistently, and with one filter zeroed."""

from __future__ import annotations

import torch
from torch import nn

# B's unit j of relu2 is A's unit PERMUTATION[j]
PERMUTATION = [3, 0, 7, 1, 6, 2, 5, 4]
ZEROED_UNIT = 5  # the relu2 filter (weights and bias) zeroed in cmp_net_zeroed


class CmpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same weights in every process
            torch.manual_seed(3)
            self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
            self.relu2 = nn.ReLU()
            self.conv3 = nn.Conv2d(8, 5, 3, padding=1)
            self.relu3 = nn.ReLU()
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu3(self.conv3(self.relu2(self.conv2(self.relu1(self.conv1(x)))))))


def cmp_net() -> nn.Module:
    return CmpNet()


def cmp_net_permuted() -> nn.Module:
    """relu2's output channels permuted, and conv3's input channels with them: the same function."""
    net = CmpNet()
    order = torch.tensor(PERMUTATION)
    with torch.no_grad():
        net.conv2.weight.copy_(net.conv2.weight[order])
        net.conv2.bias.copy_(net.conv2.bias[order])
        net.conv3.weight.copy_(net.conv3.weight[:, order])
    return net


def cmp_net_zeroed() -> nn.Module:
    net = CmpNet()
    with torch.no_grad():
        net.conv2.weight[ZEROED_UNIT] = 0.0
        net.conv2.bias[ZEROED_UNIT] = 0.0
    return net
