"""Source resolution and decoding (pipeline.data): the kinds of source, and clear errors for what is not one."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import write_png
from pipeline.data import DataError, Decoder, SourceSpec, resolve_source
from pipeline.preprocess import Preprocess


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
