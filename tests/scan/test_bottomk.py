"""Exact bottom-k (`atlas scan --bottom-k`): each unit's images with the lowest per-image maximum, against a brute
force over every image (an independent forward pass), with exact ties broken by key, through flushes, merges and
a resume. In-process (--executor local): the bottom-k rides on the same ScanState flushes as the top-k, whose Ray
paths tests/scan/test_scan_ray.py covers."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from helpers import brute_force_topk, scan_interrupted_at_commit
from scan_reference import LAYERS, SMALL, reference_maxima
from pipeline.scan.runner import ScanConfig, run_scan
from pipeline.store import connect, read_manifest


@pytest.fixture(scope="module")
def dark_ties(photo_folder, tmp_path_factory):
    """The photos plus exact duplicates under other names, and two all-black images (a tie at the bottom of
    every unit that only the key breaks)."""
    from PIL import Image

    folder = str(tmp_path_factory.mktemp("bottom"))
    shutil.copytree(photo_folder, folder, dirs_exist_ok=True)
    for name in ("astronaut", "chelsea"):
        src = sorted(os.listdir(os.path.join(photo_folder, name)))[0]
        for copy in ("aaa_copy.jpg", "zzz_copy.jpg"):
            shutil.copy(os.path.join(photo_folder, name, src), os.path.join(folder, name, copy))
    os.makedirs(os.path.join(folder, "black"), exist_ok=True)
    for name in ("b.jpg", "a.jpg"):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(os.path.join(folder, "black", name))
    return folder


def brute_force_bottomk(keys: list[str], values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort every (image, unit) maximum ascending, ties by image_key ascending."""
    got_keys, negated = brute_force_topk(keys, -values, k)
    return got_keys, -negated


def read_bottomk(run: str, layer: str) -> list[tuple]:
    return (
        connect(run)
        .execute("SELECT unit, rank, image_key, act, y, x FROM bottomk WHERE layer = ? ORDER BY unit, rank", [layer])
        .fetchall()
    )


def check_against_brute_force(run: str, folder: str, k: int) -> None:
    keys, values, where = reference_maxima(folder)
    for name in LAYERS:
        expected_keys, expected_acts = brute_force_bottomk(keys, values[name], k)
        rows = read_bottomk(run, name)
        units = values[name].shape[1]
        assert len(rows) == units * k
        got_keys = np.array([r[2] for r in rows], dtype=object).reshape(units, k)
        np.testing.assert_allclose(np.array([r[3] for r in rows]).reshape(units, k), expected_acts, atol=1e-6)
        assert (got_keys == expected_keys).all(), name
        for unit, _, key, _, y, x in rows:  # the position is the image's argmax, as in the top-k
            i = keys.index(key)
            assert (y, x) == (where[name][0][i, unit], where[name][1][i, unit])


@pytest.mark.parametrize("batch_size,flush_images", [(4, 50_000), (2, 1), (8, 3)])
def test_bottomk_equals_brute_force(dark_ties, tmp_path, batch_size, flush_images):
    k = 6
    run = str(tmp_path / "run")
    manifest = run_scan(
        ScanConfig(
            model=SMALL,
            data=dark_ties,
            out=run,
            layers=",".join(LAYERS),
            k=3,
            bottom_k=k,
            batch_size=batch_size,
            flush_images=flush_images,
            progress=False,
            executor="local",
        )
    )
    assert manifest["bottom_k"] == k and manifest["counts"]["images_ok"] == 42
    check_against_brute_force(run, dark_ties, k)
    con = connect(run)
    # The two black images tie at the bottom of the 'relu' units they reach at all; the key decides: a before b.
    black = con.execute(
        "SELECT unit, list(image_key ORDER BY rank) FROM bottomk WHERE layer = 'stem' AND image_key LIKE 'black/%' "
        "GROUP BY unit"
    ).fetchall()
    assert black and all(keys == ["black/a.jpg", "black/b.jpg"] for _, keys in black if len(keys) == 2)
    # The top-k is untouched by the option.
    assert (
        con.execute("SELECT count(*) FROM topk").fetchone()[0]
        == 3 * con.execute("SELECT count(*) FROM units").fetchone()[0]
    )


def test_bottomk_enters_the_fingerprint_and_resumes_exactly(dark_ties, tmp_path, monkeypatch):
    from pipeline.store import RunError

    config = ScanConfig(
        model=SMALL,
        data=dark_ties,
        out=str(tmp_path / "run"),
        layers=",".join(LAYERS),
        k=4,
        bottom_k=5,
        batch_size=4,
        flush_images=4,
        progress=False,
        executor="local",
    )
    scan_interrupted_at_commit(config, monkeypatch, 4)
    assert read_manifest(config.out) is None
    resumed = run_scan(config)
    assert [a["images_committed"] for a in resumed["attempts"]][0] == 12
    check_against_brute_force(config.out, dark_ties, 5)
    clean = str(tmp_path / "clean")
    run_scan(ScanConfig(**{**config.__dict__, "out": clean}))
    query = "SELECT * FROM bottomk ORDER BY layer, unit, rank"
    assert connect(config.out).execute(query).fetchall() == connect(clean).execute(query).fetchall()
    # Another bottom_k is another scan: a complete run is not silently reused or mixed.
    with pytest.raises(RunError):
        run_scan(ScanConfig(**{**config.__dict__, "bottom_k": 2}))
    # Without --bottom-k the view exists, empty, with its columns.
    plain = str(tmp_path / "plain")
    run_scan(ScanConfig(**{**config.__dict__, "out": plain, "bottom_k": 0}))
    assert connect(plain).execute("SELECT count(*) FROM bottomk").fetchone()[0] == 0
