"""Test helpers: tiny image files, decoded batches, and an independent brute-force top-k."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: str, array: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(png_bytes(array))
    return path


def two_png_folder(tmp_path) -> str:
    """TMP/data with two 8x8 PNGs (black and grey): the smallest image folder a command accepts."""
    for i in range(2):
        write_png(str(tmp_path / "data" / f"{i}.png"), np.full((8, 8, 3), 60 * i))
    return str(tmp_path / "data")


def square_image(height: int, width: int, top: int, left: int, side: int) -> np.ndarray:
    """Black RGB image with a white side x side square at (top, left)."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[top : top + side, left : left + side] = 255
    return image


def folder_batch(root: str, paths: list[str]) -> dict[str, np.ndarray]:
    """What ray.data.read_binary_files(include_paths=True) hands the decoder."""
    blobs = []
    for path in paths:
        with open(path, "rb") as handle:
            blobs.append(handle.read())
    return {"path": np.array(paths, dtype=object), "bytes": np.array(blobs, dtype=object)}


def brute_force_topk(keys: list[str], values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort every (image, unit) maximum: act descending, ties by image_key ascending.

    values: (N, U). Returns (U, min(k, N)) arrays of keys and acts.
    """
    keys_arr = np.array(keys, dtype=object)
    order_keys, order_acts = [], []
    for unit in range(values.shape[1]):
        order = sorted(range(len(keys)), key=lambda i: (-float(values[i, unit]), keys[i]))[:k]
        order_keys.append(keys_arr[order])
        order_acts.append(values[order, unit])
    return np.array(order_keys), np.array(order_acts)


def own_processes(fragment: str) -> list[int]:
    """Live processes descended from this test process whose command line contains `fragment` (e.g. the Ray
    actor ``ray::_RenderActor`` of this session's local Ray; never another engineer's processes)."""
    import os

    parents, commands = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    commands[int(entry)] = handle.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    me = os.getpid()

    def descends(pid: int) -> bool:
        for _ in range(64):
            pid = parents.get(pid, 0)
            if pid == me:
                return True
            if pid <= 1:
                return False
        return False

    return [pid for pid, cmd in commands.items() if pid in parents and fragment in cmd and descends(pid)]


def run_and_kill(work, fragment: str, after: float = 0.0, timeout: float = 300.0, when=None):
    """Run `work()` in a thread; SIGKILL the first own process matching `fragment` once it has lived `after`
    seconds and `when()` (if given) is true; return work's result (re-raising its error). Asserts a process was
    killed. `when` ties the kill to the work's own progress (a first file written), not to a clock: on a fast
    machine a timed kill can come after the work has ended."""
    import os
    import signal
    import threading
    import time

    outcome: dict = {}

    def target():
        try:
            outcome["result"] = work()
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    killed, seen = None, None
    deadline = time.time() + timeout
    while thread.is_alive() and killed is None and time.time() < deadline:
        found = own_processes(fragment)
        if found:
            seen = seen or time.time()
            if time.time() - seen >= after and (when is None or when()):
                os.kill(found[0], signal.SIGKILL)
                killed = found[0]
        time.sleep(0.05)
    thread.join(timeout)
    assert killed is not None, f"no {fragment} process was found to kill"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def photo_batch(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, names=("chelsea", "coffee")):
    """Real photos (scikit-image's bundled ones, by name) resized to size x size, normalised: an (N, 3, size,
    size) float tensor, the input of a model's forward."""
    import torch

    from pipeline.demo_data import load_photos

    photos = load_photos()
    arrays = [np.asarray(Image.fromarray(photos[name]).resize((size, size))) for name in names]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def read_topk(run: str, layer: str) -> list[dict]:
    """A run's top-k rows of one layer as dicts (column -> value), by unit then rank."""
    from pipeline.store import connect

    con = connect(run)
    rows = con.execute("SELECT * FROM topk WHERE layer = ? ORDER BY unit, rank", [layer]).fetchall()
    columns = [d[0] for d in con.description]
    return [dict(zip(columns, row)) for row in rows]


def topk_by_unit_rank(run: str, layer: str) -> dict[tuple[int, int], dict]:
    """read_topk keyed by (unit, rank)."""
    return {(row["unit"], row["rank"]): row for row in read_topk(run, layer)}


def scanned_data(run: str) -> str:
    """The data a run was scanned from (its manifest's config.data)."""
    import json

    with open(os.path.join(run, "manifest.json")) as handle:
        return json.load(handle)["config"]["data"]


def write_toml(path, data: dict) -> str:
    """A job file (TOML) from {section: {key: value}}, values spelt as the config writes them."""
    from pipeline.cluster.config import toml_value

    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def interrupt_scan_at_commit(monkeypatch, n: int):
    """Make the n-th flush commit of the next scan raise KeyboardInterrupt (a Ctrl-C between two durable
    commits; the commits before it are durable). Returns a function that puts the real commit back."""
    from pipeline.scan.flushes import FlushStore

    original = FlushStore.commit
    calls = {"n": 0}

    def interrupted_commit(self, flush, attempt):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated Ctrl-C in the middle of the scan")
        original(self, flush, attempt)

    monkeypatch.setattr(FlushStore, "commit", interrupted_commit)
    return lambda: monkeypatch.setattr(FlushStore, "commit", original)


def scan_interrupted_at_commit(config, monkeypatch, n: int) -> None:
    """Run the scan of `config` with Ctrl-C at its n-th flush commit (interrupt_scan_at_commit), asserting it was
    interrupted; the real commit is back afterwards, so the next run_scan resumes."""
    import pytest

    from pipeline.scan.runner import run_scan

    resume_commits = interrupt_scan_at_commit(monkeypatch, n)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_scan(config)
    finally:
        resume_commits()


def strip_shell_comment(line: str) -> str:
    """A documented command line without its trailing `# ...` comment (a '#' after a space or tab, outside
    quotes, as the shell reads it), stripped."""
    out, quote = [], None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and i and line[i - 1] in " \t":
            break
        out.append(char)
    return "".join(out).strip()
