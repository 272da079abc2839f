"""Broken sources are refused before the model runs (issue 26 item 7), with one line and status 2, on real broken
files: a Parquet row with a null key, keys of another type, duplicate images in a Parquet file without a key
column (keys derived from the bytes), an image column of the wrong type, a WebDataset shard truncated inside a
member beside good shards; and after the broken shard is moved aside, the rerun completes with the good ones."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import DataError, parquet_image_key, parquet_keys, shard_keys

MODEL = ["--model", "module:tiny_models:small_net", "--image-size", "16", "--layers", "relu", "--k", "2"]


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _shard(path: str, first: int, samples: int = 4) -> None:
    with tarfile.open(path, "w") as archive:
        for i in range(first, first + samples):
            for suffix, data in (("png", _png(i)), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"sample{i:03d}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def _truncate_inside(path: str, member_index: int) -> None:
    """Cut the shard in the middle of one member's data, as an interrupted copy leaves it."""
    with tarfile.open(path) as archive:
        member = archive.getmembers()[member_index]
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: member.offset_data + member.size // 2])


def _refused(argv: list[str], monkeypatch, capsys) -> str:
    """Run `atlas scan`; the model pass must not start (Ray is where it would); return the one stderr line."""
    import pipeline.scan.runner as runner
    from pipeline.cli import main

    def no_model_pass(*args, **kwargs):
        raise AssertionError("the scan reached its model pass")

    monkeypatch.setattr(runner, "ray_session", no_model_pass)
    monkeypatch.setattr(runner, "_execute_local", no_model_pass)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "columns, words",
    [
        ({"image": [_png(0), _png(1), _png(2)], "key": ["a", None, "c"]}, ["a.parquet", "row 1", "no image key"]),
        ({"image": [_png(0), _png(1)], "key": [1.5, 2.5]}, ["key column 'key' is double"]),
        ({"image": ["x.jpg", "y.jpg"], "key": ["a", "b"]}, ["column 'image' is string", "bytes"]),
        ({"caption": ["a", "b"]}, ["none of the image columns", "caption"]),
    ],
    ids=["null-key", "float-key", "string-image", "no-image-column"],
)
def test_a_broken_parquet_is_refused_before_the_model_runs(columns, words, tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table(columns), str(tmp_path / "data" / "a.parquet"))
    argv = ["scan", *MODEL, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--quiet"]
    line = _refused(argv, monkeypatch, capsys)
    assert line.startswith("atlas: error: ") and all(word in line for word in words), line
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_duplicate_images_without_a_key_column_are_named_before_the_model_runs(tmp_path, monkeypatch, capsys):
    images = [_png(0), _png(1), _png(2), _png(1)]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"image": images}), str(tmp_path / "data" / "a.parquet"))
    argv = ["scan", *MODEL, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--quiet"]
    line = _refused(argv, monkeypatch, capsys)
    import hashlib

    derived = "a.parquet:" + hashlib.sha1(images[1]).hexdigest()[:16]  # the documented derivation, by hand
    assert f"{derived!r} (a.parquet row 1 and a.parquet row 3)" in line, line


def test_integer_keys_are_their_text_and_derived_keys_match_the_fetch_rule(tmp_path):
    path = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": [_png(0), _png(1)], "id": [7, 12]}), path)
    assert list(parquet_keys(path)) == ["7", "12"]
    pq.write_table(pa.table({"image": [{"bytes": _png(0), "path": "x.png"}]}), path)  # Hugging Face's struct
    assert list(parquet_keys(path)) == [parquet_image_key(path, _png(0))]


def test_a_truncated_shard_beside_good_shards_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for n in range(3):
        _shard(str(shards / f"s{n}.tar"), first=10 * n)
    _truncate_inside(str(shards / "s1.tar"), member_index=4)  # inside sample012.png
    assert shard_keys(str(shards / "s0.tar")) == ["sample000", "sample001", "sample002", "sample003"]
    with pytest.raises(DataError, match="truncated inside member 'sample012.png'"):
        shard_keys(str(shards / "s1.tar"))
    with open(shards / "s2.tar", "r+b") as handle:  # a shard whose second header is garbage
        handle.seek(512 + 512 * ((len(_png(20)) + 511) // 512))
        handle.write(b"\x01" * 512)
    with pytest.raises(DataError, match="damaged or truncated after sample 'sample020'"):
        shard_keys(str(shards / "s2.tar"))
    _shard(str(shards / "s2.tar"), first=20)
    argv = ["scan", *MODEL, "--data", str(shards), "--out", str(tmp_path / "run"), "--quiet"]
    line = _refused(argv, monkeypatch, capsys)
    assert "s1.tar" in line and "truncated" in line and "remove it" in line, line


@pytest.mark.slow
def test_after_the_broken_shard_is_moved_aside_the_rerun_completes(ray_cluster, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.store import read_manifest

    shards = tmp_path / "shards"
    shards.mkdir()
    for n in range(3):
        _shard(str(shards / f"s{n}.tar"), first=10 * n)
    _truncate_inside(str(shards / "s1.tar"), member_index=4)
    argv = ["scan", *MODEL, "--data", str(shards), "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 2
    os.rename(shards / "s1.tar", tmp_path / "s1.tar.broken")
    assert main(argv) == 0, capsys.readouterr().err
    assert read_manifest(str(tmp_path / "run"))["counts"]["images_ok"] == 8
