"""`atlas score` (pipeline.score): the Machine Interpretability Score against an independent implementation in
this file, task by task over the same embeddings; independent of workers and batch size; known answers (a hash
of the pixels scores near chance, a hand-set colour detector near 1 on its crops); the DreamSim adapter with a
stand-in for the package (its weights cannot download here)."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch

from pipeline.models import ModelConfig
from pipeline.scan.runner import ScanConfig, run_scan
from pipeline.score.mis import unit_score
from pipeline.score.runner import ScoreConfig, score_run
from pipeline.score.similarity import SimilarityConfig, load_similarity
from pipeline.score.worker import Embedder, EmbedTask
from pipeline.store import RunError, connect

SCORE_NET = ModelConfig(spec="module:tiny_models:score_net", image_size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
REFS, TASKS, SIZE = 4, 6, 64


def reference_unit(top: np.ndarray, bottom: np.ndarray, refs: int, temperature: float) -> list[float]:
    """Borowski's task solved as the paper's task model, written out task by task with explicit loops."""
    probabilities = []
    top, bottom = np.asarray(top, np.float64), np.asarray(bottom, np.float64)
    for n in range(min(len(top), len(bottom)) - refs):
        q_plus, q_minus = top[refs + n], bottom[refs + n]

        def mean_similarity(q, references):
            return sum(float(np.dot(q, r)) for r in references) / len(references)

        delta_plus = mean_similarity(q_plus, top[:refs]) - mean_similarity(q_plus, bottom[:refs])
        delta_minus = mean_similarity(q_minus, top[:refs]) - mean_similarity(q_minus, bottom[:refs])
        probabilities.append(1.0 / (1.0 + np.exp(-(delta_plus - delta_minus) / temperature)))
    return probabilities


def test_unit_score_matches_the_reference_task_by_task():
    rng = np.random.default_rng(0)
    for _ in range(20):
        refs, tasks, d = int(rng.integers(1, 10)), int(rng.integers(1, 21)), int(rng.integers(2, 50))
        emb = rng.normal(size=(2, refs + tasks, d))
        emb /= np.linalg.norm(emb, axis=2, keepdims=True)
        temperature = float(rng.uniform(0.05, 1.0))
        got = unit_score(emb[0], emb[1], refs, temperature)
        expected = reference_unit(emb[0], emb[1], refs, temperature)
        np.testing.assert_allclose(got.probabilities, expected, rtol=1e-12)
        assert got.mis == pytest.approx(np.mean(expected), rel=1e-12) and got.tasks == tasks


@pytest.fixture(scope="module")
def scanned(photo_folder, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("score") / "run")
    run_scan(
        ScanConfig(
            model=SCORE_NET,
            data=photo_folder,
            out=run,
            layers="red,hash",
            k=REFS + TASKS,
            bottom_k=REFS + TASKS,
            progress=False,
            executor="local",
        )
    )
    return run


def _score(run: str, **settings) -> dict:
    base = dict(run=run, references=REFS, tasks=TASKS, image_size=SIZE, executor="local", progress=False)
    return score_run(ScoreConfig(**{**base, **settings}))


def _table(run: str) -> list[tuple]:
    return connect(run).execute("SELECT * FROM scores ORDER BY layer, unit, kind").fetchall()


def test_scores_equal_the_reference_over_the_same_embeddings(scanned, photo_folder):
    record = _score(scanned, batch_size=8)
    assert record["counts"]["scored"] == 2 * 6 and record["counts"]["dead"] == 2  # red unit 2 is dead, both kinds
    con = connect(scanned)
    embedder = Embedder(SimilarityConfig(image_size=SIZE, batch_size=8))
    rows = con.execute("SELECT layer, unit, kind, similarity, mis, tasks, status FROM scores").fetchall()
    for layer, unit, kind, similarity, mis, tasks, status in rows:
        assert similarity == embedder.name
        if status == "dead":
            assert mis is None and (layer, unit) == ("red", 2)
            continue
        sides = {}
        for table in ("topk", "bottomk"):
            picked = con.execute(
                f"SELECT image_key, box_x0, box_y0, box_x1, box_y1 FROM {table} "
                "WHERE layer = ? AND unit = ? AND rank < ? ORDER BY rank",
                [layer, unit, REFS + TASKS],
            ).fetchall()
            items = [(str(i), key, None if kind == "whole" else tuple(box)) for i, (key, *box) in enumerate(picked)]
            images = {}
            for _, key, _ in items:
                with open(os.path.join(photo_folder, key), "rb") as handle:
                    images[key] = handle.read()
            sides[table] = embedder(EmbedTask(items, images)).embeddings
        expected = reference_unit(sides["topk"], sides["bottomk"], REFS, 0.16)
        assert tasks == TASKS and mis == pytest.approx(np.mean(expected), rel=1e-9), (layer, unit, kind)


def test_known_answers_hash_near_chance_and_colour_detector_on_its_crops(scanned):
    _score(scanned, batch_size=8)
    con = connect(scanned)
    scores = {
        (layer, u, k): (m, a)
        for layer, u, k, m, a in con.execute("SELECT layer, unit, kind, mis, accuracy FROM scores").fetchall()
    }
    hashed = [scores[("hash", u, kind)] for u in range(4) for kind in ("whole", "crop")]
    # No visual regularity: the task model is at chance on average, however the images are shown.
    assert abs(np.mean([m for m, _ in hashed]) - 0.5) < 0.05
    assert all(abs(m - 0.5) < 0.15 for m, _ in hashed)
    red_crop = scores[("red", 0, "crop")]
    assert red_crop[1] == 1.0 and red_crop[0] > 0.8  # every task right on its crops


@pytest.mark.slow
def test_independent_of_workers_and_batch_size(ray_cluster, scanned):
    _score(scanned, executor="ray", actors=2, threads=1, batch_size=8, items_per_task=7)
    two = _table(scanned)
    _score(scanned, executor="ray", actors=1, threads=1, batch_size=8, items_per_task=50)
    assert _table(scanned) == two  # other workers, other tasks, the same forward shape: identical to the last bit
    _score(scanned, batch_size=3)  # this process, its own thread count, another batch shape
    local = _table(scanned)
    assert [r[:4] + r[5:] for r in local] == [r[:4] + r[5:] for r in two]  # the same decisions in every task
    # Another forward shape or thread count changes convolution blocking (float rounding), not the score.
    np.testing.assert_allclose(
        [r[4] for r in local if r[4] is not None], [r[4] for r in two if r[4] is not None], rtol=1e-5
    )


@pytest.mark.slow
def test_an_interrupted_score_resumes_from_its_committed_embeddings(scanned, monkeypatch):
    from pipeline.score import runner

    _score(scanned, batch_size=8)
    clean = _table(scanned)
    calls = {"n": 0}
    original = runner._WorkStore.commit

    def interrupted(self, result):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated Ctrl-C")
        original(self, result)

    monkeypatch.setattr(runner._WorkStore, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _score(scanned, batch_size=8, items_per_task=20)
    monkeypatch.setattr(runner._WorkStore, "commit", original)
    embedded = []
    call = runner.Embedder.__call__
    monkeypatch.setattr(
        runner.Embedder, "__call__", lambda self, task: embedded.append(len(task.items)) or call(self, task)
    )
    record = _score(scanned, batch_size=8, items_per_task=20)
    assert sum(embedded) == record["counts"]["items"] - 40  # the two committed tasks are not redone
    assert _table(scanned) == clean
    assert not os.path.exists(os.path.join(scanned, "scores", ".work"))


def test_a_run_without_bottom_k_is_refused(photo_folder, tmp_path):
    run = str(tmp_path / "plain")
    run_scan(
        ScanConfig(model=SCORE_NET, data=photo_folder, out=run, layers="red", k=3, progress=False, executor="local")
    )
    with pytest.raises(RunError, match="--bottom-k"):
        _score(run)


class _StandInDreamSim(torch.nn.Module):
    """The shape of dreamsim's model: embed((N, 3, 224, 224)) -> (N, D)."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def test_the_dreamsim_adapter_with_a_stand_in(monkeypatch, scanned):
    calls = {}

    def dreamsim(pretrained=True, device="cpu", cache_dir=None):
        calls.update(pretrained=pretrained, device=device, cache_dir=cache_dir)

        def preprocess(image):
            array = np.asarray(image.convert("RGB").resize((224, 224)), dtype=np.float32) / 255.0
            return torch.from_numpy(array).permute(2, 0, 1)[None]

        return _StandInDreamSim(), preprocess

    monkeypatch.setitem(sys.modules, "dreamsim", types.SimpleNamespace(dreamsim=dreamsim))
    model = load_similarity(SimilarityConfig(kind="dreamsim", cache_dir="/tmp/ds", batch_size=2))
    from PIL import Image

    images = [Image.new("RGB", (50, 40), colour) for colour in ("red", "blue", "red")]
    embedded = model.embed(images)
    assert embedded.shape == (3, 6) and calls == {"pretrained": True, "device": "cpu", "cache_dir": "/tmp/ds"}
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, rtol=1e-6)
    assert embedded[0] @ embedded[2] == pytest.approx(1.0) and embedded[0] @ embedded[1] < 0.9
    record = _score(scanned, similarity="dreamsim", kinds=("whole",))
    assert record["similarity"] == "dreamsim:ensemble"
    assert {r[0] for r in connect(scanned).execute("SELECT DISTINCT similarity FROM scores").fetchall()} == {
        "dreamsim:ensemble"
    }  # the pooled scores were replaced, never mixed
    monkeypatch.setitem(sys.modules, "dreamsim", None)
    with pytest.raises(ValueError, match="dreamsim package"):
        load_similarity(SimilarityConfig(kind="dreamsim"))


def test_the_site_and_the_notebook_api_show_the_scores(ray_cluster, scanned, tmp_path):
    import re

    from pipeline.api import open_run
    from pipeline.render.plan import RenderOptions
    from pipeline.render.runner import render_run
    from pipeline.site.build import build_site, unit_href
    from pipeline.site.paths import layer_slug

    _score(scanned, batch_size=8)
    render_run(scanned, RenderOptions(units=frozenset(), pictures=2, executor="local", progress=False))  # pictures
    drawn = (
        connect(scanned)
        .execute("SELECT layer, unit, rank, image_key FROM atlas WHERE kind = 'bottom_crop' ORDER BY ALL")
        .fetchall()
    )
    expected_drawn = (
        connect(scanned)
        .execute(
            "SELECT b.layer, b.unit, b.rank, b.image_key FROM bottomk b JOIN units u USING (layer, unit) "
            "WHERE NOT u.dead AND b.rank < 2 ORDER BY ALL"
        )
        .fetchall()
    )
    assert drawn == expected_drawn and drawn
    con = connect(scanned)
    expected = {
        (layer, unit, kind): mis
        for layer, unit, kind, mis in con.execute("SELECT layer, unit, kind, mis FROM scores").fetchall()
    }
    out = str(tmp_path / "site")
    build_site(scanned, out, progress=False)
    for (layer, unit, kind), mis in expected.items():
        with open(os.path.join(out, unit_href(layer, unit)), encoding="utf-8") as handle:
            page = handle.read()
        row = re.search(rf'<tr data-kind="{kind}">.*?<td class="mis">(.*?)</td>', page, re.S)
        assert row, (layer, unit, kind)
        assert (mis is None and "dead" in row.group(1)) or row.group(1) == f"{mis:.3f}"
        bottom = con.execute(
            "SELECT image_key FROM bottomk WHERE layer = ? AND unit = ? ORDER BY rank", [layer, unit]
        ).fetchall()
        assert "Least activating 10 images" in page and all(key in page for (key,) in bottom)
        if mis is not None:  # the two rendered least activating crops are on the page
            assert page.count("bottom_crop_00") == 2, (layer, unit)
    with open(os.path.join(out, "layers", f"{layer_slug('red')}.html"), encoding="utf-8") as handle:
        layer_page = handle.read()
    cards = dict(re.findall(r'data-unit="(\d+)"[^>]*data-mis-crop="([-0-9.e]+)"', layer_page))
    assert float(cards["0"]) == pytest.approx(expected[("red", 0, "crop")]) and cards["2"] == "-1"
    assert 'value="mis-crop"' in layer_page
    with open(os.path.join(out, "index.html"), encoding="utf-8") as handle:
        index = handle.read()
    assert index.count("interpretability scores (crops)") == 2  # one chart per scored layer
    run = open_run(scanned)
    units = run.layer("red").units
    assert units["mis_crop"].iloc[0] == pytest.approx(expected[("red", 0, "crop")])
    assert units["mis_whole"].isna().iloc[2]  # the dead unit
    assert list(run.unit("red", 0).scores["kind"]) == ["crop", "whole"]
    assert len(run.unit("red", 0).bottomk) == 10


def test_job_files_have_a_score_section():
    from pipeline.cluster.config import ConfigError, parse_config

    base = {"job": {"name": "x", "out": "/tmp/x", "stages": ["scan"]}, "model": {"spec": "m"}, "data": {"source": "d"}}
    config = parse_config({**base, "scan": {"bottom_k": 29}, "score": {"enabled": True, "kinds": ["crop"]}})
    assert config.score.enabled and config.scan.bottom_k == 29 and config.score.kinds == ["crop"]
    assert not parse_config(base).score.enabled
    with pytest.raises(ConfigError, match="scan.bottom_k = 29"):
        parse_config({**base, "score": {"enabled": True}})
    with pytest.raises(ConfigError, match="score.similarity"):
        parse_config({**base, "score": {"similarity": "lpips"}})
