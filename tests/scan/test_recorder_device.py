"""The Recorder's hot path (issue 18), on CPU: an image's maxima and top-k do not depend on the batch it is in,
and folding a batch into the running state makes no host synchronisation (no .item(), .cpu(), .tolist(),
.numpy(), torch.unique or boolean-mask indexing) per layer, or at all."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

from pipeline.models import ModelConfig
from pipeline.scan.recorder import Recorder, RecorderConfig, ScanState

SMALL = ModelConfig(spec="module:tiny_models:small_net", image_size=32)
LAYERS = ("stem", "relu", "down", "head.2")
UNITS = {"stem": 8, "relu": 8, "down": 12, "head.2": 5}


def decoded(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Copies of a few images under other keys: exact ties that only the key order may break.
    base = rng.integers(0, 256, (n // 2, 32, 32, 3), dtype=np.uint8)
    pixels = np.concatenate([base, base[: n - len(base)]])
    return {
        "image_key": np.array([f"img-{(i * 37) % n:04d}" for i in range(n)], dtype=object),
        "source": np.array(["s"] * n, dtype=object),
        "label": np.array([None] * n, dtype=object),
        "width": np.full(n, 32, np.int32),
        "height": np.full(n, 32, np.int32),
        "status": np.array(["ok"] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
        "pixels": pixels,
    }


def scan_in_batches(batch: dict, size: int) -> ScanState:
    """The images handed to the Recorder `size` at a time (as blocks of any size reach it), forward passes of
    its batch_size (16)."""
    recorder = Recorder(RecorderConfig(model=SMALL, layers=LAYERS, k=5, device="cpu", threads=1, batch_size=16), UNITS)
    n = len(batch["image_key"])
    for i in range(0, n, size):
        recorder.record({name: column[i : i + size] for name, column in batch.items()})
    return ScanState.from_bytes(recorder.flush().state)


def test_the_forward_pass_alone_depends_on_the_batch_size():
    """Why the Recorder pads: the same images in forward passes of other sizes differ in the last bits on CPU
    (if this ever passes everywhere, the padding could go), while one shape gives equal bits whatever the
    other images and their order."""
    from pipeline.models import feature_extractor, load_model

    torch.manual_seed(0)
    model = feature_extractor(load_model(ModelConfig("torchvision:resnet18", image_size=64)).model, ["layer2"])
    x = torch.randn(16, 3, 64, 64)
    with torch.inference_mode():
        whole = model(x)["layer2"]
        alone = torch.cat([model(x[i : i + 1])["layer2"] for i in range(16)])
        other = torch.randn(16, 3, 64, 64)
        other[3:9] = x[:6]
        mixed = model(other)["layer2"][3:9]
    assert torch.equal(whole[:6], mixed)
    if torch.equal(whole, alone):
        pytest.skip("this CPU's kernels happen to give equal bits at every batch size")


def test_maxima_and_topk_do_not_depend_on_the_batch():
    batch = decoded(64)
    states = {size: scan_in_batches(batch, size) for size in (1, 7, 64)}
    reference = states[64]
    for size, state in states.items():
        for layer in LAYERS:
            a, b = state.topk[layer].result(), reference.topk[layer].result()
            # Bit-equal values (not merely close): ties then break by key alone.
            assert np.array_equal(a["values"].view(np.int32), b["values"].view(np.int32)), (size, layer)
            assert (a["keys"] == b["keys"]).all() and all((a[p] == b[p]).all() for p in ("y", "x")), (size, layer)
            ma, mb = state.moments[layer].result(), reference.moments[layer].result()
            assert np.array_equal(ma["max"], mb["max"]) and np.array_equal(ma["n_active"], mb["n_active"])
            np.testing.assert_allclose(ma["mean"], mb["mean"], rtol=1e-12)
            assert torch.equal(state.sketch[layer]._counts, reference.sketch[layer]._counts)


@contextlib.contextmanager
def counting_host_syncs():
    """Count the calls that copy device data to the host (on a GPU: synchronisations)."""
    counts: dict[str, int] = {}
    originals = {}

    def wrap(owner, name):
        original = getattr(owner, name)
        originals[(owner, name)] = original

        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    for name in ("item", "cpu", "tolist", "numpy", "nonzero", "__bool__"):
        wrap(torch.Tensor, name)
    wrap(torch, "unique")
    original_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            counts["mask_index"] = counts.get("mask_index", 0) + 1
        return original_getitem(self, index)

    torch.Tensor.__getitem__ = getitem
    try:
        yield counts
    finally:
        torch.Tensor.__getitem__ = original_getitem
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def test_folding_a_batch_makes_no_host_synchronisation():
    recorder = Recorder(RecorderConfig(model=SMALL, layers=LAYERS, k=5, device="cpu", threads=1), UNITS)
    batch = decoded(48)
    recorder.record({name: column[:16] for name, column in batch.items()})  # the first batch builds the state
    with counting_host_syncs() as counts:
        recorder.record({name: column[16:32] for name, column in batch.items()})
        recorder.record({name: column[32:] for name, column in batch.items()})
    assert counts == {}, f"host synchronisations in the hot path: {counts}"
    # The hand-over is where the state leaves the device: one compaction per layer there is expected.
    with counting_host_syncs() as counts:
        recorder.flush()
    assert counts.get("cpu", 0) > 0


def test_the_counter_would_catch_a_synchronisation():
    """The check above can fail: a deliberate .item() per layer is counted."""
    with counting_host_syncs() as counts:
        for _layer in LAYERS:
            torch.ones(1).item()
    assert counts == {"item": len(LAYERS)}


@pytest.mark.parametrize("precision", ["bf16"])
def test_reduced_precision_runs_and_is_recorded(precision):
    recorder = Recorder(RecorderConfig(model=SMALL, layers=LAYERS, k=3, device="cpu", precision=precision), UNITS)
    recorder.record(decoded(8))
    state = ScanState.from_bytes(recorder.flush().state)
    assert state.images_ok == 8 and np.isfinite(state.topk["down"].result()["values"]).all()
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def _resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_memory_between_flushes_is_a_few_hundred_bytes_per_image():
    """Issue 25: what a worker keeps per image until a flush is its key and its images-table row, not tensors
    or tables that grow per batch (on main: per-layer key tables rebuilt every batch and (units x buckets)
    temporaries, whose heap churn grew the resident size ~5 KB per image here, ~400 KB with MobileNetV2 at
    128 px). Measured from image 1,024 to 5,120 of one flush: Python-level allocations (tracemalloc) and the
    resident size."""
    import tracemalloc

    recorder = Recorder(
        RecorderConfig(model=SMALL, layers=LAYERS, k=5, device="cpu", threads=1, flush_images=10**6), UNITS
    )
    n = 16
    blank = decoded(n)

    def batch(start: int) -> dict[str, np.ndarray]:
        keys = np.array([f"some/folder/image-{i:08d}.jpg" for i in range(start, start + n)], dtype=object)
        return dict(blank, image_key=keys)

    tracemalloc.start()
    try:
        for start in range(0, 1024, n):
            recorder.record(batch(start))
        traced, resident = tracemalloc.get_traced_memory()[0], _resident_mb()
        for start in range(1024, 5120, n):
            recorder.record(batch(start))
        traced_per_image = (tracemalloc.get_traced_memory()[0] - traced) / 4096
        resident_per_image = (_resident_mb() - resident) * 2**20 / 4096
    finally:
        tracemalloc.stop()
    assert traced_per_image < 300, traced_per_image  # the key (about 75 bytes) and row, a few pointers
    assert resident_per_image < 1500, resident_per_image
    flush = recorder.flush()
    assert flush.images == 5120 and ScanState.from_bytes(flush.state).images_ok == 5120
