"""Hostile but fair input to the scan outside the decoder (issue 11 item 9): out-of-range values from the CLI
refused in one line before any work, and the decoding limits recorded by a real scan with the refused images listed."""

from __future__ import annotations

import os

import numpy as np

from helpers import two_png_folder as _folder, write_png


def test_a_huge_image_size_is_one_line_before_any_work(tmp_path, capsys):
    """--image-size 1000000 asked torch for a 12 TB tensor (a traceback); now one line and status 2, before
    the model is built."""
    from pipeline.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "scan",
            "--model",
            "module:tiny_models:hand_net",
            "--image-size",
            "1000000",
            "--data",
            _folder(tmp_path),
            "--out",
            str(out),
            "-q",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "atlas: error: image_size must be between 1 and 4,096, got 1000000"
    assert not out.exists()
    for flag, value, name in (
        ("--max-pixels", "0", "max_pixels"),
        ("--resize", "99999999", "resize"),
        ("--k", "0", "k"),
        ("--actors", "5000", "actors"),
    ):
        assert (
            main(
                [
                    "scan",
                    "--model",
                    "module:tiny_models:hand_net",
                    "--data",
                    _folder(tmp_path),
                    "--out",
                    str(out),
                    flag,
                    value,
                    "-q",
                ]
            )
            == 2
        )
        assert f"{name} must be between" in capsys.readouterr().err
        assert not out.exists()


def test_scan_records_the_limits_and_lists_refused_images(ray_cluster, tmp_path):
    """A real scan: an image over a limit is an 'error' row with the message and its header's size; the
    limits are recorded in the manifest's preprocessing (and so in the fingerprint)."""
    import duckdb

    from pipeline.cli import main

    data = _folder(tmp_path)
    write_png(os.path.join(data, "strip.png"), np.full((4, 300, 3), 200))
    out = str(tmp_path / "run")
    assert (
        main(
            [
                "scan",
                "--model",
                "module:tiny_models:hand_net",
                "--image-size",
                "8",
                "--data",
                data,
                "--out",
                out,
                "--layers",
                "relu1",
                "--batch-size",
                "2",
                "--max-aspect",
                "50",
                "-q",
            ]
        )
        == 0
    )
    from pipeline.store import read_manifest

    manifest = read_manifest(out)
    assert manifest["preprocess"]["max_aspect"] == 50.0 and manifest["preprocess"]["max_side"] == 20_000
    rows = duckdb.sql(
        f"SELECT image_key, status, error, width, height FROM '{out}/images/*.parquet' ORDER BY image_key"
    ).fetchall()
    assert [r[:2] for r in rows] == [("0.png", "ok"), ("1.png", "ok"), ("strip.png", "error")]
    assert "aspect ratio 75:1 over max_aspect 50" in rows[2][2] and rows[2][3:] == (300, 4)
