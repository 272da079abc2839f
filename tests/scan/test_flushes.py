"""Durable progress without Ray: duplicate keys named before the model runs, flushes committed whole, overlaps
resolved exactly, and what a pass still has to read."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import DataError, resolve_source
from pipeline.fileio import atomic_write
from pipeline.scan.flushes import FlushStore, SourceIndex, plan_pass
from pipeline.scan.recorder import Flush, ScanState
from pipeline.store import IMAGES_SCHEMA


def write_tar(path: str, keys: list[str]) -> str:
    with tarfile.open(path, "w") as archive:
        for key in keys:
            data = b"not really a jpeg"
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_duplicate_keys_are_named_before_the_model_runs(tmp_path):
    """Issue 11 case 7: a Parquet key column or tar shards with a repeated key fail at once, naming it."""
    table = pa.table({"image_key": ["a", "b", "a"], "image": [b"x", b"y", b"z"]})
    pq.write_table(table, tmp_path / "images.parquet")
    with pytest.raises(DataError, match=r"not unique.*'a'"):
        SourceIndex.build(resolve_source(str(tmp_path / "images.parquet")))
    write_tar(str(tmp_path / "s0.tar"), ["k1", "k2"])
    write_tar(str(tmp_path / "s1.tar"), ["k3", "k2"])
    with pytest.raises(DataError, match=r"'k2' \(s0.tar and s1.tar\)"):
        SourceIndex.build(resolve_source(str(tmp_path / "s{0..1}.tar")))
    index = SourceIndex.build(resolve_source(str(tmp_path / "s0.tar")))
    assert list(index.totals.values()) == [2]


def flush(flush_id: str, keys: list[str], source: str) -> Flush:
    rows = pa.table(
        {
            "image_key": keys,
            "source": [source] * len(keys),
            "label": [None] * len(keys),
            "width": pa.array([1] * len(keys), pa.int32()),
            "height": pa.array([1] * len(keys), pa.int32()),
            "status": ["ok"] * len(keys),
            "error": pa.array([None] * len(keys), pa.string()),
        },
        schema=IMAGES_SCHEMA,
    )
    buffer = io.BytesIO()
    pq.write_table(rows, buffer)
    state = ScanState({"l": 1}, 2)
    return Flush(
        flush_id=flush_id, images=len(keys), images_ok=len(keys), state=state.to_bytes(), image_rows=buffer.getvalue()
    )


def test_overlapping_flushes_keep_the_earlier_and_passes_read_what_is_left(tmp_path):
    """Issue 13: an image in two committed flushes is counted once (the later flush is dropped and its other
    images are read again); fully covered files are skipped, partly covered ones read with their keys skipped."""
    data = tmp_path / "data"
    data.mkdir()
    for name, rows in (("a.parquet", ["a1", "a2"]), ("b.parquet", ["b1", "b2", "b3"])):
        pq.write_table(pa.table({"image_key": rows, "image": [b"x"] * len(rows)}), data / name)
    spec = resolve_source(str(data))
    index = SourceIndex.build(spec)
    store = FlushStore(str(tmp_path / "staging"))
    a, b = str(data / "a.parquet"), str(data / "b.parquet")
    store.commit(flush("w1-000000", ["a1", "a2"], a), attempt=1)
    store.commit(flush("w2-000000", ["b1"], b), attempt=1)
    store.commit(flush("w3-000000", ["b1", "b2"], b), attempt=1)  # b1 again: a retried batch
    assert store.drop_overlaps() == ["w3-000000"] and store.flush_ids() == ["w1-000000", "w2-000000"]
    assert store.counts() == (3, 3)
    work = plan_pass(spec, index, store)
    assert work.spec.files == (b,) and work.images == 2
    assert work.skip == {os.path.abspath(b): frozenset({"b1"})}
    store.commit(flush("w1-000001", ["b2", "b3"], b), attempt=2)
    assert plan_pass(spec, index, store).empty


def test_a_failed_commit_leaves_nothing(tmp_path, monkeypatch):
    store = FlushStore(str(tmp_path / "staging"))
    broken = flush("w1-000000", ["k"], "s")
    broken.maxima_dir = str(tmp_path / "missing")  # record=all without a shared file system
    with pytest.raises(RuntimeError, match="shared by every node"):
        store.commit(broken, attempt=1)
    assert store.flush_ids() == []
    store.clear_uncommitted()
    assert os.listdir(store.root) == []


def test_atomic_write_follows_the_umask(tmp_path):
    """Issue 11 case 3 at its root: every committed file (Parquet, JSON, PNG, site pages and exports) goes
    through atomic_write, which gives 0666 & ~umask (mkstemp alone gives 0600)."""
    from pipeline.site.writer import SiteWriter

    old = os.umask(0o027)
    try:
        atomic_write(str(tmp_path / "a.bin"), b"x")
        writer = SiteWriter(str(tmp_path / "site"))
        writer.write("page.html", "<p>x</p>")
        source = tmp_path / "image.png"
        source.write_bytes(np.zeros(10, np.uint8).tobytes())
        with open(source, "rb") as handle:
            writer.copy(handle, "files/image.png")
    finally:
        os.umask(old)
    for path in (tmp_path / "a.bin", tmp_path / "site" / "page.html", tmp_path / "site" / "files" / "image.png"):
        assert os.stat(path).st_mode & 0o777 == 0o640, path
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_files_of_unknown_size_are_done_only_when_every_image_is_covered(tmp_path):
    """Shards by URL are not listed ahead; once a flush is committed, a pass plan learns each file's size from
    the file itself (a tar's headers by ranged reads, a compressed shard streamed, a Parquet footer) and a file
    is skipped only when the committed flushes cover all of its images, whatever the last pass reported."""
    write_tar(str(tmp_path / "s0.tar"), ["k1", "k2", "k3"])
    write_tar(str(tmp_path / "s1.tar"), ["k4", "k5"])
    with tarfile.open(tmp_path / "s2.tar.gz", "w:gz") as archive:
        for key in ("k6", "k7"):
            for ext in ("jpg", "cls"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = 1
                archive.addfile(info, io.BytesIO(b"x"))
    spec = resolve_source(f"file://{tmp_path}/{{s0.tar,s1.tar,s2.tar.gz}}")
    index = SourceIndex.build(spec)
    assert list(index.totals.values()) == [None, None, None]
    store = FlushStore(str(tmp_path / "staging"))
    first = plan_pass(spec, index, store)  # nothing committed yet: read everything, list nothing
    assert first.spec.files == spec.files and list(index.totals.values()) == [None, None, None]
    s0, s1, s2 = (str(tmp_path / name) for name in ("s0.tar", "s1.tar", "s2.tar.gz"))
    store.commit(flush("w1-000000", ["k1", "k3"], s0), attempt=1)  # k2 lost without a word
    store.commit(flush("w1-000001", ["k4", "k5"], s1), attempt=1)
    work = plan_pass(spec, index, store)
    assert list(index.totals.values()) == [3, 2, 2]
    assert work.spec.files == (spec.files[0], spec.files[2]) and work.images == 1 + 2
    assert work.skip == {s0: frozenset({"k1", "k3"})}
    store.commit(flush("w1-000002", ["k2"], s0), attempt=1)
    store.commit(flush("w1-000003", ["k6", "k7"], s2), attempt=1)
    assert plan_pass(spec, index, store).empty
    pq.write_table(pa.table({"image": [b"x"] * 4}), tmp_path / "p.parquet")
    parquet = resolve_source(f"file://{tmp_path}/p.parquet")
    parquet_index = SourceIndex.build(parquet)
    parquet_index.learn(parquet)
    assert list(parquet_index.totals.values()) == [4]
    # A shard cut short inside a member is named, not counted short.
    data = (tmp_path / "s0.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: 1024 + 600])  # inside k2.jpg
    cut = resolve_source(f"file://{tmp_path}/cut.tar")
    with pytest.raises(DataError, match="cut.tar is (damaged or )?truncated"):
        SourceIndex.build(cut).learn(cut)


def test_shards_by_url_match_the_files_ray_reports(tmp_path):
    """Ray Data reports an object-store file as 'bucket/key' (no scheme): the covered keys of a shard given as
    s3://bucket/key must be found under that spelling, by the plan and by the decoder's skip (found by the
    cluster test: made absolute, they never matched, every pass re-read everything and the flushes overlapped)."""
    from pipeline.data import Decoder, SourceSpec
    from pipeline.preprocess import Preprocess

    url = "s3://atlas/shards/s0.tar"
    spec = SourceSpec("webdataset", "s3://atlas/shards", (url,))
    index = SourceIndex({"atlas/shards/s0.tar": 3})  # as if learnt from the shard
    store = FlushStore(str(tmp_path / "staging"))
    store.commit(flush("w1-000000", ["k1", "k3"], "atlas/shards/s0.tar"), attempt=1)  # Ray's spelling
    work = plan_pass(spec, index, store)
    assert work.images == 1 and work.skip == {"atlas/shards/s0.tar": frozenset({"k1", "k3"})}
    batch = {
        "__key__": np.array(["k1", "k2", "k3"], dtype=object),
        "__url__": np.array(["atlas/shards/s0.tar"] * 3, dtype=object),
        "jpg": np.array([b"x"] * 3, dtype=object),
    }
    decoder = Decoder(spec, Preprocess(image_size=32, resize=32), skip=work.skip)
    assert list(decoder(batch)["image_key"]) == ["k2"]
    store.commit(flush("w1-000001", ["k2"], "atlas/shards/s0.tar"), attempt=2)
    assert plan_pass(spec, index, store).empty
