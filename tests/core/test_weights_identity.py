"""Weights identify their preprocessing: a local torchvision weights file is matched to its enum entry by the
sha256 prefix torchvision puts in the published file name, whatever the local file is called."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
import torchvision

from pipeline.models import ModelConfig, load_model


@pytest.fixture(scope="module")
def demo_weights() -> str:
    from pipeline.demo_data import mobilenet_v2_weights

    return mobilenet_v2_weights()


def test_demo_weights_are_imagenet1k_v1_with_its_own_resize(demo_weights):
    # Independent facts: torchvision publishes IMAGENET1K_V1 as mobilenet_v2-b0353104.pth, resize 256;
    # DEFAULT is IMAGENET1K_V2 (resize 232), which the file is NOT.
    with open(demo_weights, "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest().startswith("b0353104")
    assert torchvision.models.MobileNet_V2_Weights.DEFAULT.transforms().resize_size == [232]
    loaded = load_model(ModelConfig("torchvision:mobilenet_v2", demo_weights))
    assert loaded.weights_match == {"entry": "MobileNet_V2_Weights.IMAGENET1K_V1", "matched_by": "sha256"}
    assert (loaded.preprocess.image_size, loaded.preprocess.resize) == (224, 256)
    assert loaded.categories[0] == "tench" and len(loaded.categories) == 1000
    # An explicit --resize still wins over the entry's.
    assert load_model(ModelConfig("torchvision:mobilenet_v2", demo_weights, resize=240)).preprocess.resize == 240


def test_a_renamed_copy_is_still_identified_by_its_hash(demo_weights, tmp_path):
    renamed = tmp_path / "my-finetune-final.pt"
    shutil.copyfile(demo_weights, renamed)
    loaded = load_model(ModelConfig("torchvision:mobilenet_v2", str(renamed)))
    assert loaded.weights_match["entry"] == "MobileNet_V2_Weights.IMAGENET1K_V1"
    assert loaded.preprocess.resize == 256


def test_an_unknown_file_is_reported_as_assumed_from_default(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mobilenet_v2-b0353104.pth"  # a lying name: the hash decides, not the name
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    loaded = load_model(ModelConfig("torchvision:mobilenet_v2", str(path)))
    assert loaded.weights_match == {"entry": "MobileNet_V2_Weights.IMAGENET1K_V2", "matched_by": "assumed"}
    assert loaded.preprocess.resize == 232  # today's behaviour: DEFAULT's transforms


def test_factory_models_have_no_weights_entry():
    loaded = load_model(ModelConfig("module:pipeline.zoo:resnet20"))
    assert loaded.weights_match is None


def test_scan_manifest_records_the_matched_entry(ray_cluster, photo_folder, demo_weights, tmp_path):
    from pipeline.scan.runner import ScanConfig, run_scan

    manifest = run_scan(
        ScanConfig(
            model=ModelConfig("torchvision:mobilenet_v2", demo_weights, image_size=32),
            data=photo_folder,
            out=str(tmp_path / "run"),
            layers="features.1",
            k=1,
            progress=False,
            executor="local",
        )
    )
    assert manifest["model"]["weights_match"] == {"entry": "MobileNet_V2_Weights.IMAGENET1K_V1", "matched_by": "sha256"}
    # --image-size 32 keeps the entry's crop ratio 256/224.
    assert manifest["preprocess"]["resize"] == 37  # floor(32 * 256 / 224 + 0.5)
