"""Hostile images at the decoder: size limits checked before pixels are allocated, and every image mode
converted by its real value range (or refused), checked against numpy computations of the expected pixels."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from repo_paths import REPO_ROOT
from helpers import folder_batch
from pipeline.render.crops import open_rgb
from pipeline.data import Decoder, SourceSpec
from pipeline.preprocess import DecodeError, Preprocess, decode_image

REPO = REPO_ROOT


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def gray_png(width: int, height: int) -> bytes:
    return encode(Image.fromarray(np.zeros((height, width), dtype=np.uint8)))


# --------------------------------------------------------------------------------------- size limits


def _decode_in_limited_process(code: str, limit_mb: int = 1024) -> dict:
    """Run `code` (which prints one JSON line) in a fresh Python whose address space is capped: an
    allocation the decoder should never make fails there instead of taking this machine's memory."""
    script = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({limit_mb} << 20, {limit_mb} << 20))\n" + code
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_tiny_png_with_an_extreme_side_is_refused_before_it_is_allocated():
    """The issue's case: a ~200-byte 1 x 60000 PNG. Before the fix it decoded as 'ok' after resizing to
    256 x 15,360,000 (15 GB here); now it is an error, decided from the header, in a small address space."""
    result = _decode_in_limited_process(
        "import io, json, numpy as np\n"
        "from PIL import Image\n"
        "from pipeline.preprocess import Preprocess, decode_image\n"
        "buf = io.BytesIO(); Image.fromarray(np.zeros((60000, 1), np.uint8)).save(buf, 'PNG')\n"
        "try:\n"
        "    decode_image(buf.getvalue(), Preprocess(224, 256)); out = {'status': 'ok'}\n"
        "except Exception as e:\n"
        "    out = {'status': 'error', 'error': f'{type(e).__name__}: {e}'}\n"
        "out['bytes'] = len(buf.getvalue())\n"
        # VmHWM, not ru_maxrss: the latter keeps the forking pytest process's peak across exec.
        "status = open('/proc/self/status').read()\n"
        "out['peak_mb'] = int(status.split('VmHWM:')[1].split()[0]) / 1024\n"
        "print(json.dumps(out))\n"
    )
    assert result["bytes"] < 1000
    assert result["status"] == "error" and result["error"].startswith("DecodeError"), result
    assert "60000" in result["error"] and "--max-" in result["error"]
    assert result["peak_mb"] < 300, result


@pytest.mark.parametrize(
    "size,limit",
    [
        ((1, 500), "aspect"),  # 500:1, within every side and pixel limit
        ((500, 1), "aspect"),
        ((30, 31_000), "side"),  # one side over 20,000 (aspect 1033 is over too: side is named first)
        ((21_000, 2_000), "side"),
    ],
)
def test_default_limits_refuse_extreme_shapes(size, limit):
    with pytest.raises(DecodeError, match=limit):
        decode_image(gray_png(*size), Preprocess(16, 16))


def test_each_limit_is_an_option_and_is_inclusive():
    data = gray_png(40, 10)  # aspect 4, 400 pixels, longest side 40
    assert decode_image(data, Preprocess(8, 8, max_side=40, max_pixels=400, max_aspect=4))[1:] == (40, 10)
    for limits, word in (({"max_side": 39}, "side"), ({"max_pixels": 399}, "pixels"), ({"max_aspect": 3.9}, "aspect")):
        with pytest.raises(DecodeError, match=word):
            decode_image(data, Preprocess(8, 8, **limits))


def test_the_resized_image_before_the_crop_is_bounded_too():
    """A 1:19 image (within the aspect limit) with --resize 4000 would be resized to 4000 x 76000 before the
    centre crop (1.2 GB): refused, since max_pixels bounds the resized image as well as the decoded one."""
    data = gray_png(20, 380)
    assert Preprocess(224, 4000).resized_size(20, 380) == (4000, 76000)  # 304 M pixels > the default limit
    # The same with small numbers, so that the code before the fix fails fast instead of allocating 1.2 GB:
    # the decoded image (7,600 pixels) is within max_pixels, the resized 200 x 3800 is not.
    with pytest.raises(DecodeError, match="resiz"):
        decode_image(data, Preprocess(16, 200, max_pixels=20_000))
    assert decode_image(data, Preprocess(16, 16, max_pixels=20_000))[0].shape == (16, 16, 3)


def test_the_decoder_records_an_over_limit_image_as_an_error_row(tmp_path):
    paths = []
    for name, size in (("fine.png", (30, 20)), ("sliver.png", (1, 3000))):
        path = tmp_path / name
        path.write_bytes(gray_png(*size))
        paths.append(str(path))
    spec = SourceSpec("folder", str(tmp_path), tuple(paths))
    rows = Decoder(spec, Preprocess(16, 16))(folder_batch(str(tmp_path), paths))
    assert rows["status"].tolist() == ["ok", "error"]
    assert rows["error"][1].startswith("DecodeError: ") and "aspect" in rows["error"][1]
    assert (rows["width"][1], rows["height"][1]) == (1, 3000)  # the size is still recorded


def test_limits_are_recorded_with_the_preprocessing():
    recorded = Preprocess(16, 16, max_side=100, max_pixels=1000, max_aspect=3.0).as_dict()
    assert {k: recorded[k] for k in ("max_side", "max_pixels", "max_aspect")} == {
        "max_side": 100,
        "max_pixels": 1000,
        "max_aspect": 3.0,
    }
    # A manifest written before the limits existed still rebuilds its preprocessing (defaults).
    old = {"image_size": 16, "resize": 16, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert Preprocess(**old).max_side == Preprocess(16, 16).max_side


@pytest.mark.parametrize(
    "field,value", [("max_side", 0), ("max_pixels", 0), ("max_aspect", 0.5), ("max_pixels", 10**12)]
)
def test_limit_values_are_range_checked(field, value):
    with pytest.raises(ValueError, match=field):
        Preprocess(16, 16, **{field: value})


# --------------------------------------------------------------------------------------- image modes

RNG = np.random.default_rng(7)
H, W = 6, 5
GRAY = RNG.integers(0, 256, (H, W), dtype=np.uint8)
RGBA = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
WIDE = np.concatenate(
    [
        np.array([0, 1, 127, 128, 255, 256, 257, 32767, 32768, 65280, 65534, 65535], dtype=np.uint16),
        RNG.integers(0, 65536, H * W - 12, dtype=np.uint16),
    ]
).reshape(H, W)
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
INDEX = RNG.integers(0, 256, (H, W), dtype=np.uint8)
BITS = RNG.integers(0, 2, (H, W)).astype(bool)


def gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1).astype(np.uint8)


def sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """The nearest 8-bit value of a 16-bit one: round(v * 255 / 65535), in float64."""
    return gray3(np.round(values.astype(np.float64) * 255.0 / 65535.0))


def _palette_image(mode: str) -> Image.Image:
    image = Image.fromarray(INDEX, "L").convert("P") if mode == "P" else Image.new("PA", (W, H))
    if mode == "PA":
        image.putdata(list(zip(INDEX.reshape(-1).tolist(), RGBA[..., 3].reshape(-1).tolist())))
    image.putpalette(PALETTE.reshape(-1).tolist())
    if mode == "P":
        image.putdata(INDEX.reshape(-1).tolist())
    return image


# (written mode, formats that store it losslessly, source image, expected RGB computed with numpy)
CONVERTED = {
    "1": (("PNG", "TIFF", "BMP", "PPM"), lambda: Image.fromarray(BITS), lambda: gray3(BITS * 255)),
    "L": (("PNG", "TIFF", "BMP", "PPM"), lambda: Image.fromarray(GRAY, "L"), lambda: gray3(GRAY)),
    "LA": (("PNG", "TIFF"), lambda: Image.fromarray(RGBA[..., [0, 3]], "LA"), lambda: gray3(RGBA[..., 0])),
    "P": (("PNG", "TIFF", "BMP"), lambda: _palette_image("P"), lambda: PALETTE[INDEX]),
    "PA": (("TIFF",), lambda: _palette_image("PA"), lambda: PALETTE[INDEX]),
    "RGB": (("PNG", "TIFF", "BMP", "PPM"), lambda: Image.fromarray(RGBA[..., :3], "RGB"), lambda: RGBA[..., :3]),
    "RGBA": (("PNG", "TIFF"), lambda: Image.fromarray(RGBA, "RGBA"), lambda: RGBA[..., :3]),  # alpha dropped
    "RGBX": (("TIFF",), lambda: Image.fromarray(RGBA, "RGBX"), lambda: RGBA[..., :3]),
    # Naive CMYK -> RGB (no colour profile): R = (255 - C)(255 - K) / 255, likewise G from M, B from Y.
    "CMYK": (
        ("TIFF",),
        lambda: Image.fromarray(RGBA, "CMYK"),
        lambda: np.round((255.0 - RGBA[..., :3]) * (255.0 - RGBA[..., 3:]) / 255.0),
    ),
    # JFIF (full-range BT.601) YCbCr -> RGB.
    "YCbCr": (
        ("TIFF",),
        lambda: Image.fromarray(RGBA[..., :3], "YCbCr"),
        lambda: np.clip(
            np.round(
                np.stack(
                    [
                        RGBA[..., 0] + 1.402 * (RGBA[..., 2] - 128.0),
                        RGBA[..., 0] - 0.344136 * (RGBA[..., 1] - 128.0) - 0.714136 * (RGBA[..., 2] - 128.0),
                        RGBA[..., 0] + 1.772 * (RGBA[..., 1] - 128.0),
                    ],
                    axis=-1,
                )
            ),
            0,
            255,
        ),
    ),
    # 16-bit grayscale in every byte order PIL writes: the nearest 8-bit value, never clipped at 255.
    "I;16": (("PNG", "TIFF", "PPM"), lambda: Image.fromarray(WIDE), lambda: sixteen_to_eight(WIDE)),
    "I;16B": (("PNG", "TIFF"), lambda: Image.fromarray(WIDE.astype(">u2")), lambda: sixteen_to_eight(WIDE)),
    # Mode I written as a 16-bit PGM (maxval 65535): PIL reads it back as I with those 16-bit values.
    "I": (("PPM",), lambda: Image.fromarray(WIDE.astype(np.int32), "I"), lambda: sixteen_to_eight(WIDE)),
}
CASES = [(mode, fmt) for mode, (formats, _, _) in CONVERTED.items() for fmt in formats]


@pytest.mark.parametrize("mode,fmt", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_every_mode_converts_by_its_real_range(mode, fmt):
    _, make, expected = CONVERTED[mode]
    data = encode(make(), fmt)
    # Same size in and out (resize = crop = the image's size): no resampling, so pixels compare exactly.
    pixels, width, height = decode_image(data, Preprocess(image_size=min(H, W), resize=min(H, W)))
    full = np.asarray(Image.open(io.BytesIO(data)).size)
    assert tuple(full) == (W, H) == (width, height)
    want = np.asarray(expected(), dtype=np.float64)
    # The centre crop of a 5 x 6 image at 5: rows 0..4 (torchvision rounds (6 - 5) / 2 = 0.5 to 0).
    top = int(round((H - min(H, W)) / 2.0))
    want = want[top : top + min(H, W), : min(H, W)]
    tolerance = 1 if mode in ("CMYK", "YCbCr") else 0  # PIL's fixed-point arithmetic rounds differently
    assert np.abs(pixels.astype(np.float64) - want).max() <= tolerance, (mode, fmt)


def test_sixteen_bit_gray_is_not_white():
    """The issue's case: a dark-to-bright 16-bit ramp decoded to all 255 before."""
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    pixels, _, _ = decode_image(encode(Image.fromarray(ramp)), Preprocess(64, 64))
    assert pixels.min() == 0 and pixels.max() == 255 and 120 < pixels.mean() < 135


def _png16_rgb(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    height, width = values.shape[:2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_sixteen_bit_colour_keeps_pils_high_byte():
    """PIL itself reads 16-bit colour PNGs as RGB by their high byte (v >> 8): documented, not clipped, within
    one level of the nearest value that 16-bit gray gets."""
    rgb = np.stack([WIDE, WIDE[::-1], WIDE[:, ::-1]], axis=-1)
    pixels, _, _ = decode_image(_png16_rgb(rgb), Preprocess(5, 5))
    np.testing.assert_array_equal(pixels, (rgb[:5, :5] >> 8).astype(np.uint8))


@pytest.mark.parametrize(
    "make,fmt,word",
    [
        (lambda: Image.fromarray(WIDE.astype(np.int32) * 1000, "I"), "TIFF", "32-bit integer"),
        (lambda: Image.fromarray(WIDE.astype(np.float32) / 65535, "F"), "TIFF", "floating-point"),
        (lambda: Image.fromarray(WIDE.astype(np.float32), "F"), "PPM", "floating-point"),
        (lambda: Image.fromarray(RGBA[..., :3], "LAB"), "TIFF", "LAB"),
    ],
    ids=["I-32bit-TIFF", "F-TIFF", "F-PFM", "LAB-TIFF"],
)
def test_modes_without_a_defined_range_are_refused_with_a_clear_error(make, fmt, word, tmp_path):
    data = encode(make(), fmt)
    with pytest.raises(DecodeError, match=word):
        decode_image(data, Preprocess(5, 5))
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    rows = Decoder(SourceSpec("folder", str(tmp_path), (str(path),)), Preprocess(5, 5))(
        folder_batch(str(tmp_path), [str(path)])
    )
    assert rows["status"].tolist() == ["error"] and word in rows["error"][0]


def test_crops_read_back_originals_with_the_same_conversion():
    """`atlas render` cuts crops from the original: a 16-bit image must not turn white there either."""
    image = open_rgb(encode(Image.fromarray(WIDE)))
    np.testing.assert_array_equal(np.asarray(image), sixteen_to_eight(WIDE))


# EXIF orientation (issue 26 item 6). The expectation is written from the EXIF specification's words with numpy,
# not with PIL's transpose: "the 0th row is the visual <side>, the 0th column is the visual <side>".
EXIF_AS_SHOWN = {
    1: lambda a: a,  # top, left: as stored
    2: lambda a: a[:, ::-1],  # top, right: mirrored left-right
    3: lambda a: a[::-1, ::-1],  # bottom, right: turned 180 degrees
    4: lambda a: a[::-1],  # bottom, left: mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # left, top: transposed
    6: lambda a: np.rot90(a, -1),  # right, top: turned 90 degrees clockwise (a phone held upright)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # right, bottom: transverse
    8: lambda a: np.rot90(a, 1),  # left, bottom: turned 90 degrees anticlockwise
}


def _pattern(height: int, width: int) -> np.ndarray:
    """No symmetry: every flip or turn changes it (a gradient per channel and a block in one corner)."""
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([rows * 255 // height, cols * 255 // width, (rows * 7 + cols * 3) % 256], axis=-1)
    pixels[: height // 3, : width // 4] = (255, 255, 0)
    return pixels.astype(np.uint8)


def exif_jpeg(stored: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def stored_pixels(data: bytes) -> np.ndarray:
    """The JPEG's pixels as stored, read without any orientation."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_by_the_one_opener(orientation):
    data = exif_jpeg(_pattern(30, 48), orientation)
    expected = EXIF_AS_SHOWN[orientation](stored_pixels(data))
    np.testing.assert_array_equal(np.asarray(open_rgb(data)), expected)
    preprocess = Preprocess(16, 20)
    pixels, width, height = decode_image(data, preprocess)
    assert (width, height) == (expected.shape[1], expected.shape[0])
    np.testing.assert_array_equal(pixels, preprocess.apply(Image.fromarray(np.ascontiguousarray(expected))))
    # The probe images of `atlas dissect` go through the same opener.
    from pipeline.dissect.probe import probe_pixels

    shown = Image.fromarray(np.ascontiguousarray(expected)).resize((16, 16), Image.BILINEAR)
    np.testing.assert_array_equal(probe_pixels(data, preprocess), np.asarray(shown))


def test_the_size_limits_apply_to_the_oriented_size():
    """A 10 x 40 photo shown 40 x 10: max_side is about the shown image, and the refusal names that size."""
    data = exif_jpeg(_pattern(40, 10), 6)
    with pytest.raises(DecodeError) as refused:
        decode_image(data, Preprocess(5, 5, max_aspect=3.0))
    assert refused.value.size == (40, 10) and "40 x 10" in str(refused.value)


def test_a_sideways_photo_is_scanned_and_cropped_upright(tmp_path):
    """End to end (a local scan, then the crop `atlas render` cuts): a JPEG stored sideways with orientation 6
    and a lossless PNG of the same pixels turned by numpy are the same image to the scan: the same activations,
    the oriented size in `images`, and the crop at the recorded box is the turned pixels at that box."""
    from pipeline.data import SourceSpec as Spec
    from pipeline.models import ModelConfig
    from pipeline.render.crops import crop_box
    from pipeline.render.fetch import fetch_images
    from pipeline.scan.runner import ScanConfig, run_scan
    from pipeline.store import connect

    data_dir = tmp_path / "photos"
    data_dir.mkdir()
    sideways = exif_jpeg(_pattern(36, 60), 6)
    upright = np.ascontiguousarray(EXIF_AS_SHOWN[6](stored_pixels(sideways)))  # 60 x 36 as shown
    (data_dir / "phone.jpg").write_bytes(sideways)
    Image.fromarray(upright).save(data_dir / "twin.png")
    run = str(tmp_path / "run")
    config = ScanConfig(
        model=ModelConfig(spec="module:tiny_models:small_net", image_size=32),
        data=str(data_dir),
        out=run,
        layers="relu",
        k=2,
        record="all",
        progress=False,
        executor="local",
    )
    run_scan(config)
    with connect(run) as con:
        sizes = {key: (w, h) for key, w, h in con.execute("SELECT image_key, width, height FROM images").fetchall()}
        acts = con.execute(
            "SELECT unit, list(act ORDER BY image_key) FROM topk WHERE layer = 'relu' GROUP BY unit"
        ).fetchall()
        boxes = con.execute(
            "SELECT box_x0, box_y0, box_x1, box_y1 FROM topk WHERE layer = 'relu' AND image_key = 'phone.jpg'"
        ).fetchall()
    assert sizes == {"phone.jpg": (36, 60), "twin.png": (36, 60)}
    assert len(acts) > 1
    for _unit, (phone, twin) in acts:
        assert phone == twin
    spec = Spec("folder", str(data_dir), (str(data_dir / "phone.jpg"),))
    original = open_rgb(fetch_images(spec, {"phone.jpg": "phone.jpg"})["phone.jpg"])
    assert boxes
    for x0, y0, x1, y1 in boxes:
        np.testing.assert_array_equal(np.asarray(crop_box(original, (x0, y0, x1, y1))), upright[y0:y1, x0:x1])


def test_a_turned_jpeg_stays_on_the_cpu_path_under_decode_gpu():
    """`--decode gpu` defers JPEGs to the device, which does not orient: a turned one is decoded (and turned) here."""
    preprocess = Preprocess(16, 20)
    assert decode_image(exif_jpeg(_pattern(30, 48), 1), preprocess, defer_jpeg=True)[0] is None
    pixels, width, height = decode_image(exif_jpeg(_pattern(30, 48), 6), preprocess, defer_jpeg=True)
    assert pixels is not None and (width, height) == (30, 48)
