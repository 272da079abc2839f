"""Preprocessing geometry against torchvision, source resolution, the actor plan, and the `atlas` CLI."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from helpers import png_bytes, write_png
from pipeline.data import DataError, Decoder, SourceSpec, resolve_source
from pipeline.preprocess import Preprocess, decode_image
from pipeline.ray_session import ClusterShape
from pipeline.image_stream import plan_actors
from pipeline.scan.runner import ScanConfig
from pipeline.models import ModelConfig


@pytest.mark.parametrize("size", [(400, 300), (300, 400), (224, 224), (513, 257), (97, 1000)])
def test_preprocess_pixels_equal_torchvision_resize_and_centre_crop(size):
    from torchvision import transforms

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pp = Preprocess(image_size=224, resize=256)
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(image)
    np.testing.assert_array_equal(pp.apply(image), np.asarray(reference))


def test_original_box_known_answers():
    pp = Preprocess(image_size=224, resize=256)
    # 400x300 landscape: resized to 341x256 (torchvision: int(256 * 400 / 300)), crop origin (58, 16),
    # scale 400/341 horizontally and 300/256 vertically.
    whole = pp.to_original_box(np.array([0, 0, 224, 224]), 400, 300)
    assert whole.tolist() == [
        int(np.floor(58 * 400 / 341)),
        int(np.floor(16 * 300 / 256)),
        int(np.ceil(282 * 400 / 341)),
        int(np.ceil(240 * 300 / 256)),
    ]
    assert whole.tolist() == [68, 18, 331, 282]
    # No resize and no crop (a 224 square with resize 224): identity.
    assert Preprocess(224, 224).to_original_box(np.array([3, 5, 9, 11]), 224, 224).tolist() == [3, 5, 9, 11]
    # The same image with resize 256: upscaled by 256/224, then 16 pixels cropped on each side.
    assert pp.to_original_box(np.array([3, 5, 9, 11]), 224, 224).tolist() == [
        int(np.floor(19 * 224 / 256)),
        int(np.floor(21 * 224 / 256)),
        int(np.ceil(25 * 224 / 256)),
        int(np.ceil(27 * 224 / 256)),
    ]
    # Exact 2x downscale of a 448 square: boxes double.
    assert Preprocess(224, 224).to_original_box(np.array([4, 4, 7, 7]), 448, 448).tolist() == [8, 8, 14, 14]
    # Vectorised over boxes and sizes.
    boxes = pp.to_original_box(
        np.array([[0, 0, 224, 224], [0, 0, 224, 224]]), np.array([400, 300]), np.array([300, 400])
    )
    assert boxes.tolist() == [[68, 18, 331, 282], [18, 68, 282, 331]]


def test_original_box_covers_the_pixels_that_land_in_the_input_box():
    """Independent check: resize an image whose pixels encode their own column, read the crop back."""
    width, height = 333, 250
    coords = np.tile(np.arange(width, dtype=np.float32), (height, 1))
    pp = Preprocess(image_size=128, resize=150)
    new_w, new_h = pp.resized_size(width, height)
    left, _ = pp.crop_origin(new_w, new_h)
    resized = np.asarray(Image.fromarray(coords, mode="F").resize((new_w, new_h), Image.NEAREST))
    crop = resized[:, left : left + 128]
    for x0, x1 in [(0, 10), (40, 41), (100, 128)]:
        box = pp.to_original_box(np.array([x0, 0, x1, 128]), width, height)
        seen = crop[:, x0:x1]
        # nearest-neighbour samples of the input box lie inside the mapped original box
        assert box[0] <= seen.min() and seen.max() < box[2]


def test_decode_errors_and_sizes():
    pp = Preprocess(16, 16)
    pixels, width, height = decode_image(png_bytes(np.zeros((20, 30, 3))), pp)
    assert pixels.shape == (16, 16, 3) and (width, height) == (30, 20)
    with pytest.raises(Exception):  # noqa: B017 - PIL raises its own UnidentifiedImageError
        decode_image(b"not an image", pp)
    data = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3)))
    with pytest.raises(OSError):
        decode_image(data[: len(data) // 2], pp)


def test_resolve_source_kinds_and_errors(tmp_path):
    write_png(str(tmp_path / "imgs" / "cat" / "a.png"), np.zeros((4, 4, 3)))
    spec = resolve_source(str(tmp_path / "imgs"))
    assert spec.kind == "folder" and len(spec.files) == 1
    decoded = Decoder(spec, Preprocess(4, 4))(
        {
            "path": np.array(list(spec.files), dtype=object),
            "bytes": np.array([open(spec.files[0], "rb").read()], dtype=object),
        }
    )
    assert decoded["image_key"].tolist() == ["cat/a.png"] and decoded["label"].tolist() == ["cat"]
    for name in ("s-000.tar", "s-001.tar", "s-002.tar"):
        (tmp_path / name).write_bytes(b"")
    assert len(resolve_source(str(tmp_path / "s-{000..001}.tar")).files) == 2
    assert resolve_source(str(tmp_path / "s-*.tar")).kind == "webdataset"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="expected an image folder"):
        resolve_source(str(tmp_path / "notes.txt"))


def test_parquet_without_image_column_is_a_clear_error():
    decoder = Decoder(SourceSpec("parquet", "/x", ("/x/a.parquet",)), Preprocess(4, 4))
    with pytest.raises(DataError, match="none of the image columns"):
        decoder({"caption": np.array(["a"], dtype=object)})


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


def test_cli_layers_lists_shapes_and_receptive_fields(capsys):
    from pipeline.cli import main

    assert main(["layers", "--model", "module:tiny_models:hand_net", "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    relu1 = next(line for line in out.splitlines() if line.startswith("relu1 "))
    assert "2x16x16" in relu1 and "3x3" in relu1 and "1x1" in relu1 and "-1,-1" in relu1
    conv2 = next(line for line in out.splitlines() if line.startswith("conv2 "))
    assert "6x6" in conv2 and "4x4" in conv2
    assert (
        main(["scan", "--model", "module:tiny_models:hand_net", "--data", ".", "--out", "x", "--layers", "nope"]) == 2
    )
    assert "valid layers" in capsys.readouterr().err
    assert main(["layers", "--model", "torchvision:no_such_net"]) == 2
    assert "unknown torchvision model" in capsys.readouterr().err
    assert not os.path.exists("x")


def test_normalizer_equals_torchvisions_to_tensor_and_normalize():
    """The one normalisation (scan, render, explain) against torchvision's own ToTensor + Normalize, image by
    image; read-only arrays (as Ray hands them out) are accepted and left untouched; non-uint8 input refused."""
    import torch
    from torchvision.transforms import functional as TF

    from pipeline.preprocess import Preprocess

    pp = Preprocess(image_size=8, resize=8, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.7))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    pixels.flags.writeable = False
    got = pp.normalizer()(pixels)
    assert got.shape == (3, 3, 8, 8) and got.dtype == torch.float32
    for i in range(3):
        expected = TF.normalize(TF.to_tensor(pixels[i].copy()), pp.mean, pp.std)
        torch.testing.assert_close(got[i], expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        pp.normalizer()(pixels.astype(np.float32))


def test_preprocess_survives_the_manifest_round_trip():
    import json

    preprocess = Preprocess(image_size=100, resize=120, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), max_side=5000)
    assert Preprocess.from_dict(json.loads(json.dumps(preprocess.as_dict()))) == preprocess
