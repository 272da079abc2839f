"""The scored site in a real headless browser (marker `browser`, issue 27): on a small scored MobileNetV2 run
(this process only: scan and score with the local executor, no Ray), sorting a layer page by score orders the
units as the `scores` view does, and every score a unit page or a layer card shows is the view's. And the
demo's table of the most and least interpretable units against a selection written out in Python."""

from __future__ import annotations

import os

import pytest
from chromium import console_errors, open_page, page_url, start_chromium, visible_units

from pipeline.demo_data import mobilenet_v2_weights
from pipeline.models import ModelConfig
from pipeline.scan.runner import ScanConfig, run_scan
from pipeline.score.runner import ScoreConfig, score_run
from pipeline.site import build_site
from pipeline.site.build import unit_href
from pipeline.site.paths import layer_slug
from pipeline.store import connect

LAYER = "features.2"  # 24 units: enough for an order to mean something, cheap to crop
REFS, TASKS = 3, 4


@pytest.fixture(scope="module")
def scored_site(photo_folder, tmp_path_factory) -> tuple[str, str]:
    run = str(tmp_path_factory.mktemp("scored") / "run")
    run_scan(
        ScanConfig(
            model=ModelConfig(spec="torchvision:mobilenet_v2", weights=mobilenet_v2_weights(), image_size=96),
            data=photo_folder,
            out=run,
            layers=LAYER,
            k=REFS + TASKS,
            bottom_k=REFS + TASKS,
            progress=False,
            executor="local",
        )
    )
    score_run(ScoreConfig(run=run, references=REFS, tasks=TASKS, image_size=64, executor="local", progress=False))
    site = str(tmp_path_factory.mktemp("scored-site") / "site")
    build_site(run, site, progress=False)
    return run, site


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start_chromium(str(tmp_path_factory.mktemp("chrome-profile")))
    yield driver
    driver.quit()


def view(run: str) -> dict[tuple[int, str], float | None]:
    return {
        (unit, kind): mis
        for unit, kind, mis in connect(run)
        .execute("SELECT unit, kind, mis FROM scores WHERE layer = ?", [LAYER])
        .fetchall()
    }


@pytest.mark.browser
def test_sorting_a_layer_by_score_orders_units_as_the_scores_view(browser, scored_site):
    from selenium.webdriver.support.ui import Select

    run, site = scored_site
    scores = view(run)
    units = sorted({unit for unit, _ in scores})
    assert len(units) == 24 and any(mis is not None for mis in scores.values())
    open_page(browser, page_url(os.path.join(site, "layers", f"{layer_slug(LAYER)}.html")))

    assert visible_units(browser) == units  # unit id order before any click
    for kind in ("crop", "whole"):
        # Unscored (dead) units sort as -1: after every score; ties by unit id.
        order = {unit: -1.0 if scores[(unit, kind)] is None else scores[(unit, kind)] for unit in units}
        Select(browser.find_element("id", "sort")).select_by_value(f"mis-{kind}")
        assert browser.find_element("id", "descending").is_selected()
        assert visible_units(browser) == sorted(units, key=lambda u: (-order[u], u)), kind
        browser.find_element("id", "descending").click()
        assert visible_units(browser) == sorted(units, key=lambda u: (order[u], u)), kind
    assert console_errors(browser) == [] and browser.execute_script("return window.__alerts") == []


@pytest.mark.browser
def test_every_score_shown_is_the_scores_view(browser, scored_site):
    run, site = scored_site
    scores = view(run)
    open_page(browser, page_url(os.path.join(site, "layers", f"{layer_slug(LAYER)}.html")))
    cards = {
        int(card.get_attribute("data-unit")): card.find_element("css selector", ".mis").text
        for card in browser.find_elements("css selector", "#grid li")
        if card.find_elements("css selector", ".mis")
    }
    assert cards == {
        unit: f"MIS {mis:.3f}" for (unit, kind), mis in scores.items() if kind == "crop" and mis is not None
    }
    for unit in sorted({unit for unit, _ in scores}):
        open_page(browser, page_url(os.path.join(site, unit_href(LAYER, unit))))
        rows = {
            row.get_attribute("data-kind"): row.find_element("css selector", "td.mis").text
            for row in browser.find_elements("css selector", "#unit-scores tbody tr")
        }
        expected = {kind: f"{mis:.3f}" if mis is not None else "dead" for (u, kind), mis in scores.items() if u == unit}
        assert rows == expected, unit
    assert console_errors(browser) == [] and browser.execute_script("return window.__alerts") == []


def test_the_demos_most_and_least_interpretable_units(scored_site):
    from pipeline.demo import score_query
    from pipeline.query import run_query

    run, _ = scored_site
    con = connect(run)
    best_photo = dict(con.execute("SELECT unit, label FROM topk WHERE layer = ? AND rank = 0", [LAYER]).fetchall())
    for kind in ("crop", "whole"):
        scored = [(unit, mis) for (unit, k), mis in view(run).items() if k == kind and mis is not None]
        most = sorted(scored, key=lambda s: (-s[1], s[0]))[:3]
        least = sorted(scored, key=lambda s: (s[1], s[0]))[:3]
        expected = [("most", u, m) for u, m in most] + [
            ("least", u, m) for u, m in sorted(least, key=lambda s: (-s[1], s[0]))
        ]
        columns, rows = run_query(run, score_query(kind, 3))
        assert columns == ["layer", "interpretable", "unit", "mis", "accuracy", "best_photo"]
        assert [(r[1], r[2]) for r in rows] == [(e[0], e[1]) for e in expected], kind
        for row, (_, unit, mis) in zip(rows, expected):
            assert row[0] == LAYER and row[3] == pytest.approx(round(mis, 3)) and row[5] == best_photo[unit]


def test_a_run_scored_on_whole_images_only_offers_that_sort_and_shows_it(scored_site, tmp_path):
    """As `atlas demo` scores: no crop sort that would order every unit as unscored, whole scores on the cards.
    Last in this file: it re-scores the module's run."""
    import re

    run, _ = scored_site
    score_run(
        ScoreConfig(
            run=run, references=REFS, tasks=TASKS, image_size=64, kinds=("whole",), executor="local", progress=False
        )
    )
    scores = view(run)
    assert {kind for _, kind in scores} == {"whole"}
    build_site(run, str(tmp_path / "site"), progress=False)
    with open(tmp_path / "site" / "layers" / f"{layer_slug(LAYER)}.html", encoding="utf-8") as handle:
        page = handle.read()
    assert re.findall(r'<option value="(mis-[a-z]+)"', page) == ["mis-whole"]
    cards = dict(re.findall(r'data-unit="(\d+)".*?<span class="mis"[^>]*>MIS ([0-9.]+)</span>', page, re.S))
    assert cards == {str(unit): f"{mis:.3f}" for (unit, _), mis in scores.items() if mis is not None}
