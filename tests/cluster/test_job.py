"""Job files and `atlas run`: validation before any work, overrides, resolved config, resumable stages,
object-store (URL) run directories through pyarrow filesystems."""

from __future__ import annotations

import glob
import json
import os
import time
import tomllib

import pytest
import torch

from helpers import write_toml
from repo_paths import REPO_ROOT
from pipeline.cluster.config import ConfigError, load_config, parse_config, to_toml
from pipeline.cluster.job import prepare_job, run_job
from pipeline.store import RunError

REPO = REPO_ROOT


@pytest.fixture(scope="module")
def resnet8_weights(tmp_path_factory) -> str:
    from pipeline.zoo import resnet8

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("weights") / "resnet8.pt")
    torch.save(resnet8().state_dict(), path)
    return path


def job_dict(out: str, weights: str, photos: str) -> dict:
    return {
        "job": {"name": "tiny", "out": out},
        "model": {"spec": "module:pipeline.zoo:resnet8", "weights": weights, "image_size": 32, "resize": 32},
        "data": {"source": photos},
        "scan": {"layers": "layer1,layer3,linear", "k": 4, "batch_size": 8},
        "render": {"layers": ["layer1", "linear"], "units": "0-1", "classes": "0-1", "steps": 4, "size": 32},
        "site": {},
    }


# --------------------------------------------------------------------------------------- shape checks


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    data = job_dict("run", "w.pt", "photos")
    data["render"]["step"] = 3
    with pytest.raises(ConfigError, match=r"unknown key render\.step \(did you mean 'steps'\?\)"):
        parse_config(data)
    data = job_dict("run", "w.pt", "photos")
    data["rendr"] = {}
    with pytest.raises(ConfigError, match="unknown key rendr"):
        parse_config(data)


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("scan", "k", "ten", "scan.k must be an integer, got str 'ten'"),
        ("scan", "k", True, "scan.k must be an integer"),
        ("render", "featvis", "yes", "render.featvis must be a true/false"),
        ("render", "layers", "layer1", "render.layers must be a list of string"),
        ("model", "mean", [0.5, "x", 0.5], r"model.mean\[1\] must be a number"),
        ("scan", "record", "some", "scan.record must be 'topk' or 'all'"),
        ("scan", "k", 0, "scan.k must be between 1 and 10,000, got 0"),
        ("job", "stages", ["scan", "publish"], "unknown stage"),
    ],
)
def test_wrong_types_and_values_are_errors(section, key, value, message):
    data = job_dict("run", "w.pt", "photos")
    data[section][key] = value
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_missing_required_keys_and_sections():
    data = job_dict("run", "w.pt", "photos")
    del data["job"]["out"]
    with pytest.raises(ConfigError, match="missing required key job.out"):
        parse_config(data)
    data = job_dict("run", "w.pt", "photos")
    del data["model"]
    with pytest.raises(ConfigError, match=r"missing section \[model\]"):
        parse_config(data)
    # A job that renders says which classes: "all" on an ImageNet model is 1,000 visualizations (issue 15).
    data = job_dict("run", "w.pt", "photos")
    del data["render"]["classes"]
    with pytest.raises(ConfigError, match="render.classes is required with the render stage"):
        parse_config(data)
    data["job"]["stages"] = ["scan", "site"]
    assert parse_config(data).render.classes is None


def test_numbers_widen_to_float_and_defaults_fill_in():
    data = job_dict("run", "w.pt", "photos")
    data["model"]["mean"] = [0, 0, 1]
    config = parse_config(data)
    assert config.model.mean == [0.0, 0.0, 1.0] and all(isinstance(v, float) for v in config.model.mean)
    assert config.render.preset == "lucid" and config.scan.record == "topk" and config.site.out is None


def test_overrides_must_name_existing_keys():
    data = job_dict("run", "w.pt", "photos")
    config = parse_config(
        data,
        [
            "render.steps=256",
            "render.preset=yosinski",
            'scan.record="all"',
            'render.layers=["layer3"]',
            "render.views=false",
        ],
    )
    assert (config.render.steps, config.render.preset, config.scan.record) == (256, "yosinski", "all")
    assert config.render.layers == ["layer3"] and config.render.views is False
    assert data["render"]["steps"] == 4  # the parsed file itself is not modified
    with pytest.raises(ConfigError, match=r"--set render.stepz: unknown key \(did you mean 'steps'\?\)"):
        parse_config(data, ["render.stepz=3"])
    with pytest.raises(ConfigError, match="unknown section"):
        parse_config(data, ["renderer.steps=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_config(data, ["render.steps"])
    with pytest.raises(ConfigError, match="render.steps must be an integer"):
        parse_config(data, ["render.steps=many"])


def test_resolved_toml_round_trips():
    config = parse_config(job_dict("run", "w.pt", "photos"), ["model.mean=[0.5, 0.5, 0.5]", 'job.address="x:1"'])
    text = to_toml(config, "a header\nover two lines")
    assert text.startswith("# a header\n# over two lines\n")
    assert parse_config(tomllib.loads(text)) == config


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "jobs", "*.toml"))))
def test_shipped_job_files_are_valid(path):
    config = load_config(path)
    assert config.job.name and config.job.stages == ["scan", "render", "site"]


def test_demo_job_passes_every_check(tmp_path):
    config = load_config(os.path.join(REPO, "jobs", "demo.toml"), [f"job.out={tmp_path / 'demo'}", "data.images=20"])
    job = prepare_job(config)
    assert job.scan.layers.split(",")[-1] == "classifier.1" and len(job.scan.layers.split(",")) == 20
    assert job.scan.data == str(tmp_path / "demo-photos")
    assert os.listdir(tmp_path) == []  # checking writes nothing: the photos are the scan stage's to write


# ------------------------------------------------------------------------ checks needing files/model


def test_prepare_rejects_missing_inputs_and_unknown_layers(tmp_path, resnet8_weights, photo_folder):
    good = job_dict(str(tmp_path / "run"), resnet8_weights, photo_folder)
    prepare_job(parse_config(good))
    cases = [
        ("model", "weights", str(tmp_path / "nope.pt"), "model.weights: file .*nope.pt does not exist"),
        ("data", "source", str(tmp_path / "nodata"), "data.source: data not found"),
        ("scan", "layers", "layer1,layer9", "scan.layers: unknown layer.*layer9"),
        ("render", "layers", ["layer2"], "render.layers: layer2 not among the scanned layers"),
        ("render", "units", "0-x", "render.units/classes"),
        ("model", "spec", "module:pipeline.zoo:resnet999", "model: cannot import"),
        ("model", "weights", "builtin:resnet", "unknown builtin"),
    ]
    for section, key, value, message in cases:
        data = job_dict(str(tmp_path / "run"), resnet8_weights, photo_folder)
        data[section][key] = value
        with pytest.raises(ConfigError, match=message):
            prepare_job(parse_config(data))
    assert not os.path.exists(tmp_path / "run")  # nothing was started


def test_cli_reports_config_errors_with_status_2(tmp_path, capsys):
    from pipeline.cli import main

    path = write_toml(tmp_path / "bad.toml", {**job_dict("run", "w.pt", "photos"), "scan": {"kk": 3}})
    assert main(["run", path]) == 2
    assert "unknown key scan.kk (did you mean 'k'?)" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    (tmp_path / "broken.toml").write_text("[job\nname = 1")
    assert main(["run", str(tmp_path / "broken.toml")]) == 2
    assert "not valid TOML" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- running stages


@pytest.mark.slow
def test_run_job_runs_every_stage_then_skips_them(tmp_path, resnet8_weights, ray_cluster):
    # the built-in photos (36 crops, as many as the session's photo folder), which the scan stage writes
    data = job_dict(str(tmp_path / "run"), resnet8_weights, "builtin:photos")
    data["data"]["images"] = 36
    path = write_toml(tmp_path / "job.toml", data)
    config = load_config(path)
    job = prepare_job(config, source=path)
    assert not os.path.exists(job.scan.data)
    record = run_job(job, progress=False)
    assert len(glob.glob(str(tmp_path / "demo-photos" / "*" / "*.jpg"))) == 36
    run = tmp_path / "run"
    assert [record["stages"][s]["skipped"] for s in ("scan", "render", "site")] == [False, False, False]
    assert (run / "manifest.json").is_file() and (run / "atlas" / "index.parquet").is_file()
    assert (run / "site" / "index.html").is_file()
    resolved = (run / "job.toml").read_text()
    assert f"from {path}" in resolved and parse_config(tomllib.loads(resolved)) == config
    assert json.loads((run / "job.json").read_text())["stages"]["render"]["status"] == "complete"
    from pipeline.store import connect

    con = connect(str(run))
    kinds = dict(con.execute("SELECT kind, count(*) FROM atlas GROUP BY kind").fetchall())
    (live,) = con.execute(
        "SELECT count(*) FROM units WHERE layer IN ('layer1', 'linear') AND unit < 2 AND NOT dead"
    ).fetchone()
    assert kinds["featvis"] == 2 and kinds["classvis"] == 2 and kinds["crop"] == 4 * live  # k = 4 per live unit
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(str(run / "**" / "*.png"), recursive=True)}

    again = run_job(prepare_job(config, source=path), progress=False)
    assert [again["stages"][s]["skipped"] for s in ("scan", "render", "site")] == [True, True, True]
    assert {p: os.path.getmtime(p) for p in mtimes} == mtimes

    # Other render settings: the scan is kept, render redoes the visualizations, the site follows.
    changed = prepare_job(load_config(path, ["render.seed=1"]), source=path)
    third = run_job(changed, progress=False)
    assert [third["stages"][s]["skipped"] for s in ("scan", "render", "site")] == [True, False, False]
    assert "seed = 1" in (run / "job.toml").read_text()


@pytest.mark.slow
def test_a_stage_list_resumes_later_stages(tmp_path, resnet8_weights, photo_folder, ray_cluster):
    data = job_dict(str(tmp_path / "run"), resnet8_weights, photo_folder)
    first = run_job(prepare_job(parse_config(data, ['job.stages=["scan"]'])), progress=False)
    assert list(first["stages"]) == ["scan"] and not (tmp_path / "run" / "atlas").exists()
    second = run_job(prepare_job(parse_config(data)), progress=False)
    assert second["stages"]["scan"]["skipped"] and not second["stages"]["render"]["skipped"]
    assert (tmp_path / "run" / "site" / "index.html").is_file()


def _files(root) -> list[str]:
    return sorted(
        os.path.relpath(p, root) for p in glob.glob(str(root / "**" / "*"), recursive=True) if os.path.isfile(p)
    )


@pytest.mark.slow
def test_url_run_is_mirrored_to_its_prefix_resumed_elsewhere_and_published_last(
    tmp_path, resnet8_weights, photo_folder, ray_cluster, monkeypatch
):
    """out = file:// URL: the job works in a local copy and mirrors it to out/runs/<run id>/ after each stage. An
    attempt that fails in its last stage publishes nothing; a job on another machine (an empty work_dir) with the
    same run id pulls what was finished, skips it, and only then moves out/latest.json to the run."""
    import pipeline.site
    from pipeline.cluster.remote import read_latest

    bucket = tmp_path / "bucket" / "run"
    data = job_dict(f"file://{bucket}", resnet8_weights, photo_folder)
    data["render"]["featvis"] = False
    first_job = prepare_job(parse_config(data, [f'job.work_dir="{tmp_path / "a"}"']), run_id="r1")
    assert first_job.run_dir == str(tmp_path / "a" / "runs" / "r1")

    def site_fails(*args, **kwargs):
        raise RuntimeError("the site stage fell over")

    monkeypatch.setattr(pipeline.site, "build_site", site_fails)
    with pytest.raises(RuntimeError, match="fell over"):
        run_job(first_job, progress=False)
    monkeypatch.undo()
    remote = bucket / "runs" / "r1"
    assert "manifest.json" in _files(remote) and "site/index.html" not in _files(remote)
    assert read_latest(f"file://{bucket}") is None and not (bucket / "index.html").exists(), "nothing published"
    assert not (bucket / ".atlas-lock.json").exists(), "the lease is released when the job fails"

    second = run_job(prepare_job(parse_config(data, [f'job.work_dir="{tmp_path / "b"}"']), run_id="r1"), progress=False)
    assert second["stages"]["scan"]["skipped"] and second["stages"]["render"]["skipped"]
    assert not second["stages"]["site"]["skipped"]
    files = _files(remote)
    assert files == _files(tmp_path / "b" / "runs" / "r1") and "site/index.html" in files
    latest = read_latest(f"file://{bucket}")
    assert latest["run"] == "runs/r1/" and latest["site"] == "runs/r1/site/index.html"
    assert "runs/r1/site/index.html" in (bucket / "index.html").read_text()
    # A published run never changes: the same run id again is refused before anything is written.
    with pytest.raises(RunError, match="already published"):
        run_job(prepare_job(parse_config(data, [f'job.work_dir="{tmp_path / "b"}"']), run_id="r1"), progress=False)
    assert _files(remote) == files


def test_device_cuda_plans_gpu_actors_before_an_autoscaler_adds_gpus():
    """A cluster that scales GPU workers from zero shows no GPUs when the job starts: device 'cuda' still asks
    for `actors` one-GPU replicas (the pending demand is what makes the autoscaler add nodes); 'auto' does not."""
    from pipeline.models import ModelConfig
    from pipeline.ray_session import ClusterShape
    from pipeline.render.plan import RenderOptions
    from pipeline.render.runner import plan_workers
    from pipeline.image_stream import plan_actors
    from pipeline.scan.runner import ScanConfig

    scan = ScanConfig(model=ModelConfig(spec="x"), data="d", out="o", actors=8, device="cuda")
    plan = plan_actors(scan.actors, scan.threads, scan.device, ClusterShape(cpus=4, gpus=0))
    assert (plan["actors"], plan["num_gpus"], plan["device"]) == (8, 1, "cuda")
    with pytest.raises(ValueError, match="more GPU model replicas"):
        plan_actors(8, None, "auto", ClusterShape(4, 2))
    assert plan_actors(None, None, "cpu", ClusterShape(cpus=8, gpus=2))["device"] == "cpu"
    assert plan_workers(RenderOptions(actors=8, device="cuda"), 4, 0)["actors"] == 8
    assert plan_workers(RenderOptions(actors=8), 4, 2)["actors"] == 2
    assert plan_workers(RenderOptions(device="cpu"), 16, 2)["device"] == "cpu"
    with pytest.raises(ConfigError, match="scan.device must be one of"):
        parse_config(job_dict("run", "w.pt", "photos"), ["scan.device=gpu"])


def test_bench_capacity_reports_units_and_rows(capsys):
    """The capacity benchmark's counts are the model's (ResNet-8: stem + 3 blocks + logits = 16+16+32+64+10)."""
    from pipeline.bench.capacity import bench_capacity

    result = bench_capacity(model="module:pipeline.zoo:resnet8", layers="all,linear", k=4, batch=8, image_size=32)
    assert (result["layers"], result["units"], result["topk_rows"]) == (5, 138, 138 * 4)
    assert result["old"]["driver_images_per_second"] > 0 and result["old"]["bytes_per_image"] > 0
    new = result["new"]
    assert new["worker_fold_images_per_second_one_core"] > 0 and new["driver_ms_per_1000_images"] > 0
    # A flush's state holds units x k entries whatever the images; the image rows are the flush's own images.
    assert 0 < new["bytes_per_image"] < result["old"]["bytes_per_image"]
    assert json.loads(capsys.readouterr().out)["units"] == 138


@pytest.mark.slow
def test_job_over_webdataset_shards_given_as_urls(tmp_path, resnet8_weights, photo_folder, ray_cluster):
    """data.source as a URL brace pattern: the scan reads the shards through Ray Data's filesystems and the
    render reads the top-k images back from them for the crops."""
    import webdataset as wds

    paths = sorted(glob.glob(os.path.join(photo_folder, "*", "*.jpg")))
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{shard}.tar")) as sink:
            for path in paths[shard::2]:
                with open(path, "rb") as handle:
                    sink.write({"__key__": os.path.relpath(path, photo_folder)[:-4], "jpg": handle.read()})
    data = job_dict(str(tmp_path / "run"), resnet8_weights, f"file://{tmp_path}/shard-{{0..1}}.tar")
    data["render"]["featvis"] = False
    run_job(prepare_job(parse_config(data)), progress=False)
    from pipeline.store import connect

    con = connect(str(tmp_path / "run"))
    assert con.execute("SELECT count(*) FROM images WHERE status = 'ok'").fetchone()[0] == len(paths)
    crops = con.execute("SELECT count(*) FROM atlas WHERE kind = 'crop'").fetchone()[0]
    expected = con.execute(
        "SELECT count(*) FROM topk JOIN units USING (layer, unit) WHERE layer IN "
        "('layer1', 'linear') AND unit < 2 AND NOT dead"
    ).fetchone()[0]
    assert crops == expected > 0


def test_mirror_sees_same_size_rewrites_on_both_sides(tmp_path):
    """A file rewritten with the same size (a job record, a re-rendered image) is uploaded again, and a remote
    file replaced by another machine with the same size is downloaded again."""
    from pipeline.cluster.remote import RunMirror

    local, remote = tmp_path / "local", tmp_path / "remote"
    (local / "atlas").mkdir(parents=True)
    (local / "job.json").write_text('{"a": 1}')
    (local / "atlas" / "x.png").write_bytes(b"AAAA")
    mirror = RunMirror(f"file://{remote}", str(local))
    assert mirror.push() == 2 and mirror.push() == 0
    (local / "job.json").write_text('{"a": 2}')
    assert mirror.push() == 1 and (remote / "job.json").read_text() == '{"a": 2}'
    time.sleep(0.01)
    (remote / "atlas" / "x.png").write_bytes(b"BBBB")  # another machine's push
    assert RunMirror(f"file://{remote}", str(local)).pull() == 1
    assert (local / "atlas" / "x.png").read_bytes() == b"BBBB"
    assert mirror.pull() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "local.mirror.json", "remote"]


# ------------------------------------------------------------------------- publication to an object store


def test_out_lease_refuses_a_live_writer_and_takes_over_a_dead_one(tmp_path):
    from pipeline.cluster.remote import LEASE, OutLease
    from pipeline.rundir import RunBusy

    out = f"file://{tmp_path / 'out'}"
    (tmp_path / "out").mkdir()
    live = OutLease(out, "a", ttl_seconds=3, renew_seconds=0.2, settle_seconds=0.05)
    live.acquire()
    try:
        t0 = time.time()
        with pytest.raises(RunBusy, match=r"being written by pid \d+ .*run a"):
            OutLease(out, "b", ttl_seconds=3, renew_seconds=0.2, settle_seconds=0.05).acquire()
        assert time.time() - t0 < 2, "a renewed lease is recognised as live before it would expire"
    finally:
        live.release()
    assert not (tmp_path / "out" / LEASE).exists()

    # A holder that stopped renewing (a killed pod) loses its lease once it is ttl old, and notices it.
    stalled = OutLease(out, "a", ttl_seconds=1, renew_seconds=60, settle_seconds=0.05)
    stalled.acquire()
    successor = OutLease(out, "b", ttl_seconds=1, renew_seconds=60, settle_seconds=0.05)
    successor.acquire()
    assert json.loads((tmp_path / "out" / LEASE).read_text())["run_id"] == "b"
    assert stalled.renew_once() is False
    with pytest.raises(RunBusy, match="taken over"):
        stalled.check()
    stalled.release()  # must not delete the successor's lease
    assert json.loads((tmp_path / "out" / LEASE).read_text())["holder"] == successor.holder
    successor.release()


def test_atlas_run_refuses_an_out_whose_lease_is_live(tmp_path, resnet8_weights, photo_folder, capsys):
    from pipeline.cli import main
    from pipeline.cluster.remote import OutLease

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    data = job_dict(f"file://{bucket}", resnet8_weights, photo_folder)
    path = write_toml(tmp_path / "job.toml", data)
    holder = OutLease(f"file://{bucket}", "2026-12-01", ttl_seconds=5, renew_seconds=0.2, settle_seconds=0.05)
    holder.acquire()
    try:
        assert main(["run", path, "--run-id", "2026-12-02", "--set", f'job.work_dir="{tmp_path / "w"}"']) == 2
    finally:
        holder.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is being written by" in err[0] and "run 2026-12-01" in err[0]
    assert not (bucket / "runs").exists(), "nothing was written"


# ------------------------------------------------- issue 24: forward-only publication, repair, lease, prune, metrics


def _fake_run(out: str, run_id: str, stages=("scan", "render", "site")) -> dict:
    """A run's files pushed to out/runs/<run_id>/ as a job would (no stages run: publication is what is tested)."""
    import pyarrow.fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(out)
    record = {"name": "tiny", "stages": {s: {"status": "complete", "skipped": False, "seconds": 1.0} for s in stages}}
    for name, body in (("manifest.json", "{}"), ("job.json", json.dumps(record))):
        filesystem.create_dir(f"{root}/runs/{run_id}", recursive=True)
        with filesystem.open_output_stream(f"{root}/runs/{run_id}/{name}") as handle:
            handle.write(body.encode())
    return record


@pytest.fixture(params=["file", "s3"])
def out_url(request, tmp_path):
    """An object-store `out` on a local file system (file://) and on the S3-protocol server (s3://)."""
    if request.param == "file":
        return f"file://{tmp_path / 'bucket' / 'nightly'}"
    request.getfixturevalue("s3_server")
    return f"s3://atlas-test/{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}"


def test_latest_only_moves_forward(out_url, caplog):
    """Issue 24, Why 4: publishing an older run id after a newer one seals the older run (readable by its URL) but
    leaves latest.json on the newer one, with a log line."""
    from pipeline.cluster.remote import is_published, publish, read_latest

    publish(out_url, "2026-12-02", _fake_run(out_url, "2026-12-02"))
    assert read_latest(out_url)["run_id"] == "2026-12-02"
    publish(out_url, "2026-12-01", _fake_run(out_url, "2026-12-01"))
    assert read_latest(out_url)["run_id"] == "2026-12-02", "latest.json moved back to an older run"
    assert is_published(out_url, "2026-12-01")
    assert "only moves forward" in caplog.text
    publish(out_url, "2026-12-03", _fake_run(out_url, "2026-12-03"))
    assert read_latest(out_url)["run_id"] == "2026-12-03"


def test_a_crash_between_seal_and_pointer_is_repaired_by_the_next_attempt(
    out_url, tmp_path, resnet8_weights, photo_folder, monkeypatch
):
    """Issue 24, Why 5: an attempt that sealed its run and died before moving latest.json; the retry (same run id)
    finishes the publication instead of stopping at "already published" for good. No stage runs again."""
    import pipeline.cluster.remote as remote
    from pipeline.cluster.remote import is_published, publish, read_latest

    publish(out_url, "2026-12-01", _fake_run(out_url, "2026-12-01"))

    def crash(*args, **kwargs):
        raise OSError("the pod was killed")

    monkeypatch.setattr(remote, "_point_latest", crash)
    with pytest.raises(OSError, match="killed"):
        publish(out_url, "2026-12-02", _fake_run(out_url, "2026-12-02"))
    monkeypatch.undo()
    assert is_published(out_url, "2026-12-02") and read_latest(out_url)["run_id"] == "2026-12-01"

    data = job_dict(out_url, resnet8_weights, photo_folder)
    job = prepare_job(parse_config(data, [f'job.work_dir="{tmp_path / "w"}"']), run_id="2026-12-02")
    record = run_job(job, progress=False)  # no Ray: nothing is left to run
    assert read_latest(out_url)["run_id"] == "2026-12-02"
    assert all(info["skipped"] for info in record["stages"].values()) and sorted(record["stages"]) == [
        "render",
        "scan",
        "site",
    ]
    # Once repaired, the same run id is refused as before: a published run never changes.
    with pytest.raises(RunError, match="already published"):
        run_job(job, progress=False)


def test_lease_is_a_conditional_write_where_the_store_has_one(out_url):
    """Issue 24, Why 6: on S3 (If-None-Match / If-Match, served by a real S3-protocol server) and on a local file
    system the lease is compare-and-swap: of many writers racing for a free lease, or for one expired lease, exactly
    one wins, with no settling pause at all."""
    import threading

    from pipeline.cluster.remote import OutLease
    from pipeline.rundir import RunBusy

    def race(run_ids: list[str]) -> list[OutLease]:
        leases = [OutLease(out_url, r, ttl_seconds=3, renew_seconds=0.3, settle_seconds=0) for r in run_ids]
        barrier, won = threading.Barrier(len(leases)), []

        def take(lease: OutLease) -> None:
            barrier.wait()
            try:
                lease.acquire()
                won.append(lease)
            except RunBusy:
                pass

        threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        return won

    assert OutLease(out_url, "x").conditional
    winners = race([f"free-{i}" for i in range(6)])
    assert len(winners) == 1, f"{len(winners)} writers hold the lease"
    first = winners[0]
    first._stop.set()  # it stops renewing (a dead holder): its lease expires 3 s after its last renewal
    first._thread.join(timeout=10)
    successors = race([f"next-{i}" for i in range(6)])
    assert len(successors) == 1, f"{len(successors)} writers took over the expired lease"
    assert first.renew_once() is False and first.lost, "the old holder learns it lost the lease"
    successors[0].release()


def test_prune_keeps_the_newest_and_never_the_published_or_the_leased_run(out_url, capsys):
    """Issue 24, Why 9 (retention): `atlas runs prune OUT --keep N` removes older sealed runs and abandoned unsealed
    ones, but never the run latest.json names (here a sealed newer run exists whose pointer never moved) nor the
    run whose writer holds the lease."""
    import pipeline.cluster.remote as remote
    from pipeline.cli import main
    from pipeline.cluster.remote import OutLease, list_runs, publish, read_latest

    for run_id in ("2026-11-28", "2026-11-29", "2026-11-30", "2026-12-01"):
        publish(out_url, run_id, _fake_run(out_url, run_id))
    _fake_run(out_url, "2026-11-27")  # an abandoned attempt, never sealed
    _fake_run(out_url, "2026-11-26")  # unsealed, but its writer holds the lease: in progress
    original = remote._point_latest
    remote._point_latest = lambda *args: False  # 2026-12-02 sealed, its pointer never moved
    try:
        publish(out_url, "2026-12-02", _fake_run(out_url, "2026-12-02"))
    finally:
        remote._point_latest = original
    assert read_latest(out_url)["run_id"] == "2026-12-01"
    holder = OutLease(out_url, "2026-11-26", ttl_seconds=30, renew_seconds=60, settle_seconds=0)
    holder.acquire()
    try:
        assert main(["runs", "prune", out_url, "--keep", "1", "--dry-run"]) == 0
        assert "would remove 4 run(s)" in capsys.readouterr().out
        assert len(list_runs(out_url)) == 7
        assert main(["runs", "prune", out_url, "--keep", "1"]) == 0
    finally:
        holder.release()
    assert list_runs(out_url) == {"2026-12-02": True, "2026-12-01": True, "2026-11-26": False}
    assert "removed 4 run(s): 2026-11-27, 2026-11-28, 2026-11-29, 2026-11-30" in capsys.readouterr().out
    assert main(["runs", "prune", out_url, "--keep", "0"]) == 2


def test_dead_mans_switch_metric_is_prometheus_text(out_url, capsys):
    """Issue 24, Why 7 (the metric the alert reads): `atlas runs metrics OUT...` prints the publication time of each
    OUT's latest run in Prometheus' text format, parsed here by prometheus_client's own parser; an OUT never
    published has no sample (the alert's absent() catches it)."""
    from prometheus_client.parser import text_string_to_metric_families

    from pipeline.cli import main
    from pipeline.cluster.remote import publish

    never = out_url + "-never"
    before = time.time()
    publish(out_url, "2026-12-01", _fake_run(out_url, "2026-12-01"))
    after = time.time()
    assert main(["runs", "metrics", out_url, never]) == 0
    (family,) = list(text_string_to_metric_families(capsys.readouterr().out))
    assert family.name == "neuron_atlas_latest_published_timestamp_seconds" and family.type == "gauge"
    (sample,) = family.samples
    assert sample.labels == {"output": out_url}
    assert before - 0.01 <= sample.value <= after + 0.01


# ------------------------------------------------------------------ issue 24: the scheduled slot is the run id


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def test_scheduled_slot_names_the_run_and_a_stale_tick_is_skipped(tmp_path, resnet8_weights, photo_folder, capsys):
    """Issue 24, Why 3: the run id comes from the scheduler's slot, not from the clock of the pod that runs it; a
    tick older than job.starting_deadline_seconds (what a catch-up fires after a pause) is skipped with one line,
    exit 0, before the model is loaded or anything is written; a slot in the future is a configuration error."""
    from pipeline.cli import main
    from pipeline.cluster.job import parse_slot

    assert parse_slot("2026-12-02") == (1796169600.0, "2026-12-02")
    assert parse_slot("2026-12-02T02:00:00Z") == (1796169600.0 + 7200, "2026-12-02T0200Z")
    assert parse_slot("2026-12-02T03:00:00+01:00")[1] == "2026-12-02T0200Z"
    now = time.time()
    slot = _iso(now - 600)
    bucket = tmp_path / "bucket"
    data = job_dict(f"file://{bucket}", resnet8_weights, photo_folder)
    job = prepare_job(parse_config(data, [f'job.work_dir="{tmp_path / "w"}"']), slot=slot)
    assert job.run_id == time.strftime("%Y-%m-%dT%H%MZ", time.gmtime(now - 600)) and job.run_id != time.strftime(
        "%Y-%m-%d"
    )
    path = write_toml(tmp_path / "job.toml", {**data, "job": {**data["job"], "work_dir": str(tmp_path / "w")}})
    capsys.readouterr()
    for days in (3, 2, 1):  # a catch-up burst after a three-day pause
        assert main(["run", path, "--scheduled-slot", _iso(now - days * 86400)]) == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "skipped: scheduled slot" in err[0] and "starting_deadline_seconds=3600" in err[0]
    assert not bucket.exists() and not (tmp_path / "w").exists(), "a skipped tick writes nothing"
    assert main(["run", path, "--scheduled-slot", _iso(now + 86400)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in the future" in err[0]
    # The variable a scheduler sets works like the option.
    os.environ["NEURON_ATLAS_SCHEDULED_SLOT"] = _iso(now - 2 * 86400)
    try:
        assert main(["run", path, "--set", "job.starting_deadline_seconds=7200"]) == 0
    finally:
        del os.environ["NEURON_ATLAS_SCHEDULED_SLOT"]
    assert "starting_deadline_seconds=7200" in capsys.readouterr().err


@pytest.mark.slow
def test_a_catch_up_burst_starts_one_run_per_output(tmp_path, resnet8_weights, photo_folder, ray_cluster, capsys):
    """Issue 24, What 2: several past ticks fired at once (KubeRay's RayCronJob creates one RayJob per missed tick,
    back to back). Stale ticks are skipped; of the recent ones the newest runs and publishes, and an older tick fired
    after it, or the same tick fired twice, is skipped without running anything or moving latest.json back."""
    from pipeline.cli import main
    from pipeline.cluster.remote import list_runs, read_latest

    bucket = tmp_path / "bucket"
    out = f"file://{bucket}"
    data = job_dict(out, resnet8_weights, photo_folder)
    data["render"]["featvis"] = False
    data["job"]["work_dir"] = str(tmp_path / "w")
    path = write_toml(tmp_path / "job.toml", data)
    now = time.time()
    ticks = [_iso(now - hours * 3600 - 60) for hours in (30, 6, 2)] + [_iso(now - 1200), _iso(now - 2400)]
    ticks.append(ticks[3])  # a scheduler that fires one tick twice
    capsys.readouterr()
    statuses = [main(["run", path, "--scheduled-slot", tick, "--quiet"]) for tick in ticks]
    assert statuses == [0] * len(ticks)
    newest = time.strftime("%Y-%m-%dT%H%MZ", time.gmtime(now - 1200))
    assert list_runs(out) == {newest: True}, "one run, the newest tick's"
    assert read_latest(out)["run_id"] == newest
    err = capsys.readouterr().err
    assert err.count("starting_deadline_seconds") == 3
    assert "already names newer" in err and "is already published" in err


# ------------------------------------------------- issue 24: a job on a real S3-protocol server, read back by URL


def _check_published_s3(filesystem, root: str, latest: dict, seen: dict) -> str | None:
    """As _check_published_run, through pyarrow's S3 filesystem: what a reader following latest.json relies on."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    run_id, prefix = latest["run_id"], f"{root}/{latest['run']}".rstrip("/")
    selector = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
    files = sorted(
        os.path.relpath(i.path, prefix) for i in filesystem.get_file_info(selector) if i.type == pafs.FileType.File
    )
    if run_id in seen and seen[run_id] != files:
        return f"{run_id} changed after it was published"
    seen.setdefault(run_id, files)
    if filesystem.get_file_info(f"{root}/runs/{run_id}.published").type != pafs.FileType.File:
        return f"{run_id} is not sealed"
    for needed in ("manifest.json", "job.json", "job.toml", "site/index.html", "atlas/index.parquet"):
        if needed not in files:
            return f"{run_id} lacks {needed}"
    with filesystem.open_input_stream(f"{prefix}/job.json") as handle:
        stages = json.loads(handle.read())["stages"]
    if sorted(stages) != ["render", "scan", "site"]:
        return f"{run_id} job.json lists {sorted(stages)}"
    paths = pq.read_table(f"{prefix}/atlas/index.parquet", filesystem=filesystem).column("path").to_pylist()
    missing = [p for p in paths if p not in files]
    return f"{run_id}: the atlas index names missing files {missing[:3]}" if missing else None


@pytest.mark.slow
def test_job_on_s3_publishes_whole_runs_that_every_reader_opens_by_url(
    tmp_path, resnet8_weights, photo_folder, ray_cluster, s3_server, capsys, monkeypatch
):
    """Issue 24, Why 10 / What 3: out = s3://bucket/prefix on an S3-protocol server process (moto), through pyarrow's
    S3 filesystem. Two nightly runs while a reader polls latest.json over S3: every run it names is sealed, whole and
    never changes. Then `atlas query` (the run's URL and out/latest.json), `atlas site`, `atlas compare` and
    open_run all read the published runs by URL."""
    import threading

    import pyarrow.fs as pafs

    from pipeline.api import open_run
    from pipeline.cli import main
    from pipeline.cluster.remote import OutLease, read_latest

    monkeypatch.setenv("NEURON_ATLAS_CACHE", str(tmp_path / "cache"))
    out = "s3://atlas-test/nightly"
    assert OutLease(out, "x").conditional, "the lease uses S3's conditional writes here"
    filesystem, root = pafs.FileSystem.from_uri(out)
    data = job_dict(out, resnet8_weights, photo_folder)
    data["render"]["featvis"] = False
    problems, seen, polls, stop = [], {}, [0], threading.Event()

    def reader() -> None:
        # latest.json every 0.1 s; the whole run it names is checked at once when it first appears, then again
        # at most once a second (a listing of every file of a run on the Python S3 server took most of the
        # test's CPU at ten a second, and the pointer's moves are what can expose a half-published run).
        checked_at = 0.0
        while not stop.is_set():
            try:
                with filesystem.open_input_stream(f"{root}/latest.json") as handle:
                    latest = json.loads(handle.read())
            except FileNotFoundError:
                time.sleep(0.1)
                continue
            except (OSError, ValueError) as error:
                problems.append(f"latest.json unreadable: {error}")
                continue
            if latest.get("run_id") not in seen or time.time() - checked_at >= 1.0:
                problem = _check_published_s3(filesystem, root, latest, seen)
                checked_at = time.time()
                if problem:
                    problems.append(problem)
            polls[0] += 1
            time.sleep(0.1)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for run_id in ("2026-12-01", "2026-12-02"):
            run_job(
                prepare_job(parse_config(data, [f'job.work_dir="{tmp_path / "work"}"']), run_id=run_id), progress=False
            )
            deadline = time.time() + 30
            while time.time() < deadline and run_id not in seen:
                time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert problems == [] and sorted(seen) == ["2026-12-01", "2026-12-02"] and polls[0] > 5
    assert read_latest(out)["url"] == f"{out}/runs/2026-12-02/"

    sql = "SELECT count(*) AS n FROM images WHERE status = 'ok'"
    capsys.readouterr()
    for location in (f"{out}/runs/2026-12-01", out):  # a run's URL, and the output's latest.json
        assert main(["query", location, sql, "--format", "csv"]) == 0
        assert capsys.readouterr().out.split() == ["n", str(36)], location
    assert main(["site", out, "--out", str(tmp_path / "site")]) == 0
    assert (tmp_path / "site" / "index.html").is_file()
    assert main(["site", out]) == 2 and "pass --out" in capsys.readouterr().err
    assert main(["compare", f"{out}/runs/2026-12-01", out, "--out", str(tmp_path / "cmp")]) == 0
    assert main(["query", str(tmp_path / "cmp"), "SELECT count(*) FROM cmp_units", "--format", "csv"]) == 0
    assert capsys.readouterr().out.split()[-1] == str(16 + 64 + 10)  # ResNet-8's layer1, layer3 and linear units
    with open_run(out) as run:
        assert run.url == f"{out}/runs/2026-12-02"
        assert run.sql(sql).fetchall() == [(36,)]
