"""Small networks for tests, importable by spec ``module:tiny_models:<factory>`` (in Ray workers too)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn


def _durable_flushes(folder: str) -> int:
    """Committed flushes in a run's staging folder (pipeline.scan.flushes: one folder each; '.tmp-' ones are not)."""
    try:
        return len([name for name in os.listdir(folder) if not name.startswith(".")])
    except FileNotFoundError:
        return 0


def test_delay(x: torch.Tensor) -> torch.Tensor:
    """Fault tests' hooks, read from the environment (unset: nothing happens). Wrapped for torch.fx, so the
    traced feature extractor keeps the call.

    ATLAS_TEST_SLOW_FORWARD=S sleeps S seconds per forward pass. ATLAS_TEST_HOLD_WHEN_FLUSHED=N:FOLDER holds
    every forward pass once N flushes are durable in FOLDER (a run's `.staging/flushes`) until the process is
    ended: a kill or a Ctrl-C then lands mid-scan whatever the machine's speed, not on a timer. (The driver
    hands an actor at most two blocks beyond what it has committed, so the scan cannot run to its end first.)"""
    delay = float(os.environ.get("ATLAS_TEST_SLOW_FORWARD", "0") or 0)
    if delay > 0:
        time.sleep(delay)
    hold = os.environ.get("ATLAS_TEST_HOLD_WHEN_FLUSHED")
    if hold:
        count, _, folder = hold.partition(":")
        while _durable_flushes(folder) >= int(count):
            time.sleep(0.5)
    return x


torch.fx.wrap("test_delay")


class HandNet(nn.Module):
    """A hand-weighted CNN whose activations are worked out by hand in test_scan_known_answers.

    conv1 (3x3, pad 1, no bias): unit 0 = mean of the RED channel over the 3x3 window; unit 1 = minus that
    (never positive on images, so dead after relu1). pool (2x2 max). conv2 (2x2, stride 2): the sum of
    pooled unit 0 over the window. Receptive fields: relu1 3x3 stride 1 offset -1; conv2 6x6 stride 4
    offset -1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(2, 1, 2, stride=2, bias=False)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.weight[0, 0] = 1.0 / 9
            self.conv1.weight[1, 0] = -1.0 / 9
            self.conv2.weight.zero_()
            self.conv2.weight[0, 0] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(self.pool(self.relu1(self.conv1(x)))))


def hand_net() -> nn.Module:
    return HandNet()


class SmallNet(nn.Module):
    """A small random CNN (fixed seed) with a residual branch, for brute-force top-k comparisons."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # fixed weights in every process, without touching the global RNG
            torch.manual_seed(0)
            self._build()

    def _build(self) -> None:
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.relu = nn.ReLU()
        self.down = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(test_delay(x))
        x = self.relu(x + self.block(x))
        return self.head(self.down(x))


def small_net() -> nn.Module:
    return SmallNet()


def small_net_not_on_workers() -> nn.Module:
    """SmallNet in the driver; in a Ray actor, the error a node without the model's files would raise."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        raise FileNotFoundError("model files missing on this node")
    return SmallNet()


class TinyVGG(nn.Module):
    """Conv features, then two linear layers: no GAP + one-linear head, so CAM must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def tiny_vgg() -> nn.Module:
    return TinyVGG()


STRIPE_PERIOD = 12  # pixels: the period DissectNet's stripe unit is tuned to


class DissectNet(nn.Module):
    """Hand-weighted detectors for tests/dissect/test_dissect.py (inputs centred on mid-grey: mean 0.5, std 1, so the
    zero padding is grey and flat grey gives 0).

    conv1 (25 x 13, zero padding): unit 0 = R - (G + B) / 2 at the centre pixel (a 1 x 1 "red" detector);
    units 1-4 = +-cos and +-sin gratings of period STRIPE_PERIOD along y (Hann-windowed, zero-sum, the same on
    every column) on the luminance (R + G + B) / 3. relu1. conv2 (1 x 1): unit 0 = relu1 unit 0 (red); unit 1 =
    the sum of units 1-4, |cos| + |sin|, the phase-invariant energy of horizontal stripes of that period; unit 2 =
    minus everything minus 1, which never fires after relu2.
    """

    def __init__(self) -> None:
        super().__init__()
        rows, cols = 2 * STRIPE_PERIOD + 1, STRIPE_PERIOD + 1
        self.conv1 = nn.Conv2d(3, 5, (rows, cols), padding=(rows // 2, cols // 2), bias=False)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(5, 3, 1)
        self.relu2 = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
        y = torch.arange(rows, dtype=torch.float64) - rows // 2
        window = 0.5 + 0.5 * torch.cos(torch.pi * y / (rows // 2 + 1))
        cos = torch.cos(2 * torch.pi * y / STRIPE_PERIOD) * window
        cos = cos - cos.mean() * window / window.mean()  # zero sum: flat regions give 0
        sin = torch.sin(2 * torch.pi * y / STRIPE_PERIOD) * window
        scale = 1.0 / (cols * cos.abs().sum())
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.weight[0, :, rows // 2, cols // 2] = torch.tensor([1.0, -0.5, -0.5])
            for unit, grating in ((1, cos), (2, -cos), (3, sin), (4, -sin)):
                self.conv1.weight[unit] = (grating * scale / 3).float().view(1, rows, 1).expand(3, rows, cols)
            self.conv2.weight.zero_()
            self.conv2.bias.zero_()
            self.conv2.weight[0, 0] = 1.0
            self.conv2.weight[1, 1:] = 1.0
            self.conv2.weight[2] = -1.0
            self.conv2.bias[2] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu2(self.conv2(self.relu1(self.conv1(x)))))


def dissect_net() -> nn.Module:
    return DissectNet()


class Frac(nn.Module):
    """A hash with a fixed random salt per position: frac(97 x + salt[y, x]). The salt keeps the values spread
    even where an image is flat (identical windows), so an image's maximum over positions is the maximum of as many
    pseudo-random values in every image: no visual regularity decides the ranking. (97, and few positions: float32
    keeps the maxima distinct; a large factor or thousands of positions crowd them at 1 - 2**-10, and then the
    key breaks the ties, which is a regularity.)"""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(11)
        self.register_buffer("salt", torch.rand((1, channels, size, size), generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 97.0 + self.salt
        return h - h // 1.0


class ScoreNet(nn.Module):
    """Two hand-set layers for `atlas score` (tests/score/test_score.py), on [0, 1] pixels (mean 0, std 1):

    - ``red`` (conv 7x7, pad 3, then ReLU): unit 0 = mean over the window of R - (G + B) / 2, a red-spot detector;
      unit 1 = minus that unit before the ReLU, a green/blue-spot detector; unit 2 = 0 everywhere (dead).
    - ``hash`` (conv 3x3 with fixed random weights, 16x16 average pooling, then ``Frac``): values with no visual
      regularity (a hash of the pixels) on a 4x4 map; inputs must be 64x64.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 7, padding=3, bias=False)
        self.red = nn.ReLU()
        self.mix = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.pool = nn.AvgPool2d(16)
        self.hash = Frac(4, 4)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0 / 49
            self.conv.weight[0, 1:] = -0.5 / 49
            self.conv.weight[1] = -self.conv.weight[0]
            generator = torch.Generator().manual_seed(7)
            self.mix.weight.copy_(torch.randn(self.mix.weight.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = self.red(self.conv(x))
        return red.mean() + self.hash(self.pool(self.mix(x))).mean()


def score_net() -> nn.Module:
    return ScoreNet()
