"""Reading original images back by key from each kind of source, and refusing keys that escape the data."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import png_bytes, write_png
from pipeline.data import DataError, SourceSpec, resolve_source
from pipeline.render.fetch import fetch_images


@pytest.fixture()
def originals(tmp_path):
    rng = np.random.default_rng(0)
    return {f"cls{i % 2}/img{i}": png_bytes(rng.integers(0, 255, (8 + i, 10, 3))) for i in range(6)}


def test_folder(tmp_path, originals):
    for key, data in originals.items():
        (tmp_path / "f" / os.path.dirname(key)).mkdir(parents=True, exist_ok=True)
        (tmp_path / "f" / f"{key}.png").write_bytes(data)
    spec = resolve_source(str(tmp_path / "f"))
    wanted = {f"{k}.png": "" for k in list(originals)[:3]}
    got = fetch_images(spec, wanted)
    assert got == {f"{k}.png": originals[k] for k in list(originals)[:3]}
    with pytest.raises(DataError, match="outside the data root"):
        fetch_images(spec, {"../outside.png": ""})
    with pytest.raises(DataError, match="outside the data root"):
        fetch_images(spec, {"/etc/passwd": ""})


def test_webdataset_one_pass_over_needed_shards(tmp_path, originals):
    import webdataset as wds

    keys = list(originals)
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"s{shard}.tar")) as sink:
            for key in keys[shard::2]:
                sink.write({"__key__": key, "png": originals[key], "cls": "x"})
    spec = resolve_source(str(tmp_path / "s*.tar"))
    wanted = {keys[1]: str(tmp_path / "s1.tar"), keys[4]: str(tmp_path / "s0.tar")}
    assert fetch_images(spec, wanted) == {k: originals[k] for k in wanted}
    with pytest.raises(DataError, match="not part of this data set"):
        fetch_images(spec, {keys[0]: "/tmp/elsewhere.tar"})


def test_parquet_with_and_without_key_column(tmp_path, originals):
    import hashlib

    keys = list(originals)
    pq.write_table(pa.table({"image": [originals[k] for k in keys], "key": keys}), str(tmp_path / "a.parquet"))
    spec = SourceSpec("parquet", str(tmp_path), (str(tmp_path / "a.parquet"),))
    assert fetch_images(spec, {keys[2]: str(tmp_path / "a.parquet")}) == {keys[2]: originals[keys[2]]}
    (tmp_path / "b").mkdir()
    pq.write_table(pa.table({"image": [originals[k] for k in keys]}), str(tmp_path / "b" / "b.parquet"))
    spec = SourceSpec("parquet", str(tmp_path / "b"), (str(tmp_path / "b" / "b.parquet"),))
    hashed = f"b.parquet:{hashlib.sha1(originals[keys[3]]).hexdigest()[:16]}"
    assert fetch_images(spec, {hashed: str(tmp_path / "b" / "b.parquet")}) == {hashed: originals[keys[3]]}


def test_missing_images_are_left_out(tmp_path, originals):
    write_png(str(tmp_path / "f" / "a.png"), np.zeros((4, 4, 3)))
    spec = resolve_source(str(tmp_path / "f"))
    assert fetch_images(spec, {"a.png": "", "gone.png": ""}).keys() == {"a.png"}


def test_object_store_urls_through_pyarrow_filesystems(tmp_path, originals):
    """Shards and Parquet given as URLs (file:// here; s3:// and gs:// take the same pyarrow path) are read
    back, whether the scan recorded the source with its scheme or without it (as Ray Data reports URLs)."""
    import webdataset as wds

    keys = list(originals)
    with wds.TarWriter(str(tmp_path / "s0.tar")) as sink:
        for key in keys:
            sink.write({"__key__": key, "png": originals[key]})
    url = f"file://{tmp_path}/s0.tar"
    spec = resolve_source(url)
    assert spec.kind == "webdataset" and spec.root == f"file://{tmp_path}"
    assert fetch_images(spec, {keys[0]: url, keys[3]: str(tmp_path / "s0.tar")}) == {
        keys[0]: originals[keys[0]],
        keys[3]: originals[keys[3]],
    }
    pq.write_table(pa.table({"image": [originals[k] for k in keys], "key": keys}), str(tmp_path / "a.parquet"))
    parquet_url = f"file://{tmp_path}/a.parquet"
    spec = resolve_source(parquet_url)
    assert fetch_images(spec, {keys[5]: parquet_url}) == {keys[5]: originals[keys[5]]}
