"""`atlas render` on a real local Ray: dataset views, feature and class visualizations, the index, resuming."""

from __future__ import annotations

import os
import re
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers import scanned_data, topk_by_unit_rank
from tiny_runs import copy_run
from pipeline.cli import main
from pipeline.models import ModelConfig
from pipeline.render.plan import RenderOptions
from pipeline.render.runner import render_run
from pipeline.render.worker import RenderConfig, RenderTask, UnitRenderer, VisSettings, unit_file
from pipeline.scan.runner import ScanConfig, run_scan
from pipeline.store import connect

SMALL = ModelConfig(spec="module:tiny_models:small_net", image_size=32)
VIEW_KINDS = {"crop", "overlay", "deconv", "deconv_crop", "guided", "guided_crop"}
FAST = VisSettings(steps=8, size=32)


@pytest.fixture(scope="module")
def scanned(ray_cluster, photo_folder, tmp_path_factory) -> str:
    run = str(tmp_path_factory.mktemp("render") / "run")
    run_scan(
        ScanConfig(
            model=SMALL, data=photo_folder, out=run, layers="relu,down,head.2", k=3, progress=False, executor="local"
        )
    )
    return run


def index_rows(run: str) -> list[dict]:
    return pq.read_table(os.path.join(run, "atlas", "index.parquet")).to_pylist()


def render_fast(run: str, *options: str) -> int:
    """`atlas render RUN OPTIONS` with FAST's visualization settings (8 steps, 32 pixels), no progress bar, in this
    process (what is drawn is the subject here; Ray's render is tested beside the local one and when an actor is
    killed)."""
    return main(
        ["render", run, *options, "--steps", str(FAST.steps), "--size", str(FAST.size), "--executor", "local", "-q"]
    )


def test_cli_renders_views_and_visualizations_then_resumes(scanned, photo_folder):
    run = scanned
    assert render_fast(run, "--layers", "down", "--units", "0-1,5", "--classes", "0,3") == 0
    rows = index_rows(run)
    assert {(r["layer"], r["unit"], r["kind"]) for r in rows} == (
        {("down", u, k) for u in (0, 1, 5) for k in VIEW_KINDS | {"featvis"}}
        | {("head.2", c, "classvis") for c in (0, 3)}
    )
    top = topk_by_unit_rank(run, "down")
    maxima = dict(connect(run).execute("SELECT unit, max FROM units WHERE layer = 'down'").fetchall())
    for r in rows:
        path = os.path.join(run, r["path"])
        assert os.path.isfile(path) and not os.path.isabs(r["path"]) and r["path"].startswith("atlas/")
        if r["kind"] in VIEW_KINDS:
            t = top[r["unit"], r["rank"]]
            assert r["image_key"] == t["image_key"] and r["act"] == pytest.approx(t["act"])
        if r["kind"] == "crop":  # the original image cut at the recorded box
            original = np.asarray(Image.open(os.path.join(photo_folder, t["image_key"])).convert("RGB"))
            expected = original[t["box_y0"] : t["box_y1"], t["box_x0"] : t["box_x1"]]
            np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)
        if r["kind"] == "deconv":
            assert Image.open(path).size == (32, 32)
        if r["kind"] == "featvis":
            assert r["top1_act"] == pytest.approx(maxima[r["unit"]])
            assert r["featvis_act"] == pytest.approx(float(Image.open(path).text["act"]))
            assert Image.open(path).size == (32, 32) and Image.open(path).text["steps"] == "8"
        if r["kind"] == "classvis":  # the logits were scanned too, so the best photo's logit is known
            assert r["image_key"] is None and r["top1_act"] is not None
    # How much each reconstruction depends on its image, per layer and kind: this net has no max-pooling, so
    # the deconvnet gives one picture for every image; guided backprop's depends on the image's masks.
    dependence = {r["kind"]: r for r in pq.read_table(os.path.join(run, "atlas", "dependence.parquet")).to_pylist()}
    assert set(dependence) == {"deconv", "guided"}
    assert dependence["deconv"]["units"] == 3 and dependence["deconv"]["min_similarity"] > 0.9999
    assert dependence["deconv"]["max_pooling"] is False and dependence["deconv"]["image_dependent"] is False
    assert dependence["guided"]["mean_similarity"] < 0.95 and dependence["guided"]["image_dependent"] is True
    measured = [r for r in rows if r["other_image_similarity"] is not None]
    assert {(r["unit"], r["kind"], r["rank"]) for r in measured} == {
        (u, k, 0) for u in (0, 1, 5) for k in ("deconv", "guided")
    }
    # The recorded activation is what the saved image gives (up to 8-bit rounding of the pixels).
    featvis = next(r for r in rows if r["kind"] == "featvis" and r["unit"] == 5)
    assert featvis["featvis_act"] == pytest.approx(
        _unit_max_of_png(os.path.join(run, featvis["path"]), "down", 5), rel=0.05, abs=0.02
    )

    # A re-run renders nothing; changed settings redo only the visualizations; a lost file is redone alone.
    stamp = {r["path"]: os.path.getmtime(os.path.join(run, r["path"])) for r in rows}
    render_run(
        run,
        RenderOptions(
            layers=("down",),
            units=frozenset({0, 1, 5}),
            classes=frozenset({0, 3}),
            vis=FAST,
            executor="local",
            progress=False,
        ),
    )
    assert all(os.path.getmtime(os.path.join(run, p)) == m for p, m in stamp.items())
    os.remove(os.path.join(run, unit_file("down", 1, "overlay", 2)))
    render_run(
        run,
        RenderOptions(
            layers=("down",),
            units=frozenset({0, 1, 5}),
            classes=frozenset(),
            vis=VisSettings(steps=9, size=32),
            executor="local",
            progress=False,
        ),
    )
    changed = {
        p
        for p, m in stamp.items()
        if not os.path.exists(os.path.join(run, p)) or os.path.getmtime(os.path.join(run, p)) != m
    }
    assert {p for p in changed if "featvis" not in p} == {unit_file("down", 1, kind, 2) for kind in VIEW_KINDS}
    assert {p for p in changed if "featvis" in p} == {unit_file("down", u, "featvis") for u in (0, 1, 5)}
    assert not any(name.startswith(".tmp-") for _, _, names in os.walk(os.path.join(run, "atlas")) for name in names)


def _unit_max_of_png(path: str, layer: str, unit: int) -> float:
    from pipeline.models import feature_extractor, load_model

    loaded = load_model(SMALL)
    pp = loaded.preprocess
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    x = (image - torch.tensor(pp.mean).view(1, 3, 1, 1)) / torch.tensor(pp.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return float(feature_extractor(loaded.model, [layer])(x)[layer][0, unit].max())


def test_dead_units_are_listed_not_rendered(scanned):
    """The small net's logits for two classes are never positive on the photos: "dead" units of the output
    layer get no dataset views, while every class still gets its class visualization."""
    con = connect(scanned)
    dead = {u for (u,) in con.execute("SELECT unit FROM units WHERE layer = 'head.2' AND dead").fetchall()}
    assert dead and len(dead) < 5
    render_run(scanned, RenderOptions(layers=("head.2",), vis=FAST, executor="local", progress=False))
    rows = [r for r in index_rows(scanned) if r["layer"] == "head.2"]
    assert {r["unit"] for r in rows if r["kind"] != "classvis"} == set(range(5)) - dead
    assert {r["unit"] for r in rows if r["kind"] == "classvis"} == set(range(5))
    # A logit sees the whole input: its crop is the centre square the network saw (resize 32, crop 32), up to
    # one input pixel (torchvision's resize rounds the long side to whole pixels).
    for crop in (r for r in rows if r["kind"] == "crop"):
        width, height = con.execute(
            "SELECT width, height FROM images WHERE image_key = ?", [crop["image_key"]]
        ).fetchone()
        size = Image.open(os.path.join(scanned, crop["path"])).size
        pixel = max(width, height) / 32
        assert all(abs(side - min(width, height)) <= pixel for side in size), (size, width, height)


def test_the_worker_gives_the_same_images_without_ray(scanned):
    """Ray changes where the work runs, not what it computes: the plain worker gives identical PNG bytes."""
    render_run(
        scanned, RenderOptions(layers=("down",), units=frozenset({2}), classes=frozenset(), vis=FAST, progress=False)
    )
    result = UnitRenderer(RenderConfig(model=SMALL, vis=FAST))(RenderTask(layer="down", vis_units=[2]))
    with open(os.path.join(scanned, unit_file("down", 2, "featvis")), "rb") as handle:
        assert result.files[unit_file("down", 2, "featvis")] == handle.read()


def test_the_local_executor_writes_the_files_ray_writes(scanned, tmp_path):
    """`--executor local` (this process, no Ray) renders the same files, byte for byte, as Ray's actors: every
    view of two units' top images and their feature visualizations, and the class visualizations."""
    runs = {}
    for executor in ("ray", "local"):
        run = copy_run(scanned, tmp_path / executor)
        options = RenderOptions.from_settings(
            layers="down,head.2", units="1-2", classes="0", pictures=None, preset="lucid", steps=FAST.steps,
            size=FAST.size, seed=0, objective="channel", executor=executor, progress=False,
        )  # fmt: skip
        render_run(run, options)
        runs[executor] = {
            os.path.relpath(os.path.join(folder, name), run): open(os.path.join(folder, name), "rb").read()
            for folder, _, names in os.walk(os.path.join(run, "atlas"))
            for name in names
            if name.endswith(".png")
        }
    assert len(runs["ray"]) > 12 and any("featvis" in name for name in runs["ray"])
    assert runs["local"] == runs["ray"]


def test_auto_renders_in_this_process_only_where_ray_would_run_one_actor_here(monkeypatch):
    from pipeline.render import runner

    def choose(cpus: int = 2, gpus: int = 0, **settings) -> str:
        return runner.choose_executor(RenderOptions(**settings), cpus, gpus)

    assert choose() == "ray"  # this test session's Ray is running: a stage joins it
    monkeypatch.setattr(runner, "ray_in_use", lambda: False)
    assert choose() == choose(cpus=15) == choose(gpus=1) == choose(actors=1) == "local"
    assert choose(cpus=16) == choose(gpus=2) == choose(actors=2) == choose(address="ray://head:10001") == "ray"
    assert choose(executor="ray") == "ray" and choose(cpus=64, executor="local") == "local"
    with pytest.raises(ValueError, match="runs in this process: --actors 2"):
        choose(actors=2, executor="local")
    with pytest.raises(ValueError, match="no GPU"):
        choose(device="cuda", executor="local")
    with pytest.raises(ValueError, match="executor must be one of"):
        choose(executor="elsewhere")


def test_bad_render_requests_fail_before_any_work(scanned, tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        render_run(scanned, RenderOptions(vis=VisSettings(preset="nope")))
    with pytest.raises(ValueError, match="out of range"):
        render_run(scanned, RenderOptions(layers=("down",), units=frozenset(), classes=frozenset({5})))
    with pytest.raises(ValueError, match="not recorded"):
        render_run(scanned, RenderOptions(layers=("stem",)))
    assert main(["render", str(tmp_path), "-q"]) == 2
    assert main(["render", scanned, "--units", "x-3"]) == 2


@pytest.mark.slow
def test_a_new_scan_removes_what_was_rendered_from_the_old_one(ray_cluster, photo_folder, small_down_run, tmp_path):
    """Atlas images describe one scan: re-scanning with other settings must not leave them to be taken as done."""
    run = copy_run(small_down_run, tmp_path / "run")  # layer down, k=2 (tests/support/tiny_runs.py)
    render_run(
        run, RenderOptions(units=frozenset({0}), classes=frozenset(), featvis=False, executor="local", progress=False)
    )
    assert os.path.isfile(os.path.join(run, unit_file("down", 0, "crop", 1)))
    run_scan(
        ScanConfig(
            model=SMALL,
            data=photo_folder,
            out=run,
            layers="down",
            k=1,
            overwrite=True,
            progress=False,
            executor="local",
        )
    )
    assert not os.path.exists(os.path.join(run, "atlas"))
    index = render_run(
        run, RenderOptions(units=frozenset({0}), classes=frozenset(), featvis=False, executor="local", progress=False)
    )
    assert sorted(index.column("rank").to_pylist()) == [0] * 6


@pytest.mark.slow
def test_a_render_actor_killed_midway_changes_nothing(scanned, tmp_path):
    """Issue 11 case 4 for render: a render actor's process SIGKILLed mid-render is dropped, its task goes to
    another actor (or a new one), and the atlas ends with the same files as an undisturbed render."""
    import shutil

    from helpers import run_and_kill

    runs = {}
    for name in ("reference", "killed"):
        runs[name] = str(tmp_path / name)
        shutil.copytree(scanned, runs[name], ignore=shutil.ignore_patterns("atlas", ".atlas-lock"))
    options = RenderOptions(
        layers=("down",), units=frozenset(range(8)), classes=frozenset(), units_per_task=1, vis=FAST, progress=False
    )
    render_run(runs["reference"], replace(options, executor="local"))  # the reference needs no actor

    def midway() -> bool:  # the first unit's files are written: the actors are at work, most tasks still queued
        atlas = os.path.join(runs["killed"], "atlas")
        return any(name.endswith(".png") for _, _, names in os.walk(atlas) for name in names)

    run_and_kill(lambda: render_run(runs["killed"], options), "ray::_RenderActor", when=midway)
    reference, killed = index_rows(runs["reference"]), index_rows(runs["killed"])
    assert len(killed) == len(reference) > 0
    for a, b in zip(sorted(reference, key=lambda r: r["path"]), sorted(killed, key=lambda r: r["path"])):
        assert a["path"] == b["path"]
        pa, pb = (
            np.asarray(Image.open(os.path.join(run, row["path"])), dtype=np.int16)
            for run, row in ((runs["reference"], a), (runs["killed"], b))
        )
        assert np.abs(pa - pb).max() <= 4, a["path"]


def test_cli_renders_what_it_names_and_says_its_plan_first(scanned, tmp_path, caplog):
    """Issue 15: `--layers L --units U` renders those units and no class visualization; `--classes` adds
    them; the plan (per kind) is logged before the work and an estimate after the first task."""
    import logging

    run = copy_run(scanned, tmp_path / "run")
    caplog.set_level(logging.INFO, logger="pipeline")
    assert render_fast(run, "--layers", "down", "--units", "0-1", "--units-per-task", "1") == 0
    rows = index_rows(run)
    assert {(r["layer"], r["unit"]) for r in rows} == {("down", 0), ("down", 1)}
    assert {r["kind"] for r in rows} == VIEW_KINDS | {"featvis"}
    messages = [r.getMessage() for r in caplog.records]
    plan = [m for m in messages if m.startswith("render plan:")]
    assert plan[0] == (
        "render plan: every top image's crop, overlay, deconvnet and guided backprop: 2 unit(s) (down 0-1)"
    )
    assert "render plan: feature visualizations: 2 unit(s) (down 0-1)" in plan
    assert not any("class visualizations of" in m for m in plan)
    estimates = [i for i, m in enumerate(messages) if m.startswith("render estimate:")]
    assert len(estimates) == 1 and estimates[0] > messages.index(plan[-1])  # after the first of two tasks
    assert re.fullmatch(
        r"render estimate: about \d+ s left \(the first units task: 1 units in [\d.]+ s\)", messages[estimates[0]]
    ), messages[estimates[0]]
    assert render_fast(run, "--classes", "3") == 0
    rows = index_rows(run)
    assert {(r["layer"], r["unit"]) for r in rows if r["kind"] == "classvis"} == {("head.2", 3)}
    assert {(r["layer"], r["unit"]) for r in rows if r["kind"] != "classvis"} == {("down", 0), ("down", 1)}


@pytest.mark.slow
def test_by_default_every_live_unit_gets_its_pictures(scanned, tmp_path):
    """`atlas render RUN` naming nothing: the top crop and heat overlay of every live unit of every recorded
    layer, nothing costly; `--pictures 3` adds ranks 1-2 and leaves rank 0 alone. Crops are the originals cut at
    the recorded boxes; an overlay is the same picture the full render draws for that unit and image (there the
    map comes from the deconvnet's forward pass of that image alone)."""
    from pipeline.render.plan import DEFAULT_PICTURES

    run = copy_run(scanned, tmp_path / "pictures")
    con = connect(run)
    live = con.execute("SELECT layer, unit FROM units WHERE NOT dead").fetchall()

    def drawn(kind: str) -> set[tuple[str, int, int]]:
        return {(r["layer"], r["unit"], r["rank"]) for r in index_rows(run) if r["kind"] == kind}

    assert main(["render", run, "--executor", "local", "-q"]) == 0
    assert {r["kind"] for r in index_rows(run)} == {"crop", "overlay"}
    assert drawn("crop") == {(layer, unit, rank) for layer, unit in live for rank in range(DEFAULT_PICTURES)}
    stamp = {r["path"]: os.path.getmtime(os.path.join(run, r["path"])) for r in index_rows(run)}
    assert main(["render", run, "--pictures", "3", "--executor", "local", "-q"]) == 0
    assert all(os.path.getmtime(os.path.join(run, p)) == m for p, m in stamp.items())  # not drawn again
    crops = drawn("crop")
    assert crops == {(layer, unit, rank) for layer, unit in live for rank in range(3)}
    assert drawn("overlay") == {c for c in crops if c[0] != "head.2"}  # the logits' 1x1 maps: a crop only
    photo = topk_by_unit_rank(run, "relu")
    for r in (r for r in index_rows(run) if r["kind"] == "crop" and r["layer"] == "relu"):
        t = photo[r["unit"], r["rank"]]
        original = np.asarray(Image.open(os.path.join(scanned_data(run), t["image_key"])).convert("RGB"))
        np.testing.assert_array_equal(
            np.asarray(Image.open(os.path.join(run, r["path"]))),
            original[t["box_y0"] : t["box_y1"], t["box_x0"] : t["box_x1"]],
        )
    full = copy_run(scanned, tmp_path / "full")
    render_run(
        full,
        RenderOptions(
            layers=("down", "relu"), units=frozenset({0, 3}), featvis=False, executor="local", progress=False
        ),
    )
    for layer in ("down", "relu"):
        for unit in (0, 3):
            for rank in range(3):
                path = unit_file(layer, unit, "overlay", rank)
                assert np.array_equal(
                    np.asarray(Image.open(os.path.join(run, path))), np.asarray(Image.open(os.path.join(full, path)))
                ), path


def test_a_picture_whose_photo_is_gone_is_skipped(scanned, tmp_path, caplog):
    """A top image that can no longer be read back costs its own pictures (one warning), not the render."""
    import json
    import logging
    import shutil

    from pipeline.store import write_json

    run = copy_run(scanned, tmp_path / "run")
    photos = shutil.copytree(scanned_data(run), str(tmp_path / "photos"))
    with open(os.path.join(run, "manifest.json")) as handle:
        manifest = json.load(handle)
    manifest["config"]["data"] = photos
    write_json(manifest, os.path.join(run, "manifest.json"))
    gone = topk_by_unit_rank(run, "relu")[0, 0]["image_key"]
    os.remove(os.path.join(photos, gone))
    caplog.set_level(logging.WARNING, logger="pipeline")
    render_run(run, RenderOptions(units=frozenset(), pictures=1, executor="local", progress=False))
    wanted = (
        connect(run)
        .execute("SELECT layer, unit, image_key FROM topk JOIN units USING (layer, unit) WHERE rank = 0 AND NOT dead")
        .fetchall()
    )
    crops = {(r["layer"], r["unit"]) for r in index_rows(run) if r["kind"] == "crop"}
    assert crops == {(layer, unit) for layer, unit, key in wanted if key != gone} and len(crops) < len(wanted)
    assert [r.getMessage() for r in caplog.records if "could not be read back" in r.getMessage()] == [
        "1 top-k image(s) could not be read back from the data; their views are skipped"
    ]
