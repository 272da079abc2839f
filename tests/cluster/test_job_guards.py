"""Hostile but fair job files (issue 11 items 9 and 11): out-of-range values refused like the CLI's, actors
checked against the local machine, decoding limits carried to the preprocessing, and a job file of the user's
that `atlas run` must not overwrite."""

from __future__ import annotations

import os

import pytest

from helpers import two_png_folder as _folder, write_toml
from pipeline.cluster.config import ConfigError, parse_config
from pipeline.ranges import RANGES


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


def test_run_never_overwrites_the_users_job_file(tmp_path, monkeypatch, capsys):
    """`out = "."` next to a job file named job.toml: the run would write its resolved config over it."""
    from pipeline.cli import main

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
