"""The scan's numbers on a hand-weighted CNN (tiny_models.HandNet), worked out by hand, without Ray."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import folder_batch, square_image, write_png
from pipeline.data import Decoder, SourceSpec
from pipeline.models import ModelConfig, load_model
from pipeline.receptive_field import receptive_fields
from pipeline.scan.recorder import Recorder, RecorderConfig, ScanResult, ScanState, image_facts, layer_maxima

HAND = ModelConfig(
    spec="module:tiny_models:hand_net", image_size=16, resize=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
)


def test_layer_maxima_by_hand():
    act = torch.tensor(
        [[[[1.0, 3.0, 2.0], [3.0, 0.0, -1.0]], [[-5.0, -4.0, -6.0], [-7.0, -4.0, -9.0]]]]
    )  # (1, 2, 2, 3)
    values, y, x = layer_maxima(act)
    assert values.tolist() == [[3.0, -4.0]]
    # Ties: the first position in row-major order wins, for both units.
    assert y.tolist() == [[0, 0]] and x.tolist() == [[1, 1]]


@pytest.fixture()
def hand_images(tmp_path):
    root = tmp_path / "hand"
    paths = [
        # 16x16, no resize: a white 3x3 square at rows/cols 4..6.
        write_png(str(root / "square.png"), square_image(16, 16, 4, 4, 3)),
        # All black: every unit is 0 everywhere; first in key order, so it wins every tie.
        write_png(str(root / "0black.png"), np.zeros((16, 16, 3), np.uint8)),
        # 20 wide x 16 tall: no scaling, the centre crop drops 2 columns on each side.
        write_png(str(root / "wide.png"), square_image(16, 20, 4, 6, 3)),
    ]
    return str(root), paths


def scan_hand(root: str, paths: list[str], k: int = 3, batches: list[list[int]] | None = None) -> ScanResult:
    loaded = load_model(HAND)
    decoder = Decoder(SourceSpec("folder", root, tuple(paths)), loaded.preprocess)
    units = {"relu1": 2, "conv2": 1}
    # flush_images=1: every batch becomes its own flush, and the flushes are merged as the scan merges them.
    recorder = Recorder(RecorderConfig(model=HAND, layers=("relu1", "conv2"), k=k, device="cpu", flush_images=1), units)
    state = ScanState(units, k)
    facts: dict = {}
    for batch in batches or [list(range(len(paths)))]:
        decoded = decoder(folder_batch(root, [paths[i] for i in batch]))
        flush = recorder(decoded)
        state.merge(ScanState.from_bytes(flush.state))
        facts.update(image_facts(pq.read_table(io.BytesIO(flush.image_rows))))
    result = ScanResult(state)
    result.facts = facts  # image_key -> (label, width, height), as the scan joins them from the images table
    return result


def test_hand_net_receptive_fields_by_hand():
    fields = receptive_fields(load_model(HAND).model, ["relu1", "conv2"], (16, 16))
    assert (fields["relu1"].size, fields["relu1"].stride, fields["relu1"].offset) == ((3, 3), (1, 1), (-1, -1))
    assert (fields["conv2"].size, fields["conv2"].stride, fields["conv2"].offset) == ((6, 6), (4, 4), (-1, -1))


def test_hand_net_top_k_values_positions_and_boxes(hand_images):
    root, paths = hand_images
    loaded = load_model(HAND)
    fields = receptive_fields(loaded.model, ["relu1", "conv2"], (16, 16))
    reducer = scan_hand(root, paths)
    relu1 = reducer.topk_table("relu1", fields["relu1"], loaded.preprocess, reducer.facts).to_pylist()
    conv2 = reducer.topk_table("conv2", fields["conv2"], loaded.preprocess, reducer.facts).to_pylist()
    row = {(r["unit"], r["rank"]): r for r in relu1}

    # Unit 0 = mean of red over a 3x3 window: 1.0 where the window sits exactly on the square, centre (5, 5).
    # 'square.png' and 'wide.png' tie at 1.0; the key breaks the tie.
    assert [row[0, r]["image_key"] for r in range(3)] == ["square.png", "wide.png", "0black.png"]
    assert [row[0, r]["act"] for r in range(3)] == pytest.approx([1.0, 1.0, 0.0])
    assert (row[0, 0]["y"], row[0, 0]["x"]) == (5, 5)
    box = lambda r: (r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"])  # noqa: E731
    assert box(row[0, 0]) == (4, 4, 7, 7)  # exactly the square
    # wide.png: the crop starts at original column 2, so the square (columns 6..8) maps back exactly.
    assert (row[0, 1]["y"], row[0, 1]["x"]) == (5, 5) and box(row[0, 1]) == (6, 4, 9, 7)
    # All-black image: every position is 0; the first (0, 0) wins; its 3x3 field clipped at the border.
    assert (row[0, 2]["y"], row[0, 2]["x"]) == (0, 0) and box(row[0, 2]) == (0, 0, 2, 2)

    # Unit 1 = minus unit 0, after ReLU: 0 everywhere on every image, ranked by key.
    assert [row[1, r]["image_key"] for r in range(3)] == ["0black.png", "square.png", "wide.png"]
    assert [row[1, r]["act"] for r in range(3)] == [0.0, 0.0, 0.0]

    # conv2 = sum of the 2x2 max-pooled unit-0 map over a 2x2 window, stride 2. At (1, 1) it reads the pooled
    # cells (2,2)=1, (2,3)=6/9, (3,2)=6/9, (3,3)=4/9 -> 25/9, the maximum; its field is rows/cols [3, 9).
    top = conv2[0]
    assert top["image_key"] == "square.png" and top["act"] == pytest.approx(25 / 9, rel=1e-6)
    assert (top["y"], top["x"]) == (1, 1) and box(top) == (3, 3, 9, 9)
    assert conv2[1]["image_key"] == "wide.png" and box(conv2[1]) == (5, 3, 11, 9)


def test_hand_net_unit_statistics_and_dead_unit(hand_images):
    root, paths = hand_images
    reducer = scan_hand(root, paths)
    units = {(r["layer"], r["unit"]): r for r in reducer.units_table("relu1").to_pylist()}
    live, dead = units["relu1", 0], units["relu1", 1]
    assert live["count"] == 3 and live["n_active"] == 2 and not live["dead"]
    assert live["mean"] == pytest.approx(2 / 3) and live["max"] == pytest.approx(1.0)
    assert live["std"] == pytest.approx(np.std([1.0, 1.0, 0.0]))
    assert live["frac_active"] == pytest.approx(2 / 3)
    assert dead["dead"] and dead["n_active"] == 0 and dead["max"] == 0.0 and dead["p99"] == 0.0


@pytest.mark.parametrize("batches", [[[0], [1], [2]], [[2, 0], [1]], [[1, 2], [0]]])
def test_hand_net_result_independent_of_batching(hand_images, batches):
    root, paths = hand_images
    loaded = load_model(HAND)
    fields = receptive_fields(loaded.model, ["relu1", "conv2"], (16, 16))
    reference, other = scan_hand(root, paths), scan_hand(root, paths, batches=batches)
    reference = reference.topk_table("relu1", fields["relu1"], loaded.preprocess, reference.facts)
    other = other.topk_table("relu1", fields["relu1"], loaded.preprocess, other.facts)
    assert other.equals(reference)


def test_downscaled_image_box_maps_back_by_the_resize_factor(tmp_path):
    """A 32x32 image is downscaled 2x: the argmax is found on the decoded input by an independent numpy
    forward, and its box [4, 7) in input pixels must come back as [8, 14) in original pixels."""
    root = tmp_path / "big"
    path = write_png(str(root / "big.png"), square_image(32, 32, 8, 8, 6))
    loaded = load_model(HAND)
    decoded = Decoder(SourceSpec("folder", str(root), (path,)), loaded.preprocess)(folder_batch(str(root), [path]))
    red = np.pad(decoded["pixels"][0, :, :, 0].astype(np.float64) / 255.0, 1)
    window_mean = sum(red[dy : dy + 16, dx : dx + 16] for dy in range(3) for dx in range(3)) / 9
    y, x = np.unravel_index(np.argmax(window_mean), window_mean.shape)
    assert (y, x) == (5, 5)
    fields = receptive_fields(loaded.model, ["relu1"], (16, 16))
    recorder = Recorder(RecorderConfig(model=HAND, layers=("relu1",), k=1, device="cpu"), {"relu1": 2})
    recorder.record(decoded)
    flush = recorder.flush()
    reducer = ScanResult(ScanState.from_bytes(flush.state))
    facts = image_facts(pq.read_table(io.BytesIO(flush.image_rows)))
    row = reducer.topk_table("relu1", fields["relu1"], loaded.preprocess, facts).to_pylist()[0]
    assert row["act"] == pytest.approx(window_mean[y, x], abs=1e-6)
    assert (row["y"], row["x"]) == (5, 5)
    assert (row["box_x0"], row["box_y0"], row["box_x1"], row["box_y1"]) == (8, 8, 14, 14)
