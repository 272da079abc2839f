"""`atlas compare`: checked against what the comparison must find by construction (a consistently permuted network,
one zeroed filter, different image sets) and CKA against an independent HSIC implementation."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from compare_models import PERMUTATION, ZEROED_UNIT
from pipeline.cli import main
from pipeline.compare.runner import CrossMoments, linear_cka, spearman
from pipeline.models import ModelConfig
from pipeline.scan.runner import ScanConfig, run_scan

LAYERS = "relu1,relu2,relu3"
WIDTHS = {"relu1": 6, "relu2": 8, "relu3": 5}


# ---------------------------------------------------------------------------------------------- numerics


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019 written from the definition: CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with
    linear kernels K = X X^T, L = Y Y^T and HSIC(K, L) = tr(K H L H) / (n - 1)^2, H the centring matrix."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T  # noqa: E741 - the paper's K and L

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l)))


def test_cka_matches_an_independent_implementation_and_its_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 12)) + 3.0  # an offset: centring matters
    y = x[:, :7] @ rng.normal(size=(7, 9)) + 0.7 * rng.normal(size=(120, 9)) - 5.0
    reference = hsic_cka(x, y)
    assert 0.2 < reference < 0.95
    assert linear_cka(x, y) == pytest.approx(reference, abs=1e-10)
    # streamed over uneven chunks, as the comparison reads maxima
    moments = CrossMoments()
    for start, stop in ((0, 7), (7, 50), (50, 51), (51, 120)):
        moments.add(x[start:stop], y[start:stop])
    assert moments.cka() == pytest.approx(reference, abs=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(9, 9)))  # orthogonal transform of one side
    assert linear_cka(x, y @ q) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x, 37.5 * y) == pytest.approx(reference, abs=1e-10)  # isotropic scaling
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    # its correlation matrix is numpy's
    expected = np.corrcoef(x.T, y.T)[:12, 12:]
    np.testing.assert_allclose(moments.correlation(), expected, atol=1e-10)


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, 40).astype(float), rng.normal(size=40)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


# ---------------------------------------------------------------------------------------------- runs


def _scan(data: str, out: str, factory: str, record: str = "all") -> str:
    run_scan(
        ScanConfig(
            model=ModelConfig(f"module:compare_models:{factory}", image_size=32),
            data=data,
            out=out,
            layers=LAYERS,
            k=4,
            record=record,
            batch_size=8,
            actors=1,
            progress=False,
            executor="local",
        )
    )
    return out


@pytest.fixture(scope="module")
def runs(ray_cluster, photo_folder, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("compare")
    subset = root / "subset"  # the same photos less one class: a different image set
    shutil.copytree(photo_folder, subset)
    shutil.rmtree(subset / sorted(d for d in os.listdir(subset) if (subset / d).is_dir())[0])
    return {
        "a": _scan(photo_folder, str(root / "a"), "cmp_net"),
        "permuted": _scan(photo_folder, str(root / "permuted"), "cmp_net_permuted"),
        "zeroed": _scan(photo_folder, str(root / "zeroed"), "cmp_net_zeroed"),
        "subset": _scan(str(subset), str(root / "subset-run"), "cmp_net", record="topk"),
    }


def _tables(cmp: str) -> tuple[dict, dict, dict]:
    units = {(r["layer"], r["unit"]): r for r in pq.read_table(os.path.join(cmp, "cmp_units")).to_pylist()}
    layers = {r["layer"]: r for r in pq.read_table(os.path.join(cmp, "cmp_layers")).to_pylist()}
    with open(os.path.join(cmp, "manifest.json")) as handle:
        return units, layers, json.load(handle)


def test_permuted_channels_are_recovered_exactly(runs, tmp_path, capsys):
    cmp = str(tmp_path / "cmp")
    assert main(["compare", runs["a"], runs["permuted"], "--out", cmp]) == 0
    units, layers, manifest = _tables(cmp)
    assert not any(r["dead_a"] for r in units.values())  # the premise: every unit varies, so matching is defined
    assert manifest["runs"]["a"]["fingerprint"] != manifest["runs"]["b"]["fingerprint"]
    assert manifest["per_image"]["source"] == "maxima" and manifest["images"]["shared"] == 36
    inverse = np.argsort(PERMUTATION)  # A's unit i is B's unit inverse[i]
    for unit in range(8):
        row = units[("relu2", unit)]
        assert row["matched_unit_b"] == inverse[unit] and row["best_unit_b"] == inverse[unit]
        assert row["matched_corr"] == pytest.approx(1.0, abs=1e-6)
    for layer in ("relu1", "relu3"):  # identity on either side of the permuted layer
        for unit in range(WIDTHS[layer]):
            row = units[(layer, unit)]
            assert row["matched_unit_b"] == unit and row["topk_jaccard"] == 1.0
            assert row["topk_spearman"] == pytest.approx(1.0) and row["same_corr"] == pytest.approx(1.0, abs=1e-6)
            assert row["label_changed"] is False
    for layer, row in layers.items():
        assert row["cka"] == pytest.approx(1.0, abs=1e-6), layer
        assert row["matched_mean_corr"] == pytest.approx(1.0, abs=1e-6), layer
        assert row["died"] == row["revived"] == 0
    assert layers["relu2"]["same_mean_corr"] < 0.9  # unit u of B is another filter: only matching finds it
    # `atlas query` over the comparison and both runs
    capsys.readouterr()
    assert (
        main(
            [
                "query",
                cmp,
                "SELECT count(*) AS n FROM cmp_units u JOIN a_topk t USING (layer, unit) "
                "JOIN b_topk s ON s.layer = u.layer AND s.unit = u.matched_unit_b AND s.rank = t.rank "
                "WHERE u.layer = 'relu2' AND s.image_key = t.image_key",
                "--format",
                "json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == [{"n": 8 * 4}]  # matched units have the same top-k


def test_one_zeroed_filter_is_the_one_unit_that_died(runs, tmp_path, capsys):
    cmp = str(tmp_path / "cmp")
    assert main(["compare", runs["a"], runs["zeroed"], "--out", cmp]) == 0
    units, layers, _ = _tables(cmp)
    died = sorted(key for key, row in units.items() if row["died"])
    assert died == [("relu2", ZEROED_UNIT)]
    assert not any(row["revived"] for row in units.values())
    row = units[("relu2", ZEROED_UNIT)]
    assert row["topk_jaccard"] == 0.0 and row["dead_b"] and row["label_b"] is None
    assert row["same_corr"] is None and row["matched_unit_b"] is None  # a constant unit correlates with nothing
    for unit in range(6):  # upstream: unchanged
        assert units[("relu1", unit)]["topk_jaccard"] == 1.0
        assert units[("relu1", unit)]["topk_spearman"] == pytest.approx(1.0)
    for unit in set(range(8)) - {ZEROED_UNIT}:  # its layer's other filters: unchanged
        assert units[("relu2", unit)]["topk_jaccard"] == 1.0
    assert layers["relu1"]["cka"] == pytest.approx(1.0, abs=1e-6)
    assert layers["relu2"]["died"] == 1 and layers["relu3"]["cka"] < 1.0
    capsys.readouterr()
    assert main(["query", cmp, "SELECT layer, unit FROM cmp_units WHERE died", "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["layer,unit", f"relu2,{ZEROED_UNIT}"]
    # the summary page: the chart, the died unit, nothing unescaped
    assert main(["site", cmp]) == 0
    with open(os.path.join(cmp, "site", "index.html")) as handle:
        html = handle.read()
    assert html.count("<rect") == 2 * 3 and "Units that died (1)" in html and "<script" not in html
    from pipeline.compare.site import unit_page

    def page(layer: str, unit: int) -> str:
        with open(os.path.join(cmp, "site", unit_page({"layer": layer, "unit": unit}))) as handle:
            return handle.read()

    assert "relu2 unit 5: died" in page("relu2", ZEROED_UNIT) and 'class="shared"' not in page("relu2", ZEROED_UNIT)
    assert page("relu1", 0).count('class="shared"') == 4  # B's unit: the same k = 4 images


def test_different_image_sets_refuse_per_image_comparison(runs, tmp_path, capsys):
    cmp = str(tmp_path / "cmp")
    capsys.readouterr()
    assert main(["compare", runs["a"], runs["subset"], "--out", cmp]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saw different images" in err[0] and "only in A" in err[0]
    units, layers, manifest = _tables(cmp)
    assert manifest["per_image"]["source"] is None and manifest["images"]["same"] is False
    assert all(row["cka"] is None and row["images"] == 0 for row in layers.values())
    assert all(row["topk_jaccard"] is None and row["same_corr"] is None for row in units.values())
    # what needs no shared images is still compared: dead units and labels
    assert len(units) == sum(WIDTHS.values()) and not any(row["died"] for row in units.values())
    assert all(row["label_a"] is not None and row["label_b"] is not None for row in units.values())


def _without_maxima(run: str, copy: str) -> str:
    """A copy of a run as a --record topk scan writes it: no maxima, record = "topk"."""
    shutil.copytree(run, copy)
    shutil.rmtree(os.path.join(copy, "maxima"))
    with open(os.path.join(copy, "manifest.json")) as handle:
        manifest = json.load(handle)
    manifest["record"] = manifest["config"]["record"] = "topk"
    with open(os.path.join(copy, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)
    return copy


def test_runs_without_every_maximum_compare_top_k_only(runs, tmp_path, capsys):
    topk_run = _without_maxima(runs["zeroed"], str(tmp_path / "topk-run"))
    cmp = str(tmp_path / "cmp")
    capsys.readouterr()
    assert main(["compare", runs["a"], topk_run, "--out", cmp]) == 0
    assert "need both runs scanned with --record all" in capsys.readouterr().out
    units, layers, manifest = _tables(cmp)
    assert manifest["per_image"]["reason"].startswith("correlations, CKA and unit matching need")
    assert all(row["cka"] is None for row in layers.values())
    assert units[("relu2", ZEROED_UNIT)]["died"] and units[("relu2", ZEROED_UNIT)]["topk_jaccard"] == 0.0
    assert units[("relu1", 0)]["topk_jaccard"] == 1.0


@pytest.mark.slow
def test_sample_recomputes_the_maxima_a_run_did_not_record(runs, tmp_path, capsys):
    full = str(tmp_path / "full")
    assert main(["compare", runs["a"], runs["zeroed"], "--out", full]) == 0
    topk_run = _without_maxima(runs["zeroed"], str(tmp_path / "topk-run"))
    cmp = str(tmp_path / "cmp")
    assert main(["compare", runs["a"], topk_run, "--out", cmp, "--sample", "36", "-q"]) == 0
    units, layers, manifest = _tables(cmp)
    assert manifest["per_image"]["source"] == "sample" and manifest["per_image"]["sample"]["rescanned"] == ["b"]
    expected_units, expected_layers, _ = _tables(full)
    for layer, row in layers.items():  # B's own model on the same images: the numbers of its recorded maxima
        assert row["images"] == 36 and row["cka"] == pytest.approx(expected_layers[layer]["cka"], abs=1e-9)
    for key, row in units.items():
        for column in ("same_corr", "matched_corr", "best_corr"):
            assert row[column] == pytest.approx(expected_units[key][column], abs=1e-9), (key, column)


def test_the_sample_is_seeded_and_does_not_depend_on_key_order():
    from pipeline.compare.sample import choose_sample

    keys = [f"k{i:03d}" for i in range(100)]
    first = choose_sample(keys, 10, seed=3)
    assert first == choose_sample(list(reversed(keys)), 10, seed=3) and len(set(first)) == 10
    assert first != choose_sample(keys, 10, seed=4) and choose_sample(keys, 500, seed=3) == keys


def test_bad_inputs_are_one_line_errors(runs, tmp_path, capsys):
    capsys.readouterr()
    assert main(["compare", runs["a"], str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2
    assert "not a complete run" in capsys.readouterr().err
    assert main(["compare", runs["a"], runs["permuted"], "--out", runs["zeroed"]]) == 2  # a scan run as --out
    assert "holds a scan run" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(runs["zeroed"], "cmp_units"))


def test_a_job_compares_its_run_with_the_previous_one(runs, tmp_path, photo_folder):
    from pipeline.cluster.config import ConfigError, parse_config
    from pipeline.cluster.job import prepare_job, run_job

    run = str(tmp_path / "tonight")
    shutil.copytree(runs["zeroed"], run)  # tonight's scan, already complete: the job runs compare and site
    data = {
        "job": {"name": "nightly", "out": run, "stages": ["site"]},
        "model": {"spec": "module:compare_models:cmp_net_zeroed", "image_size": 32},
        "data": {"source": photo_folder},
        "scan": {"layers": LAYERS, "k": 4, "record": "all"},
        "compare": {"previous": runs["a"]},
    }
    record = run_job(prepare_job(parse_config(data)), progress=False)
    assert not record["stages"]["compare"]["skipped"]
    units, _, manifest = _tables(os.path.join(run, "compare"))
    assert manifest["runs"]["a"]["path"] == os.path.abspath(runs["a"])
    assert sorted(key for key, row in units.items() if row["died"]) == [("relu2", ZEROED_UNIT)]
    assert os.path.isfile(os.path.join(run, "compare", "site", "index.html"))
    again = run_job(prepare_job(parse_config(data)), progress=False)
    assert again["stages"]["compare"]["skipped"]
    for previous, message in (
        (str(tmp_path / "missing"), "compare.previous: .* is not a complete run"),
        ("s3://bucket/run", "must be a local run directory"),
        (run, "own run directory"),
    ):
        with pytest.raises(ConfigError, match=message):
            prepare_job(parse_config(data | {"compare": {"previous": previous}}))


# ---------------------------------------------------------------------------------------------- synthetic runs


def _synthetic_run(
    path: str, layers: dict[str, np.ndarray], keys: list[str], k: int = 3, seed: int = 0, label: str = "label"
) -> str:
    """A complete run directory written from per-image maxima (images x units per layer) with the store's
    schemas, as a --record all scan lays it out; rows are shuffled so only the keys can align the runs."""
    import pyarrow as pa

    from pipeline.store import SCHEMAS, layer_dir, write_json, write_table

    rng = np.random.default_rng(seed)
    os.makedirs(path)
    order = rng.permutation(len(keys))
    write_table(
        pa.table(
            {
                "image_key": [keys[i] for i in order],
                "source": ["s"] * len(keys),
                "label": [f"{label}{i % 3}" for i in order],
                "width": [32] * len(keys),
                "height": [32] * len(keys),
                "status": ["ok"] * len(keys),
                "error": [None] * len(keys),
            },
            schema=SCHEMAS["images"],
        ),
        os.path.join(path, "images", "part-0.parquet"),
    )
    units_rows = []
    for index, (layer, values) in enumerate(layers.items()):
        n, p = values.shape
        rows = [(layer, u, keys[i], float(values[i, u]), 0, 0) for i in order for u in range(p)]
        half = len(rows) // 2  # two files, as several workers write them
        for part, chunk in enumerate((rows[:half], rows[half:])):
            write_table(
                pa.table(dict(zip(SCHEMAS["maxima"].names, map(list, zip(*chunk)))), schema=SCHEMAS["maxima"]),
                os.path.join(layer_dir(os.path.join(path, "maxima"), layer), f"part-{part}.parquet"),
            )
        topk = []
        for u in range(p):
            ranked = sorted(range(n), key=lambda i: (-np.float32(values[i, u]), keys[i]))[:k]
            topk += [
                (layer, u, r, keys[i], f"{label}{i % 3}", float(values[i, u]), 0, 0, 0, 0, 1, 1)
                for r, i in enumerate(ranked)
            ]
        write_table(
            pa.table(dict(zip(SCHEMAS["topk"].names, map(list, zip(*topk)))), schema=SCHEMAS["topk"]),
            os.path.join(layer_dir(os.path.join(path, "topk"), layer), "part-0.parquet"),
        )
        units_rows += [
            {
                "layer": layer,
                "unit": u,
                "layer_index": index,
                "count": n,
                "mean": float(values[:, u].mean()),
                "std": float(values[:, u].std()),
                "min": float(values[:, u].min()),
                "max": float(values[:, u].max()),
                "n_active": int((values[:, u] > 0).sum()),
                "frac_active": float((values[:, u] > 0).mean()),
                "p50": 0.0,
                "p90": 0.0,
                "p99": 0.0,
                "p999": 0.0,
                "dead": bool(values[:, u].max() <= 0),
                "sketch_buckets": [],
                "sketch_counts": [],
            }
            for u in range(p)
        ]
    write_table(
        pa.Table.from_pylist(units_rows, schema=SCHEMAS["units"]), os.path.join(path, "units", "part-0.parquet")
    )
    write_json(
        {
            "fingerprint": f"synthetic-{seed}",
            "record": "all",
            "k": k,
            "model": {"spec": "synthetic"},
            "data": {"path": "synthetic"},
            "layers": [{"name": name, "units": v.shape[1]} for name, v in layers.items()],
        },
        os.path.join(path, "manifest.json"),
    )
    return path


def test_cka_and_matching_across_widths_read_from_maxima_in_chunks(tmp_path, monkeypatch):
    import pipeline.compare.runner as compare

    rng = np.random.default_rng(5)
    keys = [f"img{i:03d}" for i in range(90)]
    x = rng.normal(size=(90, 6)).astype(np.float32) + 1.0
    wide = (x @ rng.normal(size=(6, 9)) + 0.5 * rng.normal(size=(90, 9))).astype(np.float32)  # 6 -> 9 units
    scrambled = x[:, [2, 0, 1, 5, 3, 4]] * 2.0 + 1.0  # same units, permuted and rescaled
    a = _synthetic_run(str(tmp_path / "a"), {"L": x, "M": x}, keys, seed=1)
    b = _synthetic_run(str(tmp_path / "b"), {"L": wide, "M": scrambled}, keys, seed=2)
    monkeypatch.setattr(compare, "CHUNK_BYTES", 1000)  # ~16 images per chunk: the chunked join is exercised
    compare.compare_runs(a, b, str(tmp_path / "cmp"))
    units, layers, manifest = _tables(str(tmp_path / "cmp"))
    assert layers["L"]["per_unit"] is False and layers["L"]["units_b"] == 9
    assert layers["L"]["cka"] == pytest.approx(hsic_cka(x.astype(np.float64), wide.astype(np.float64)), abs=1e-6)
    corr = np.corrcoef(x.T.astype(np.float64), wide.T.astype(np.float64))[:6, 6:]
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-corr)
    for unit in range(6):
        row = units[("L", unit)]
        assert row["dead_b"] is None and row["topk_jaccard"] is None and row["label_changed"] is None
        assert row["best_unit_b"] == int(corr[unit].argmax())
        assert row["matched_unit_b"] == cols[list(rows).index(unit)]
        assert row["matched_corr"] == pytest.approx(corr[unit, row["matched_unit_b"]], abs=1e-6)
    assert [units[("M", u)]["matched_unit_b"] for u in range(6)] == [1, 2, 0, 4, 5, 3]
    assert layers["M"]["cka"] == pytest.approx(1.0, abs=1e-6)
    assert all(units[("M", u)]["topk_jaccard"] is not None for u in range(6))


def test_comparison_site_links_only_publishable_images_and_escapes_data(tmp_path):
    import pyarrow as pa

    from pipeline.compare.runner import compare_runs
    from pipeline.compare.site import build_comparison_site, unit_page
    from pipeline.store import ATLAS_INDEX_SCHEMA, write_table

    rng = np.random.default_rng(7)
    keys = [f"img{i:02d}" for i in range(20)]
    x = rng.normal(size=(20, 2)).astype(np.float32) + 2.0
    payload = "<script>alert(1)</script>"
    a = _synthetic_run(str(tmp_path / "a"), {"L": x}, keys, seed=1, label=payload)
    b = _synthetic_run(str(tmp_path / "b"), {"L": x + 1.0}, keys, seed=2)
    atlas = os.path.join(a, "atlas", "layer=L", "unit=0")
    os.makedirs(atlas)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    (tmp_path / "a" / "atlas" / "layer=L" / "unit=0" / "crop_000.png").write_bytes(b"png")
    os.link(secret, os.path.join(atlas, "crop_001.png"))  # a second name of a file outside the run
    rows = [
        ("crop", 0, "atlas/layer=L/unit=0/crop_000.png"),
        ("crop", 1, "atlas/layer=L/unit=0/crop_001.png"),
        ("crop", 2, "../secret.png"),
        ("featvis", 0, "/etc/passwd"),
    ]
    write_table(
        pa.table(
            {
                "layer": ["L"] * 4,
                "unit": [0] * 4,
                "kind": [r[0] for r in rows],
                "rank": [r[1] for r in rows],
                "image_key": [None] * 4,
                "path": [r[2] for r in rows],
                "act": [1.0] * 4,
                "featvis_act": [None] * 4,
                "top1_act": [None] * 4,
                "other_image_similarity": [None] * 4,
            },
            schema=ATLAS_INDEX_SCHEMA,
        ),
        os.path.join(a, "atlas", "index.parquet"),
    )
    cmp = str(tmp_path / "cmp")
    compare_runs(a, b, cmp)
    build_comparison_site(cmp)
    page = os.path.join(cmp, "site", unit_page({"layer": "L", "unit": 0}))
    with open(page) as handle:
        html = handle.read()
    sources = [os.path.normpath(os.path.join(os.path.dirname(page), src)) for src in re.findall(r'src="([^"]*)"', html)]
    assert sources == [os.path.join(atlas, "crop_000.png")]  # not the hard link, not a path leaving the run
    assert payload not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count('class="shared"') == 3  # B's unit ranks the same images: x + 1 keeps the order
