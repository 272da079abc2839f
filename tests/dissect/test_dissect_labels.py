"""Label selectivity (pipeline.dissect.selectivity) against sklearn and hand counts on run directories written
here, the `labels` view, `atlas dissect` end to end on Ray (scan, then dissect with the built-in probe), and the
Broden converter on a tiny hand-made tree in Broden's layout."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import write_png
from pipeline.cli import main
from pipeline.store import IMAGES_SCHEMA, MAXIMA_SCHEMA, TOPK_SCHEMA, UNITS_SCHEMA, connect, layer_dir, write_table

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _write_run(root: str, labels: list[str], acts: np.ndarray, k: int = 5) -> str:
    """A complete run of one layer 'L' (units = acts' columns), every image recorded (--record all)."""
    n, units = acts.shape
    keys = [f"img{i:04d}" for i in range(n)]
    write_table(
        pa.table(
            {
                "image_key": keys,
                "source": ["x"] * n,
                "label": labels,
                "width": [8] * n,
                "height": [8] * n,
                "status": ["ok"] * n,
                "error": [None] * n,
            },
            schema=IMAGES_SCHEMA,
        ),
        os.path.join(root, "images", "part-0.parquet"),
    )
    write_table(
        pa.table(
            {
                "layer": ["L"] * (n * units),
                "unit": np.repeat(np.arange(units), n).astype(np.int32),
                "image_key": keys * units,
                "act": acts.T.reshape(-1).astype(np.float32),
                "y": np.zeros(n * units, np.int32),
                "x": np.zeros(n * units, np.int32),
            },
            schema=MAXIMA_SCHEMA,
        ),
        os.path.join(layer_dir(os.path.join(root, "maxima"), "L"), "part-0.parquet"),
    )
    rows = []
    for unit in range(units):
        order = sorted(range(n), key=lambda i: (-float(acts[i, unit]), keys[i]))[:k]
        rows += [
            {
                "layer": "L",
                "unit": unit,
                "rank": r,
                "image_key": keys[i],
                "label": labels[i],
                "act": float(acts[i, unit]),
                "y": 0,
                "x": 0,
                "box_x0": 0,
                "box_y0": 0,
                "box_x1": 1,
                "box_y1": 1,
            }
            for r, i in enumerate(order)
        ]
    write_table(
        pa.Table.from_pylist(rows, schema=TOPK_SCHEMA),
        os.path.join(layer_dir(os.path.join(root, "topk"), "L"), "part-0.parquet"),
    )
    dead = ~(acts > 0).any(0)
    unit_rows = [
        {f.name: None for f in UNITS_SCHEMA}
        | {"layer": "L", "unit": u, "layer_index": 0, "count": n, "dead": bool(dead[u])}
        for u in range(units)
    ]
    write_table(pa.Table.from_pylist(unit_rows, schema=UNITS_SCHEMA), os.path.join(root, "units", "part-0.parquet"))
    with open(os.path.join(root, "manifest.json"), "w") as handle:
        json.dump(
            {
                "fingerprint": "test",
                "record": "all",
                "k": k,
                "layers": [{"name": "L", "shape": [units], "units": units}],
            },
            handle,
        )
    return root


def _selectivity(run: str) -> dict:
    assert main(["dissect", run]) == 0
    table = pq.read_table(os.path.join(run, "dissect", "selectivity.parquet")).to_pylist()
    return {(r["unit"], r["label"]): r for r in table}


def test_one_label_driving_a_unit_gives_precision_and_auroc_one(tmp_path):
    rng = np.random.default_rng(0)
    labels = [("a", "b", "c")[i % 3] for i in range(90)] + [None] * 6
    acts = rng.random((96, 3)) * 0.5
    acts[[i for i, label in enumerate(labels) if label == "a"], 0] += 1.0  # only 'a' images drive unit 0
    acts[:, 1] = np.round(acts[:, 1] * 4) / 4  # unit 1: random, heavy ties
    acts[:, 2] = 0.0  # unit 2: dead
    run = _write_run(str(tmp_path / "run"), labels, acts)
    rows = _selectivity(run)
    assert rows[0, "a"]["precision_at_k"] == 1.0 and rows[0, "a"]["auroc"] == 1.0 and rows[0, "a"]["rank"] == 0
    assert rows[0, "a"]["positives"] == 30 and rows[0, "a"]["k"] == 5
    for unit in range(3):  # every AUROC against sklearn; images without a label are negatives for every label
        for label in ("a", "b", "c"):
            truth = [x == label for x in labels]
            assert rows[unit, label]["auroc"] == pytest.approx(
                sklearn_metrics.roc_auc_score(truth, acts[:, unit]), abs=1e-12
            )
            top = sorted(range(96), key=lambda i: (-acts[i, unit], f"img{i:04d}"))[:5]
            assert rows[unit, label]["precision_at_k"] == pytest.approx(sum(labels[i] == label for i in top) / 5)
    con = connect(run)
    labelled = {
        u: (lab, p, a)
        for u, lab, p, a in con.execute(
            "SELECT unit, data_label, data_label_precision, data_label_auroc FROM labels JOIN units USING (layer, unit) "
            "ORDER BY unit"
        ).fetchall()
    }
    con.close()
    assert labelled[0] == ("a", 1.0, 1.0)
    assert labelled[2] == (None, None, None)  # a dead unit has no strongest label


def test_shuffled_labels_give_auroc_near_one_half(tmp_path):
    rng = np.random.default_rng(1)
    labels = ["a"] * 100 + ["b"] * 200
    acts = rng.random((300, 1))
    acts[:100, 0] += 1.0  # 'a' drives the unit...
    shuffled = list(rng.permutation(labels))  # ...but the labels are shuffled
    rows = _selectivity(_write_run(str(tmp_path / "run"), shuffled, acts))
    for label in ("a", "b"):
        truth = [x == label for x in shuffled]
        assert rows[0, label]["auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(truth, acts[:, 0]), abs=1e-12)
        assert abs(rows[0, label]["auroc"] - 0.5) < 0.15  # 4 standard deviations at 100 vs 200 images


def test_precision_only_without_maxima(tmp_path):
    labels = ["a", "b"] * 10
    acts = np.linspace(0, 1, 20)[:, None]
    run = _write_run(str(tmp_path / "run"), labels, acts, k=4)
    manifest = json.load(open(os.path.join(run, "manifest.json")))
    json.dump(manifest | {"record": "topk"}, open(os.path.join(run, "manifest.json"), "w"))
    rows = _selectivity(run)
    assert {key: (r["precision_at_k"], r["auroc"]) for key, r in rows.items()} == {
        (0, "a"): (0.5, None),
        (0, "b"): (0.5, None),
    }


# ----------------------------------------------------------------------------------------------- on Ray


@pytest.mark.slow
def test_atlas_dissect_end_to_end_on_ray(ray_cluster, tmp_path):
    from pipeline.dissect.builtin import write_colors_textures
    from pipeline.dissect.probe import open_probe
    from pipeline.dissect.runner import concepts_table, dissect_in_process
    from pipeline.models import ModelConfig

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(8):
        image = np.full((112, 112, 3), 128, np.uint8)
        top, left = rng.integers(0, 60, 2)
        image[top : top + 40, left : left + 40] = (230, 20, 20) if i % 2 == 0 else (20, 20, 230)
        write_png(str(data / ("red" if i % 2 == 0 else "blue") / f"{i}.png"), image)
    run = str(tmp_path / "run")
    model = [
        "--model",
        "module:tiny_models:dissect_net",
        "--image-size",
        "112",
        "--resize",
        "112",
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "1,1,1",
    ]
    assert (
        main(
            [
                "scan",
                *model,
                "--data",
                str(data),
                "--layers",
                "relu2",
                "--out",
                run,
                "--k",
                "2",
                "--record",
                "all",
                "--batch-size",
                "4",
                "-q",
            ]
        )
        == 0
    )
    probe_dir = write_colors_textures(str(tmp_path / "probe"))
    assert main(["dissect", run, "--probe", probe_dir, "--actors", "2", "--batch-size", "16", "-q"]) == 0
    con = connect(run)
    labels = {
        u: row
        for u, *row in con.execute(
            "SELECT unit, concept, category, iou, runner_up, data_label, data_label_precision, data_label_auroc, "
            "threshold FROM labels WHERE layer = 'relu2' ORDER BY unit"
        ).fetchall()
    }
    con.close()
    record = json.load(open(os.path.join(run, "dissect", "dissect.json")))
    assert record["probe"]["images"] == 110 and record["layers"] == ["relu2"]
    assert record["labelled_units"] == {"relu2": {"color": 1, "texture": 1}}
    assert main(["dissect", run, "-q"]) == 0  # selectivity again: the dissection's files and record stay
    assert json.load(open(os.path.join(run, "dissect", "dissect.json")))["probe"] == record["probe"]
    con = connect(run)
    assert con.execute("SELECT concept FROM labels WHERE layer = 'relu2' ORDER BY unit").fetchall() == [
        ("red",),
        ("stripes-horizontal-12px",),
        (None,),
    ]
    con.close()
    assert labels[0][:2] == ["red", "color"] and labels[0][4:7] == ["red", 1.0, 1.0]
    assert labels[1][:2] == ["stripes-horizontal-12px", "texture"] and labels[1][2] > 0.5
    assert labels[2][:3] == [None, None, None] and labels[2][7] == 0.0
    # Ray with two workers gives the very table the in-process path gives with one
    probe = open_probe(probe_dir)
    info = [{"name": "relu2", "shape": [3, 112, 112]}]
    spec = ModelConfig(
        spec="module:tiny_models:dissect_net", image_size=112, resize=112, mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0)
    )
    tallies, _ = dissect_in_process(probe, spec, info, batch_size=16)
    assert pq.read_table(os.path.join(run, "dissect", "concepts.parquet")).equals(concepts_table(probe, info, tallies))


def test_atlas_dissect_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert main(["dissect", str(tmp_path / "nothing")]) == 2
    run = _write_run(str(tmp_path / "run"), ["a", "b"], np.array([[1.0], [0.0]]))
    assert main(["dissect", run, "--probe", str(tmp_path / "no-probe")]) == 2
    assert main(["dissect", run, "--probe", "builtin:nonsense"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("atlas: error: ") for line in err)


# ----------------------------------------------------------------------------------------------- Broden


def _rgb_mask(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)


@pytest.fixture()
def broden_tree(tmp_path):
    """Two images in Broden's layout: colour and object masks (RGB, id = R + 256 G, one id above 255), a part
    mask on one image, texture labels covering the whole image, a label listed in two c_*.csv files."""
    root = tmp_path / "broden"
    masks = {
        "a_color.png": np.array([[1, 1, 2, 2]] * 4),
        "a_object.png": np.array([[0, 300, 300, 0]] * 4),
        "b_color.png": np.array([[2, 2, 2, 1]] * 4),
        "b_object.png": np.zeros((4, 4), int),
        "b_part.png": np.array([[5, 0, 0, 5]] * 4),
    }
    for name, ids in masks.items():
        write_png(str(root / "images" / "set" / name), _rgb_mask(ids))
    for name in ("a.jpg", "b.jpg"):
        write_png(str(root / "images" / "set" / name), np.full((8, 8, 3), 200, np.uint8))
    with open(root / "index.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "material", "scene", "texture"]
        )
        writer.writerow(["set/a.jpg", "train", 8, 8, 4, 4, "set/a_color.png", "set/a_object.png", "", "", "", "7"])
        writer.writerow(
            ["set/b.jpg", "train", 8, 8, 4, 4, "set/b_color.png", "set/b_object.png", "set/b_part.png", "", "", ""]
        )
    tables = {
        "color": [(1, "red-c", 10), (2, "blue-c", 8)],
        "object": [(300, "wall", 50), (5, "leg", 2)],
        "part": [(5, "leg", 9)],
        "texture": [(7, "striped", 3)],
    }
    for category, rows in tables.items():
        with open(root / f"c_{category}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["code", "number", "name", "frequency", "coverage"])
            writer.writerows([(code, number, name, freq, 0.1) for code, (number, name, freq) in enumerate(rows, 1)])
    return root


def test_broden_converter_on_a_hand_made_tree(broden_tree, tmp_path):
    from pipeline.dissect.probe import decode_probe_row, open_probe
    from pipeline.preprocess import Preprocess

    out = str(tmp_path / "probe")
    assert main(["probe", "broden", str(broden_tree), "--out", out]) == 0
    probe = open_probe(out)
    concepts = dict(zip(probe.concepts.ids.tolist(), zip(probe.concepts.names, probe.concepts.categories)))
    assert concepts == {
        1: ("red-c", "color"),
        2: ("blue-c", "color"),
        5: ("leg", "part"),
        7: ("striped", "texture"),
        300: ("wall", "object"),
    }  # 'leg' is more frequent as a part than as an object
    rows = [r for t in probe.batches(10) for r in t.to_pylist()]
    assert [r["image_key"] for r in rows] == ["set/a.jpg", "set/b.jpg"]
    position = {int(c): i for i, c in enumerate(probe.concepts.ids)}
    decoded = [decode_probe_row(r, Preprocess(image_size=8, resize=8), probe.concepts, position) for r in rows]
    names = probe.concepts.names

    def pixels(image, name):
        where = list(image.present).index(names.index(name))
        return image.labels[where].reshape(4, 4)

    a, b = decoded
    assert sorted(names[p] for p in a.present) == ["blue-c", "red-c", "striped", "wall"]
    np.testing.assert_array_equal(pixels(a, "wall"), np.array([[0, 1, 1, 0]] * 4, bool))
    assert pixels(a, "striped").all()  # a texture label covers the whole image
    np.testing.assert_array_equal(pixels(b, "leg"), np.array([[1, 0, 0, 1]] * 4, bool))
    cats = probe.concepts.category_names
    assert {cats[i] for i in np.flatnonzero(a.annotated)} == {"color", "object", "texture"}
    assert {cats[i] for i in np.flatnonzero(b.annotated)} == {"color", "object", "part"}


def test_broden_converter_refuses_paths_outside_images(broden_tree, tmp_path, capsys):
    index = (broden_tree / "index.csv").read_text().replace("set/b_part.png", "../../secret.png")
    (broden_tree / "index.csv").write_text(index)
    assert main(["probe", "broden", str(broden_tree), "--out", str(tmp_path / "probe")]) == 2
    assert "outside" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "probe" / "concepts.parquet")


def test_probe_masks_decode_every_encoding():
    from pipeline.dissect.probe import decode_mask, encode_mask

    for ids in (np.array([[0, 3], [255, 7]]), np.array([[0, 300], [65535, 7]])):
        np.testing.assert_array_equal(decode_mask(encode_mask(ids)), ids)
    with pytest.raises(ValueError):
        encode_mask(np.array([[70000]]))
    buffer = io.BytesIO()
    Image.fromarray(_rgb_mask(np.array([[513, 2]]))).save(buffer, format="PNG")
    assert decode_mask(buffer.getvalue()).tolist() == [[513, 2]]


# ----------------------------------------------------------------------------------------------- job files


def test_job_file_dissect_section(tmp_path):
    from pipeline.cluster.config import ConfigError, parse_config, to_toml
    from pipeline.cluster.job import prepare_job

    from pipeline.dissect.probe import encode_mask, write_probe

    write_png(str(tmp_path / "data" / "a" / "0.png"), np.zeros((16, 16, 3), np.uint8))
    probe = write_probe(
        str(tmp_path / "probe"),
        pa.table({"concept": pa.array([1], pa.int32()), "name": ["x"], "category": ["c"]}),
        pa.table(
            {
                "image_key": ["k"],
                "image": [encode_mask(np.zeros((4, 4), int))],
                "mask_height": [4],
                "mask_width": [4],
                "mask_categories": [["c"]],
                "masks": [[encode_mask(np.ones((4, 4), int))]],
                "image_concepts": [[]],
            }
        ),
    )
    base = {
        "job": {"name": "t", "out": str(tmp_path / "run")},
        "model": {"spec": "module:tiny_models:dissect_net", "image_size": 16, "resize": 16},
        "data": {"source": str(tmp_path / "data")},
        "scan": {"layers": "relu1,relu2"},
        "render": {"classes": "none"},
    }
    config = parse_config(base | {"dissect": {"probe": probe, "layers": ["relu2"]}})
    assert config.dissect.layers == ["relu2"] and "[dissect]" in to_toml(config)
    assert parse_config(base).dissect.probe is None  # no section: no dissection
    with pytest.raises(ConfigError, match="dissect.batch_size"):
        parse_config(base | {"dissect": {"probe": "p", "batch_size": 0}})
    with pytest.raises(ConfigError, match="dissect.prob"):
        parse_config(base | {"dissect": {"prob": "p"}})
    with pytest.raises(ConfigError, match="dissect.probe"):
        prepare_job(parse_config(base | {"dissect": {"probe": str(tmp_path / "none")}}))
    with pytest.raises(ConfigError, match="dissect.layers: conv9"):
        prepare_job(parse_config(base | {"dissect": {"probe": probe, "layers": ["conv9"]}}))
