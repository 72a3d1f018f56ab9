"""The report: terminal table, JSON file, and an HTML page whose plots load in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from rapidlm.profile.report import PLOTS, table, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report_dir(tiny_profile, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report(tiny_profile, out)
    return out


def test_files_are_written(report_dir):
    names = {p.name for p in report_dir.iterdir()}
    assert names == {"report.html", "profile.json", *PLOTS}
    for name in PLOTS:
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    data = json.loads((report_dir / "profile.json").read_text())
    assert data["schema"] == "rapidlm.profile/1"
    html = (report_dir / "report.html").read_text()
    for name in PLOTS:
        assert f"src='{name}'" in html  # relative: the folder can be moved or attached as it is


def test_terminal_table(tiny_profile):
    text = table(tiny_profile)
    assert tiny_profile.bottleneck() in text
    for needle in ("decode step (ms)", "plain", "instrumented", "prefill:", "QKV projection", "attention core",
                   "framework / Python", "unattributed", "accounting:", "within the 10% limit"):
        assert needle in text, needle
    layer_rows = [ln for ln in text.splitlines() if ln.split() and ln.split()[0] in ("0", "1")]
    assert len(layer_rows) == 2  # one row per layer of the tiny model


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),  # in CI a missing browser must fail, not skip
    reason="Debian's chromium is not installed (make test installs it)",
)
def test_html_renders_in_headless_chromium_with_every_plot_loaded(report_dir):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    shot = report_dir / "screenshot.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((report_dir / "report.html").as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate(
                "() => [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete,"
                " w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width}))"
            )
            title = page.title()
            bottleneck = page.text_content(".bottleneck")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert sorted(i["src"] for i in images) == sorted(PLOTS)
    for img in images:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0 and img["shown"] > 0, img
    assert title.startswith("rapidlm profile")
    assert "% of each step is framework" in bottleneck
    with Image.open(shot) as im:  # a real page: tall (four plots and tables), not blank
        assert im.height > 2000
        extrema = im.convert("L").getextrema()
        assert extrema[0] < 100 < extrema[1]
