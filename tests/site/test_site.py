"""`atlas site` on a small real run: escaping, path safety, incremental rebuilds, and a real headless browser.

The browser tests drive Debian's chromium/chromedriver (installed by `make test`); without them they fail and
say how to install, rather than skip.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from html.parser import HTMLParser
from urllib.parse import unquote, urlparse

import pytest
from repo_paths import REPO_ROOT
from chromium import console_errors, load_all_images, open_page, page_url, start_chromium, visible_units, wait
from site_net import DEAD_STEM_UNIT
from site_run import (
    CLASS_NAMES,
    MALICIOUS_CATEGORY,
    MALICIOUS_CLASS,
    MALICIOUS_CONCEPT,
    MALICIOUS_FOLDERS,
    MISSING_IMAGE,
    RENDERED_LAYER,
    make_site_run,
    malicious_photo_folder,
)

from pipeline.site import build_site
from pipeline.site.build import script_json
from pipeline.site.paths import UnsafePathError, check_relative_path, layer_slug
from pipeline.store import RunError, connect, read_manifest


@pytest.fixture(scope="module")
def site_run(ray_cluster, photo_folder, tmp_path_factory) -> str:
    photos = malicious_photo_folder(photo_folder, str(tmp_path_factory.mktemp("site-photos")))
    return make_site_run(photos, str(tmp_path_factory.mktemp("site") / "run"))


@pytest.fixture(scope="module")
def site(site_run) -> str:
    """The site in its default place, RUN/site."""
    report = build_site(site_run, progress=False)
    assert report.index == os.path.join(site_run, "site", "index.html") and report.written > 0
    return os.path.join(site_run, "site")


def slug_dir(layer: str) -> str:
    return layer_slug(layer)


def read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        for name in ("href", "src"):
            if attrs.get(name):
                self.refs.append((tag, attrs[name], attrs))


def html_files(site: str) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(site) for n in names if n.endswith(".html"))


def check_links(site: str, allowed_root: str) -> int:
    """Every href/src of every page is relative, resolves to an existing file inside `allowed_root`, and
    every image has alt text. Returns the number of references checked."""
    checked = 0
    for page in html_files(site):
        parser = _Links()
        parser.feed(read(page))
        for tag, ref, attrs in parser.refs:
            if ref.startswith("data:"):
                continue
            assert "://" not in ref and not ref.startswith("/"), (page, ref)
            target = os.path.realpath(os.path.join(os.path.dirname(page), unquote(ref.split("#")[0])))
            assert os.path.isfile(target), (page, ref)
            assert os.path.commonpath([target, os.path.realpath(allowed_root)]) == os.path.realpath(allowed_root)
            if tag == "img":
                assert attrs.get("alt") and attrs.get("loading") == "lazy", (page, ref)
            checked += 1
    return checked


# ------------------------------------------------------------------------------------------ without a browser


def test_pages_for_every_layer_unit_and_class(site_run, site):
    con = connect(site_run)
    units = con.execute("SELECT layer, unit, dead FROM units").fetchall()
    for layer, unit, _ in units:
        assert os.path.isfile(os.path.join(site, "units", slug_dir(layer), f"{unit}.html"))
    for layer in {layer for layer, _, _ in units}:
        assert os.path.isfile(os.path.join(site, "layers", f"{slug_dir(layer)}.html"))
    assert sorted(os.listdir(os.path.join(site, "classes"))) == sorted(f"{i}.html" for i in range(len(CLASS_NAMES)))
    index = read(os.path.join(site, "index.html"))
    manifest = read_manifest(site_run)
    assert manifest["created"] in index and "module:site_net:site_net" in index
    assert "<dd>36</dd>" in index and f"<dd>{manifest['counts']['units']} (1 dead)</dd>" in index
    # A unit without atlas images still has its statistics, top-k keys and a histogram.
    unrendered = read(os.path.join(site, "units", slug_dir("relu"), "0.html"))
    top = con.execute("SELECT image_key FROM topk WHERE layer = 'relu' AND unit = 0 ORDER BY rank").fetchall()
    assert "<img" not in unrendered.split("<main>")[1] and "<svg" in unrendered
    from markupsafe import escape

    assert all(str(escape(key)) in unrendered for (key,) in top)
    # A rendered unit shows the feature visualization, crops, reconstructions and overlays.
    rendered = read(os.path.join(site, "units", slug_dir(RENDERED_LAYER), "0.html"))
    for kind in ("featvis_000", "crop_000", "deconv_crop_000", "guided_crop_000", "overlay_000", "crop_003"):
        assert f"unit=0/{kind}.png" in rendered
    # This net has no max-pooling: its deconvnet reconstructions were measured to be the same for every
    # image, so guided backprop (image-dependent) comes first and the deconvnet last, labelled as such.
    views = rendered.split('<div class="views">')[1].split("</div>")[0]
    assert views.index("guided_crop_000") < views.index("overlay_000") < views.index("deconv_crop_000")
    assert "same for every image</b>: this network has no max-pooling switches" in rendered
    assert "read_parquet(" in rendered and "unit = 0" in rendered
    partial = read(os.path.join(site, "units", slug_dir(RENDERED_LAYER), "1.html"))
    assert MISSING_IMAGE not in partial and MISSING_IMAGE.replace("overlay", "crop") in partial
    # Class pages show the class visualization and the explanations of the top-scoring images.
    class_page = read(os.path.join(site, "classes", "2.html"))
    assert "classvis_000.png" in class_page and "explain/gradcam/2/" in class_page and "rocket" in class_page
    # ... with their measured quality (explain/metrics.parquet) and the randomization check's flag.
    assert "deletion AUC 0.123" in class_page and "insertion AUC 0.789" in class_page
    assert "rank correlation 0.91" in class_page and "does not explain what the model learned" in class_page
    assert "deletion AUC" not in read(os.path.join(site, "classes", "3.html"))


def test_links_are_relative_and_resolve(site_run, site):
    assert check_links(site, site_run) > 100


def test_data_text_is_escaped(site_run, site):
    pages = [read(p) for p in html_files(site)]
    text = "\n".join(pages) + read(os.path.join(site, "search-index.js"))
    for payload in [*MALICIOUS_FOLDERS.values(), MALICIOUS_CLASS]:
        assert payload not in text  # never raw ...
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    html = "\n".join(pages)  # the only 'onerror=' left is inside the escaped label text
    assert "onerror=" not in re.sub(r"&lt;img src=x onerror=alert\(1\)&gt;", "", html)
    scripts = {m for page in pages for m in re.findall(r"<script[^>]*>", page)}
    assert all(re.fullmatch(r'<script src="(\.\./)*static/site\.js">', s) for s in scripts), scripts
    # The search index is JSON in a script: no '<' survives, but the label is still there, escaped.
    assert "\\u003cimg src=x onerror=alert(1)\\u003e" in read(os.path.join(site, "search-index.js"))
    assert script_json(["</script><b>&"]) == '["\\u003c/script\\u003e\\u003cb\\u003e\\u0026"]'


def test_label_chips_from_atlas_dissect(site_run, site):
    con = connect(site_run)
    labelled = con.execute(
        "SELECT layer, unit, concept, category, iou FROM labels WHERE concept IS NOT NULL ORDER BY layer, unit"
    ).fetchall()
    counts = dict(con.execute("SELECT layer, count(*) FROM labels WHERE concept IS NOT NULL GROUP BY layer").fetchall())
    con.close()
    assert any(concept == MALICIOUS_CONCEPT for _, _, concept, _, _ in labelled)  # the bright square is detected
    from markupsafe import escape

    escaped_category = str(escape(MALICIOUS_CATEGORY))
    pages = [read(p) for p in html_files(site)]
    assert not any(MALICIOUS_CATEGORY in page or "<svg onload" in page for page in pages)
    for layer, unit, concept, category, iou in labelled:
        page = read(os.path.join(site, "units", slug_dir(layer), f"{unit}.html"))
        chips = re.search(r'<p class="chips" id="unit-labels">(.*?)</p>', page, re.S).group(1)
        name = str(escape(concept))
        assert f'<span class="chip">{name}</span>' in chips and f"IoU {iou:.3f}" in chips
        if category == MALICIOUS_CATEGORY:
            assert escaped_category in chips
    for layer, n in counts.items():  # layer pages: a chip per labelled unit and the count per category
        page = read(os.path.join(site, "layers", f"{slug_dir(layer)}.html"))
        assert page.count('<span class="chip"') == n and "Units labelled by network dissection" in page
    index = read(os.path.join(site, "index.html"))
    assert index.count('class="bars concept-bars"') == len(counts)


def test_untrusted_paths_and_layer_names_are_contained(site_run, site, caplog):
    for bad in ("../x", "/etc/passwd", "a/../../b", "a\\b", "", "a//b", "./a", "C:/x", None):
        with pytest.raises(UnsafePathError):
            check_relative_path(bad)
    assert check_relative_path("atlas/layer=a.b/unit=3/crop_000.png")
    for name in ("../../x", "a/b", "..", ".", "/etc", "x" * 300, "<b>"):
        slug = layer_slug(name)
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", slug) and slug not in (".", "..") and len(slug) < 70
        assert os.path.dirname(os.path.normpath(os.path.join("units", slug, "0.html"))) == os.path.join("units", slug)
    assert layer_slug("a/b") != layer_slug("a_b")
    # The fixture's atlas index lists /etc/passwd and '..' paths for stem unit 0: none is linked or copied.
    stem0 = read(os.path.join(site, "units", slug_dir("stem"), "0.html"))
    assert "passwd" not in stem0 and "outside" not in stem0
    with caplog.at_level("WARNING"):
        out = os.path.join(tempfile.mkdtemp(), "copy")
        report = build_site(site_run, out=out, progress=False)
    assert "4 unsafe" in caplog.text
    copied = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names]
    assert not any("passwd" in p or "outside" in p for p in copied)
    # Outside the run, the images are brought into the site: it is self-contained.
    assert check_links(out, out) > 100 and report.index.startswith(out)
    assert os.path.isfile(os.path.join(out, "files", "atlas", f"layer={RENDERED_LAYER}", "unit=0", "crop_000.png"))


def test_rebuild_rewrites_only_what_changed(site_run, tmp_path):
    out = str(tmp_path / "site")
    first = build_site(site_run, out=out, progress=False)
    files = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names]
    stamps = {p: os.stat(p).st_mtime_ns for p in files}
    time.sleep(0.01)
    again = build_site(site_run, out=out, progress=False)
    assert again.written == 0 and again.unchanged == first.written + first.unchanged
    assert {p: os.stat(p).st_mtime_ns for p in files} == stamps
    # Rename one class: only the pages that show class names change; no unit page is touched.
    manifest = os.path.join(site_run, "manifest.json")
    original = read(manifest)
    try:
        with open(manifest, "w") as handle:
            handle.write(original.replace('"rocket"', '"rocket ship"'))
        changed = build_site(site_run, out=out, progress=False)
    finally:
        with open(manifest, "w") as handle:
            handle.write(original)
    rewritten = {os.path.relpath(p, out) for p in files if os.stat(p).st_mtime_ns != stamps[p]}
    assert rewritten == {"index.html", "search-index.js", "classes/1.html", "classes/2.html", "classes/3.html"}
    assert changed.written == len(rewritten) and changed.removed == 0
    # A file the site no longer produces goes; files it never wrote stay.
    stale = os.path.join(out, "units", slug_dir("stem"), "999.html")
    mine = os.path.join(out, "notes.txt")
    for path in (stale, mine):
        with open(path, "w") as handle:
            handle.write("x")
    marker = os.path.join(out, ".atlas-site.json")
    with open(marker) as handle:
        listing = handle.read()
    with open(marker, "w") as handle:
        handle.write(listing.replace('"index.html"', f'"index.html", "units/{slug_dir("stem")}/999.html"'))
    assert build_site(site_run, out=out, progress=False).removed == 1
    assert not os.path.exists(stale) and os.path.exists(mine)


def test_a_run_without_atlas_or_explanations(site_run, tmp_path):
    """Straight after `atlas scan`: every page still exists, without images or class pages."""
    bare = str(tmp_path / "bare")
    shutil.copytree(site_run, bare, ignore=shutil.ignore_patterns("atlas", "explain", "site"))
    report = build_site(bare, progress=False)
    site = os.path.dirname(report.index)
    units = connect(bare).execute("SELECT count(*) FROM units").fetchone()[0]
    assert len(html_files(site)) == 1 + 3 + units and not os.path.exists(os.path.join(site, "classes"))
    assert not any("<img" in read(page) for page in html_files(site))
    assert check_links(site, bare) > 0
    assert "(1 dead)" in read(report.index) and "no image" in read(report.index)


def test_dead_units_are_greyed_and_labelled(site):
    layer_page = read(os.path.join(site, "layers", f"{slug_dir('stem')}.html"))
    cards = re.findall(r'<li class="card( dead)?" data-unit="(\d+)".*?</li>', layer_page, flags=re.DOTALL)
    assert len(cards) == 8
    assert {int(unit) for dead, unit in cards if dead} == {DEAD_STEM_UNIT}
    dead_card = re.search(rf'<li class="card dead" data-unit="{DEAD_STEM_UNIT}".*?</li>', layer_page, re.DOTALL).group(
        0
    )
    assert "dead" in re.sub(r"<[^>]+>", "", dead_card)
    assert 'badge">dead<' in read(os.path.join(site, "units", slug_dir("stem"), f"{DEAD_STEM_UNIT}.html"))


def test_bad_input_gives_clear_errors(site_run, tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(RunError, match="no manifest.json"):
        build_site(str(tmp_path / "not-a-run"), progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("keep")
    assert main(["site", site_run, "--out", str(tmp_path / "busy"), "-q"]) == 2
    assert "not made by `atlas site`" in capsys.readouterr().err
    assert main(["site", site_run, "--out", str(tmp_path / "cli"), "-q"]) == 0
    assert capsys.readouterr().out.strip().endswith(os.path.join(str(tmp_path / "cli"), "index.html"))


# ------------------------------------------------------------------------------------------ in a real browser


def artifacts_dir() -> str:
    path = os.environ.get("ATLAS_TEST_ARTIFACTS") or os.path.join(REPO_ROOT, "artifacts", "site-tests")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start_chromium(str(tmp_path_factory.mktemp("chrome-profile")))
    try:
        yield driver
    finally:
        driver.quit()


def test_crawl_every_page_from_the_index(browser, site):
    site_real = os.path.realpath(site)
    todo, seen, unit_pages = [os.path.join(site_real, "index.html")], set(), 0
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        open_page(browser, page_url(path))
        images = load_all_images(browser)
        if "/units/" in path:
            unit_pages += 1
        assert all(image["width"] > 0 for image in images), (path, [i for i in images if not i["width"]])
        resources = browser.execute_script(
            "return performance.getEntriesByType('resource').map(function (e) { return e.name; })"
        )
        for url in resources + [i["src"] for i in images]:
            assert url.startswith("file://") and os.path.isfile(unquote(urlparse(url).path)), (path, url)
        assert console_errors(browser) == [], path
        assert browser.execute_script("return window.__alerts") == [], path
        links = browser.execute_script(
            "return Array.prototype.map.call(document.querySelectorAll('a[href]'), function (a) { return a.href; })"
        )
        for link in links:
            parsed = urlparse(link)
            assert parsed.scheme == "file", (path, link)
            target = os.path.realpath(unquote(parsed.path))
            assert os.path.isfile(target), (path, link)
            if target.endswith(".html") and target.startswith(site_real + os.sep):
                todo.append(target)
    expected_pages = len(html_files(site))
    assert len(seen) == expected_pages and unit_pages > 20


def test_keyboard_moves_between_units(browser, site):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_page(browser, page_url(os.path.join(site, "units", slug_dir(RENDERED_LAYER), "1.html")))
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    wait(lambda: browser.current_url.endswith(f"/units/{slug_dir(RENDERED_LAYER)}/2.html"))
    assert "unit 2" in browser.find_element("css selector", "h1").text
    ActionChains(browser).send_keys(Keys.ARROW_LEFT).perform()
    ActionChains(browser).send_keys(Keys.ARROW_LEFT).perform()
    wait(lambda: browser.current_url.endswith(f"/units/{slug_dir(RENDERED_LAYER)}/0.html"))
    ActionChains(browser).send_keys(Keys.ARROW_LEFT).perform()  # across the layer boundary, to relu's last unit
    wait(lambda: browser.current_url.endswith(f"/units/{slug_dir('relu')}/7.html"))
    assert console_errors(browser) == []


def test_search_finds_a_unit(browser, site):
    open_page(browser, page_url(os.path.join(site, "index.html")))
    box = browser.find_element("id", "search")
    box.send_keys(f"{RENDERED_LAYER} 3")
    wait(lambda: browser.find_elements("css selector", "#search-results a"))
    first = browser.find_elements("css selector", "#search-results a")[0]
    assert first.text.startswith(f"{RENDERED_LAYER} #3")
    first.click()
    wait(lambda: browser.current_url.endswith(f"/units/{slug_dir(RENDERED_LAYER)}/3.html"))
    # By label: the units whose top labels include a payload label are found, shown as text.
    box = browser.find_element("id", "search")
    box.send_keys("onerror")
    wait(lambda: browser.find_elements("css selector", "#search-results a"))
    texts = [a.text for a in browser.find_elements("css selector", "#search-results a")]
    assert texts and all(MALICIOUS_FOLDERS["chelsea"] in t for t in texts)
    assert browser.execute_script("return window.__alerts") == [] and console_errors(browser) == []


def test_malicious_labels_show_as_text(browser, site_run, site):
    payload = MALICIOUS_FOLDERS["chelsea"]
    layer, unit = (
        connect(site_run)
        .execute("SELECT layer, unit FROM topk WHERE label = ? ORDER BY layer, unit LIMIT 1", [payload])
        .fetchone()
    )
    open_page(browser, page_url(os.path.join(site, "units", slug_dir(layer), f"{unit}.html")))
    labels = [e.text for e in browser.find_elements("css selector", ".label")]
    assert payload in labels
    assert browser.execute_script("return document.querySelectorAll('[onerror], img[src=\"x\"]').length") == 0
    assert browser.execute_script("return window.__alerts") == []
    open_page(browser, page_url(os.path.join(site, "classes", "0.html")))
    assert browser.find_element("css selector", "h1 .label").text == MALICIOUS_CLASS
    assert browser.execute_script("return document.scripts.length") == 1  # site.js only: nothing injected
    assert browser.execute_script("return window.__alerts") == [] and console_errors(browser) == []


def test_layer_grid_sorts_filters_and_greys_dead_units(browser, site):
    from selenium.webdriver.support.ui import Select

    open_page(browser, page_url(os.path.join(site, "layers", f"{slug_dir('stem')}.html")))

    assert visible_units(browser) == list(range(8))
    Select(browser.find_element("id", "sort")).select_by_value("top")
    assert browser.find_element("id", "descending").is_selected()  # highest first by default
    tops = [
        float(c.get_attribute("data-top"))
        for c in browser.find_elements("css selector", "#grid li")
        if c.is_displayed()
    ]
    assert tops == sorted(tops, reverse=True) and len(tops) == 8 and tops[0] > tops[-1]
    browser.find_element("id", "descending").click()
    ascending = [
        float(c.get_attribute("data-top"))
        for c in browser.find_elements("css selector", "#grid li")
        if c.is_displayed()
    ]
    assert ascending == sorted(tops)
    dead = browser.find_element("css selector", f'#grid li[data-unit="{DEAD_STEM_UNIT}"] .thumb')
    assert "grayscale" in dead.value_of_css_property("filter")
    browser.find_element("id", "hide-dead").click()
    assert DEAD_STEM_UNIT not in visible_units(browser) and len(visible_units(browser)) == 7
    browser.find_element("id", "filter").send_keys("3")
    assert visible_units(browser) == [3]


def test_layer_grid_filters_by_concept_category(browser, site_run, site):
    con = connect(site_run)
    (layer,) = con.execute(
        "SELECT layer FROM labels WHERE category = ? GROUP BY layer ORDER BY count(*) DESC LIMIT 1",
        [MALICIOUS_CATEGORY],
    ).fetchone()
    expected = [
        u
        for (u,) in con.execute(
            "SELECT unit FROM labels WHERE layer = ? AND category = ? ORDER BY unit", [layer, MALICIOUS_CATEGORY]
        ).fetchall()
    ]
    con.close()
    open_page(browser, page_url(os.path.join(site, "layers", f"{slug_dir(layer)}.html")))
    browser.find_element("id", "filter").send_keys(MALICIOUS_CATEGORY)
    shown = [
        int(c.get_attribute("data-unit")) for c in browser.find_elements("css selector", "#grid li") if c.is_displayed()
    ]
    assert shown == expected and expected
    chips = [c.text for c in browser.find_elements("css selector", "#grid li .chip") if c.is_displayed()]
    assert set(chips) == {MALICIOUS_CONCEPT}  # shown as text
    assert browser.execute_script("return document.querySelectorAll('svg[onload], [onerror]').length") == 0
    assert browser.execute_script("return window.__alerts") == [] and console_errors(browser) == []


def test_screenshots_and_phone_width(browser, site):
    artifacts = artifacts_dir()
    open_page(browser, page_url(os.path.join(site, "index.html")))
    browser.save_screenshot(os.path.join(artifacts, "index.png"))
    unit_page = page_url(os.path.join(site, "units", slug_dir(RENDERED_LAYER), "0.html"))
    open_page(browser, unit_page)
    load_all_images(browser)
    browser.save_screenshot(os.path.join(artifacts, "unit.png"))
    browser.set_window_size(390, 844)
    try:
        open_page(browser, unit_page)
        load_all_images(browser)
        browser.save_screenshot(os.path.join(artifacts, "unit-phone.png"))
        # Readable on a phone: nothing wider than the screen forces sideways scrolling.
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    finally:
        browser.set_window_size(1280, 1000)
    print(f"\nsite test screenshots: {artifacts}")
    for name in ("index.png", "unit.png", "unit-phone.png"):
        assert os.path.getsize(os.path.join(artifacts, name)) > 10_000
