"""SmallNet with one unit that can never fire, so the site tests have a real dead unit (the scan decides)."""

from __future__ import annotations

import torch
from tiny_models import SmallNet

DEAD_STEM_UNIT = 7


class DeadUnitNet(SmallNet):
    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():  # batch norm of stem unit 7: output -1 whatever the input, so 0 after the ReLU
            self.stem[1].weight[DEAD_STEM_UNIT] = 0.0
            self.stem[1].bias[DEAD_STEM_UNIT] = -1.0


def site_net() -> torch.nn.Module:
    return DeadUnitNet()
