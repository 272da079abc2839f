"""The actor plan (pipeline.image_stream.plan_actors): never every CPU, never a GPU that is not there."""

from __future__ import annotations

import pytest

from pipeline.ray_session import ClusterShape
from pipeline.image_stream import plan_actors
from pipeline.scan.runner import ScanConfig
from pipeline.models import ModelConfig


def test_actor_plan_never_reserves_every_cpu_or_a_missing_gpu():
    config = ScanConfig(model=ModelConfig("torchvision:resnet18"), data="d", out="o")
    cpu2 = plan_actors(config.actors, config.threads, config.device, ClusterShape(cpus=2, gpus=0))
    assert cpu2["num_gpus"] == 0 and cpu2["actors"] * cpu2["num_cpus"] <= 1.0
    cpu16 = plan_actors(config.actors, config.threads, config.device, ClusterShape(cpus=16, gpus=0))
    assert cpu16["actors"] == 4 and cpu16["threads"] == 4 and cpu16["actors"] * cpu16["num_cpus"] <= 15
    gpu = plan_actors(config.actors, config.threads, config.device, ClusterShape(cpus=16, gpus=4))
    assert gpu["actors"] == 4 and gpu["num_gpus"] == 1 and gpu["device"] == "cuda"
    with pytest.raises(ValueError, match="more GPU model replicas"):
        plan_actors(5, None, "auto", ClusterShape(16, 4))
    with pytest.raises(ValueError, match="do not fit"):
        plan_actors(50, None, "auto", ClusterShape(2, 0))
