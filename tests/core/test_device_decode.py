"""`--decode gpu`: JPEGs decoded and cropped on the model's device (pipeline.device_decode), checked here on the
CPU device against the CPU path (PIL), and the scan's handling of what the device cannot decode. The same
checks on CUDA are in scripts/gpu_checks.py."""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers import folder_batch
from pipeline.cli import main
from pipeline.data import Decoder, SourceSpec
from pipeline.device_decode import DeviceDecoder
from pipeline.models import ModelConfig, load_model
from pipeline.preprocess import Preprocess, decode_image
from pipeline.scan.recorder import Recorder, RecorderConfig, ScanState, layer_maxima

SMALL = ModelConfig(spec="module:tiny_models:small_net", image_size=32)


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_jpegs(photo_folder) -> list[bytes]:
    """Real photos as JPEG bytes: colour, and two in greyscale (decode_jpeg's RGB mode expands them as PIL does)."""
    paths = sorted(glob.glob(os.path.join(photo_folder, "**", "*.*"), recursive=True))[:12]
    images = [Image.open(path).convert("RGB") for path in paths]
    return [jpeg_bytes(image) for image in images] + [jpeg_bytes(image.convert("L")) for image in images[:2]]


@pytest.mark.parametrize("image_size,resize", [(64, 73), (224, 256), (32, 32)])
def test_device_crops_are_within_one_level_of_the_cpu_path(photo_jpegs, image_size, resize):
    """Same geometry (resize of the shorter side, centre crop) as PIL's path: every pixel within 1 grey level
    (another IDCT and resampling implementation), most identical. Downscaling, upscaling, and both."""
    preprocess = Preprocess(image_size=image_size, resize=resize)
    crops, errors = DeviceDecoder(preprocess)(photo_jpegs)
    assert errors == [None] * len(photo_jpegs)
    reference = np.stack([decode_image(blob, preprocess)[0] for blob in photo_jpegs])
    difference = np.abs(crops.numpy().astype(np.int64) - reference.astype(np.int64))
    assert difference.max() <= 1
    assert difference.mean() < 0.25


def test_the_decode_stage_ships_only_what_the_device_decodes(tmp_path):
    """JPEGs (RGB and greyscale) travel encoded; a PNG and a CMYK JPEG are decoded on the CPU as before; an image
    over a size limit is refused on its header either way."""
    root = tmp_path / "mixed"
    root.mkdir()
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    files = {
        "a.jpg": jpeg_bytes(picture),
        "b.jpg": jpeg_bytes(picture.convert("L")),
        "c.jpg": jpeg_bytes(picture.convert("CMYK")),
        "d.png": None,
        "e.jpg": jpeg_bytes(Image.new("RGB", (300, 10))),
    }
    for name, data in files.items():
        if data is None:
            picture.save(root / name)
        else:
            (root / name).write_bytes(data)
    paths = sorted(str(p) for p in root.iterdir())
    preprocess = Preprocess(image_size=32, resize=36, max_aspect=10)
    decoded = Decoder(SourceSpec("folder", str(root), tuple(paths)), preprocess, defer_jpeg=True)(
        folder_batch(str(root), paths)
    )
    shipped = [blob is not None for blob in decoded["encoded"]]
    assert list(decoded["image_key"]) == ["a.jpg", "b.jpg", "c.jpg", "d.png", "e.jpg"]
    assert shipped == [True, True, False, False, False]
    assert list(decoded["status"]) == ["ok", "ok", "ok", "ok", "error"]
    assert "aspect ratio" in decoded["error"][4]
    assert decoded["pixels"][0].max() == 0 and decoded["pixels"][2].max() > 0 and decoded["pixels"][3].max() > 0
    assert (decoded["width"][0], decoded["height"][0]) == (50, 40)


def test_a_scan_worker_decoding_on_its_device_records_what_a_brute_force_sees(photo_folder, tmp_path):
    """The Recorder with decode='gpu' (here on the CPU device): maxima equal a plain forward pass over the
    device decoder's crops; a JPEG whose header reads but whose data is cut off becomes an error row, not a
    black image in the top-k."""
    paths = sorted(glob.glob(os.path.join(photo_folder, "**", "*.*"), recursive=True))[:10]
    root = tmp_path / "jpegs"
    root.mkdir()
    blobs = []
    for i, path in enumerate(paths):
        data = jpeg_bytes(Image.open(path).convert("RGB"))
        if i == 3:
            data = data[: len(data) // 3]  # truncated: PIL's header check passes, the decode must fail
        (root / f"{i:02d}.jpg").write_bytes(data)
        blobs.append(data)
    files = sorted(str(p) for p in root.iterdir())
    loaded = load_model(SMALL)
    layers = ("stem", "down")
    units = {"stem": 8, "down": 12}
    recorder = Recorder(
        RecorderConfig(model=SMALL, layers=layers, k=4, device="cpu", batch_size=4, flush_images=1, decode="gpu"), units
    )
    batch = Decoder(SourceSpec("folder", str(root), tuple(files)), loaded.preprocess, defer_jpeg=True)(
        folder_batch(str(root), files)
    )
    assert all(blob is not None for blob in batch["encoded"])
    flush = recorder(batch)
    rows = pq.read_table(io.BytesIO(flush.image_rows)).to_pylist()
    status = {r["image_key"]: r["status"] for r in rows}
    assert status["03.jpg"] == "error" and sum(s == "ok" for s in status.values()) == 9
    assert "device" in next(r["error"] for r in rows if r["image_key"] == "03.jpg")

    good = [i for i in range(10) if i != 3]
    crops, errors = DeviceDecoder(loaded.preprocess)([blobs[i] for i in good])
    assert errors == [None] * 9
    mean = torch.tensor(loaded.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.preprocess.std).view(1, 3, 1, 1)
    x = (crops.permute(0, 3, 1, 2).float() / 255 - mean) / std
    from torchvision.models.feature_extraction import create_feature_extractor

    with torch.no_grad():
        outputs = create_feature_extractor(loaded.model.eval(), list(layers))(x)
    state = ScanState.from_bytes(flush.state)
    keys = [f"{i:02d}.jpg" for i in good]
    for layer in layers:
        values = layer_maxima(outputs[layer])[0].numpy()  # (9, units)
        topk = state.topk[layer].state_dict()
        order = np.lexsort((np.array(keys)[:, None].repeat(units[layer], 1).T, -values.T))[:, :4]
        np.testing.assert_allclose(topk["values"], np.take_along_axis(values.T, order, 1), rtol=1e-5, atol=1e-6)
        got = np.asarray(topk["key_table"])[topk["key_index"]]
        assert (got == np.array(keys)[order]).all(), layer


def test_decode_gpu_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    code = main(
        [
            "scan",
            "--model",
            "module:tiny_models:small_net",
            "--image-size",
            "32",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
            "--decode",
            "gpu",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("atlas: error:") and "--decode gpu" in err and len(err.splitlines()) == 1
