"""A picture for every unit (issue 15): a small real run rendered the default way (`atlas render RUN`, then the
costly kinds for a few units) shows a loaded image for every live unit on the index and every layer page, with
the index's per-layer charts; no console errors. The charts' numbers are checked against numpy."""

from __future__ import annotations

import os
import re
from html import unescape

import numpy as np
import pytest
from chromium import console_errors, load_all_images, open_page, page_url, start_chromium
from site_net import DEAD_STEM_UNIT
from site_run import SITE_NET

from pipeline.cli import main
from pipeline.scan.runner import ScanConfig, run_scan
from pipeline.site import build_site
from pipeline.site.paths import layer_slug
from pipeline.site.svg import distribution_svg, fraction_svg
from pipeline.store import connect

LAYERS = "stem,relu,down,head.2"


@pytest.fixture(scope="module")
def pictures_site(ray_cluster, photo_folder, tmp_path_factory) -> str:
    run = str(tmp_path_factory.mktemp("pictures") / "run")
    run_scan(
        ScanConfig(model=SITE_NET, data=photo_folder, out=run, layers=LAYERS, k=4, progress=False, executor="local")
    )
    assert main(["render", run, "--executor", "local", "-q"]) == 0  # the default: pictures of every unit
    assert (
        main(
            [
                "render",
                run,
                "--layers",
                "down",
                "--units",
                "0-3",
                "--no-views",
                "--steps",
                "8",
                "--size",
                "32",
                "--executor",
                "local",
                "-q",
            ]
        )
        == 0
    )
    build_site(run, progress=False)
    return run


@pytest.mark.browser
def test_every_unit_thumbnail_loads_on_the_index_and_layer_pages(pictures_site, tmp_path):
    run, site = pictures_site, os.path.join(pictures_site, "site")
    counts = (
        connect(run)
        .execute(
            "SELECT layer, count(*) FILTER (WHERE NOT dead), count(*) FILTER (WHERE dead) FROM units GROUP BY layer"
        )
        .fetchall()
    )
    live, dead = {c[0]: c[1] for c in counts}, {c[0]: c[2] for c in counts}
    assert dead["stem"] == 1
    driver = start_chromium(str(tmp_path / "profile"))
    try:
        pages = ["index.html"] + [f"layers/{layer_slug(layer)}.html" for layer in LAYERS.split(",")]
        for page in pages:
            open_page(driver, page_url(os.path.join(site, page)))
            driver.execute_script(
                "document.querySelectorAll('#grid li').forEach(function (li) { li.hidden = false; });"
            )
            images = load_all_images(driver)
            thumbs = driver.execute_script(
                "return Array.prototype.map.call(document.querySelectorAll('img.thumb'), function (i) {"
                " return {alt: i.alt, width: i.naturalWidth}; })"
            )
            assert thumbs and all(t["width"] > 0 for t in thumbs), (page, [t for t in thumbs if not t["width"]])
            assert all(i["width"] > 0 for i in images), page
            placeholders = driver.execute_script(
                "return Array.prototype.map.call(document.querySelectorAll('.placeholder'), function (p) {"
                " return p.textContent.trim(); })"
            )
            if page.startswith("layers/"):
                layer = LAYERS.split(",")[pages.index(page) - 1]
                assert len(thumbs) == live[layer], page  # every live unit has its picture
                assert placeholders == ["dead"] * dead[layer], page  # a dead unit says so, no "no image" anywhere
            else:
                assert placeholders == [], page
            assert console_errors(driver) == [], page
        # The rendered units show their feature visualization; the others their top-1 crop.
        open_page(driver, page_url(os.path.join(site, f"layers/{layer_slug('down')}.html")))
        alts = driver.execute_script(
            "return Array.prototype.map.call(document.querySelectorAll('img.thumb'), function (i) { return i.alt; })"
        )
        assert sum(alt.startswith("Feature visualization") for alt in alts) == 4
        assert sum(alt.startswith("Top image crop") for alt in alts) == live["down"] - 4
    finally:
        driver.quit()


def test_the_index_charts_each_layer(pictures_site):
    """Dead units, the distribution of unit maxima and (after the render) visualizations above their top-1."""
    run = pictures_site
    with open(os.path.join(run, "site", "index.html"), encoding="utf-8") as handle:
        html = handle.read()
    con = connect(run)
    for layer in LAYERS.split(","):
        dead, units = con.execute(
            "SELECT count(*) FILTER (WHERE dead), count(*) FROM units WHERE layer = ?", [layer]
        ).fetchone()
        assert f"{dead} of {units} units dead" in html
    assert con.execute("SELECT unit FROM units WHERE layer = 'stem' AND dead").fetchall() == [(DEAD_STEM_UNIT,)]
    atlas = con.execute(
        "SELECT count(*) FILTER (WHERE featvis_act > top1_act), count(*) FROM atlas WHERE kind = 'featvis'"
    ).fetchone()
    assert f"{atlas[0]} of {atlas[1]} visualizations above their top-1 image" in html and atlas[1] == 4
    assert html.count("<figcaption>feature visualizations above") == 1  # only the rendered layer


def test_charts_count_like_numpy_and_escape_their_text():
    values = [0.0, 0.1, 0.1, 0.5, 0.9, 1.0, 2.5, 3.0, float("nan")]
    svg = str(distribution_svg(values, "<script>alert(1)</script>", "units", bins=6))
    expected, edges = np.histogram([v for v in values if v == v], bins=6)
    bars = [int(n) for n in re.findall(r": (\d+) units</title></rect>", svg)]
    assert bars == [int(n) for n in expected if n]
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    bar = str(fraction_svg(3, 12, 'layer "<b>"', "units dead"))
    assert "3 of 12 units dead (25%)" in bar and "<b>" not in bar and unescape(bar).count('"<b>"') == 2
    assert re.search(r'class="fill" x="1" y="2" width="44.5"', bar)  # (180 - 2) * 3 / 12
