"""Hostile but fair input outside the decoder (issue 11): out-of-range values from the CLI and job files,
hard links and absolute paths in the site, and a job file that `atlas run` must not overwrite."""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import write_png
from pipeline.cluster.config import ConfigError, parse_config
from pipeline.ranges import RANGES

# ------------------------------------------------------------------------------ value ranges (item 9)


def _folder(tmp_path) -> str:
    for i in range(2):
        write_png(str(tmp_path / "data" / f"{i}.png"), np.full((8, 8, 3), 60 * i))
    return str(tmp_path / "data")


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


def _job(tmp_path, **sections) -> dict:
    data = {
        "job": {"name": "t", "out": str(tmp_path / "run")},
        "model": {"spec": "module:tiny_models:small_net", "image_size": 32},
        "data": {"source": _folder(tmp_path)},
        "scan": {"layers": "stem"},
        "render": {"classes": "none"},
        "site": {},
    }
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return data


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("model", "image_size", 1_000_000),
        ("model", "resize", 10**8),
        ("render", "size", 100_000),
        ("render", "steps", 10**9),
        ("scan", "actors", 1000 + RANGES["actors"][1]),
        ("render", "actors", 0),
        ("scan", "batch_size", 10**6),
        ("scan", "max_aspect", 0.5),
        ("scan", "max_pixels", 10**12),
        ("render", "units_per_task", 0),
    ],
)
def test_job_files_are_range_checked_like_the_cli(tmp_path, section, key, value):
    with pytest.raises(ConfigError, match=rf"^{section}\.{key} must be between .* got {value}$"):
        parse_config(_job(tmp_path, **{section: {key: value}}))


def test_run_check_reports_a_range_error_in_one_line(tmp_path, capsys):
    from pipeline.cli import main
    from test_job import write_toml

    path = write_toml(tmp_path / "job.toml", _job(tmp_path, render={"steps": 10**9}))
    assert main(["run", path, "--check"]) == 2
    assert capsys.readouterr().err.strip().endswith("render.steps must be between 1 and 100,000, got 1000000000")


def test_actors_are_checked_against_the_local_machine(tmp_path, monkeypatch):
    """Without an address the job runs on a local Ray of this machine: 1000 actors (within the cap for an
    unknown cluster) do not fit on its CPUs, and `atlas run --check` says so instead of hanging later."""
    import torch

    from pipeline.cluster.job import prepare_job

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    prepare_job(parse_config(_job(tmp_path, scan={"actors": 2}, render={"actors": 2})))
    with pytest.raises(ConfigError, match=r"scan.actors: 1000 model actors do not fit on 2 CPUs"):
        prepare_job(parse_config(_job(tmp_path, scan={"actors": 1000})))
    with pytest.raises(ConfigError, match=r"render.actors: 1000 render actors do not fit on 2 CPUs"):
        prepare_job(parse_config(_job(tmp_path, render={"actors": 1000})))
    # A remote cluster's shape is unknown until the job runs: only the cap applies.
    prepare_job(
        parse_config(
            _job(
                tmp_path,
                job={"name": "t", "out": str(tmp_path / "run"), "address": "ray://head:10001"},
                scan={"actors": 1000},
            )
        )
    )


def test_decode_limits_travel_from_the_job_file_to_the_preprocessing(tmp_path):
    from pipeline.cluster.job import prepare_job

    job = prepare_job(parse_config(_job(tmp_path, scan={"max_side": 4000, "max_pixels": 10**6, "max_aspect": 3.5})))
    model = job.scan.model
    assert (model.max_side, model.max_pixels, model.max_aspect) == (4000, 10**6, 3.5)
    from pipeline.models import load_model

    pp = load_model(model).preprocess
    assert (pp.max_side, pp.max_pixels, pp.max_aspect) == (4000, 10**6, 3.5)


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


# ------------------------------------------------------------------------------ the site (item 10)


@pytest.fixture()
def small_run(tmp_path) -> str:
    from pipeline.bench.site import synthesize_run

    run = str(tmp_path / "run")
    synthesize_run(run, layer_sizes=(3,), k=2)
    return run


def _site_files(site: str) -> dict[str, bytes]:
    found = {}
    for directory, _, names in os.walk(site):
        for name in names:
            with open(os.path.join(directory, name), "rb") as handle:
                found[os.path.relpath(os.path.join(directory, name), site)] = handle.read()
    return found


def test_a_hard_link_to_a_file_outside_the_run_is_not_published(small_run, tmp_path, caplog):
    from pipeline.site import build_site

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET-KEY-MATERIAL")
    linked = "atlas/layer=block0.conv/unit=0/crop_000.png"
    os.unlink(os.path.join(small_run, linked))
    os.link(secret, os.path.join(small_run, linked))
    with caplog.at_level("WARNING"):
        inside = _site_files(os.path.dirname(build_site(small_run, progress=False).index))
        outside = _site_files(
            os.path.dirname(build_site(small_run, out=str(tmp_path / "export"), progress=False).index)
        )
    assert "hard link" in caplog.text
    for files in (inside, outside):
        assert not any(b"SECRET-KEY-MATERIAL" in data for data in files.values())
        pages = b"\n".join(data for name, data in files.items() if name.endswith(".html"))
        assert b"unit=0/crop_000.png" not in pages
        # The rule refuses only what it must: the run's other (single-link) images are published.
        assert b"unit=0/overlay_000.png" in pages
    assert "files/atlas/layer=block0.conv/unit=0/overlay_000.png" in outside


def test_a_file_swapped_after_the_check_is_not_copied(small_run, tmp_path):
    from pipeline.site.paths import RunFiles, UnsafePathError

    files = RunFiles(small_run)
    path = "atlas/layer=block0.conv/unit=1/featvis_000.png"
    assert files.exists(path)
    with files.open(path) as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET")
    os.link(secret, os.path.join(small_run, path + ".new"))
    os.replace(os.path.join(small_run, path + ".new"), os.path.join(small_run, path))
    with pytest.raises(UnsafePathError):
        files.open(path)


def test_no_page_holds_the_runs_absolute_path(small_run, tmp_path):
    from pipeline.site import build_site

    for out in (None, str(tmp_path / "export")):
        site = os.path.dirname(build_site(small_run, out=out, progress=False).index)
        for name, data in _site_files(site).items():
            for path in {small_run, os.path.realpath(small_run)}:
                assert path.encode() not in data, name
    unit_page = _site_files(site)["units/" + sorted(os.listdir(os.path.join(site, "units")))[0] + "/0.html"]
    assert b"read_parquet(&#39;topk/*/*.parquet&#39;" in unit_page


def test_the_unit_query_runs_in_the_run_directory(small_run, monkeypatch):
    import duckdb

    from pipeline.site.build import unit_query

    monkeypatch.chdir(small_run)
    rows = duckdb.sql(unit_query("block0.conv", 1)).fetchall()
    assert [r[0] for r in rows] == [0, 1]


# ------------------------------------------------------------------------------ the user's job file (item 11)


def test_run_never_overwrites_the_users_job_file(tmp_path, monkeypatch, capsys):
    """`out = "."` next to a job file named job.toml: the run would write its resolved config over it."""
    from pipeline.cli import main
    from test_job import write_toml

    work = tmp_path / "work"
    work.mkdir()
    data = _job(tmp_path, job={"name": "t", "out": "."})
    path = write_toml(work / "job.toml", data)
    original = (work / "job.toml").read_bytes()
    monkeypatch.chdir(work)
    assert main(["run", "job.toml", "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "job.toml" in err and "not written by `atlas run`" in err
    assert main(["run", "job.toml"]) == 2
    assert (work / "job.toml").read_bytes() == original and sorted(os.listdir(work)) == ["job.toml"]
    # The same for a job.json of the user's.
    os.rename(path, work / "mine.toml")
    (work / "job.json").write_text('{"my": "notes"}')
    assert main(["run", "mine.toml", "--check"]) == 2
    assert "job.json" in capsys.readouterr().err


def test_a_runs_own_job_files_are_rewritten(tmp_path):
    """The resolved job.toml and job.json that `atlas run` wrote are its own: re-running them is fine."""
    from pipeline.cluster.config import to_toml
    from pipeline.cluster.job import check_own_files, write_resolved, prepare_job

    job = prepare_job(parse_config(_job(tmp_path)))
    os.makedirs(job.run_dir)
    write_resolved(job)
    with open(os.path.join(job.run_dir, "job.json"), "w") as handle:
        handle.write('{"name": "t", "stages": {"scan": {"status": "complete", "key": "k"}}}')
    check_own_files(job.run_dir)
    assert to_toml(job.config) in open(os.path.join(job.run_dir, "job.toml")).read()
