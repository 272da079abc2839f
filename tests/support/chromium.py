"""Headless chromium for the browser tests (marker `browser`): Debian's chromium and chromedriver, driven by
selenium, which is given the driver's path so it never tries to download a browser (these machines are offline)."""

from __future__ import annotations

import shutil
import time

import pytest

CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
INSTALL_HINT = (
    "the browser tests need Debian's chromium and chromedriver: `make test` installs them, or run "
    "`sudo apt-get install -y chromium chromium-driver`"
)


def start_chromium(profile_dir: str):
    """A headless chromium (selenium driver) that records console messages and every alert/confirm/prompt in
    window.__alerts instead of opening it; fails the test, saying how to install, when chromium is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail(f"chromium or chromedriver not found on PATH; {INSTALL_HINT}", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile_dir}", "--window-size=1280,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit chromedriver: selenium must not try to download one (these machines are offline).
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    # Record any alert/confirm/prompt instead of opening it: an XSS that fires leaves a trace to assert on.
    driver.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": """
        window.__alerts = [];
        ['alert', 'confirm', 'prompt'].forEach(function (name) {
          window[name] = function (message) { window.__alerts.push(name + ':' + message); };
        });"""
        },
    )
    return driver


def page_url(path: str) -> str:
    return "file://" + path


def open_page(browser, url: str) -> None:
    browser.get(url)
    wait(lambda: browser.execute_script("return document.readyState") == "complete")


def wait(condition, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while not condition():
        if time.time() > end:
            raise AssertionError("timed out waiting for the page")
        time.sleep(0.05)


def console_errors(browser) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]


def load_all_images(browser) -> list[dict]:
    """Make lazy images load now, wait for them, and return [{src, width}] of every image."""
    browser.execute_script("document.querySelectorAll('img').forEach(function (i) { i.loading = 'eager'; });")
    wait(
        lambda: browser.execute_script(
            "return Array.prototype.every.call(document.images, function (i) { return i.complete; })"
        )
    )
    return browser.execute_script(
        "return Array.prototype.map.call(document.images, function (i) { return {src: i.src, width: i.naturalWidth}; })"
    )


def visible_units(browser) -> list[int]:
    """The unit ids of a layer page's grid cards now shown (after sorting or filtering), in page order."""
    return [
        int(card.get_attribute("data-unit"))
        for card in browser.find_elements("css selector", "#grid li")
        if card.is_displayed()
    ]
