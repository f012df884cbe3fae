"""The live page in real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) while
a real RunEngine streams a scan through a real bluesky 0MQ proxy into the daemon.

Screenshots go to test-artifacts/ (gitignored): web_page.png (whole page) and map.png (one map).
"""
from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from beamlens.daemon.sim.datasets import stxm_map

from helpers import source_yaml, subscribe, wait_run_finished

CHROMIUM = Path("/usr/bin/chromium")
# Headless as root on a closed network (see the machine notes): no sandbox, no GPU, no background
# connections to Google's hosts.
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CONSUMERS = """
consumers:
  - {name: stats, class: stats, params: {units: OD}}
  - {name: pca, class: pca, params: {n_components: 2, batch_size: 16}}
outputs:
  web: {push_interval_s: 0.1}
"""

# Records, inside the page, every progress value and every distinct picture of the stats/total map.
RECORDER = """() => {
  window.__sameDocument = true;
  window.__progress = [];
  window.__mapImages = new Set();
  setInterval(() => {
    const bar = document.getElementById('progress');
    if (bar.hasAttribute('value')) window.__progress.push([bar.value, bar.max]);
    const map = document.querySelector('figure[data-key="stats/total"] canvas.map');
    if (map && map.width) window.__mapImages.add(map.toDataURL());
  }, 40);
}"""


@pytest.fixture
def browser_page() -> Iterator[tuple[object, list[str]]]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the live-page tests need Debian's chromium; "
                    "run `make system-deps` as root (or apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        try:
            yield page, errors
        finally:
            browser.close()


def test_page_follows_a_streamed_run_without_reloading(proxy, beamline, make_daemon, browser_page):
    page, errors = browser_page
    daemon = make_daemon(source_yaml(proxy.out_address) + CONSUMERS)
    subscribe(daemon, proxy)
    page.goto(daemon.http.url + "/")
    page.wait_for_selector("#connection.live", timeout=10_000)
    page.evaluate(RECORDER)

    data = stxm_map().region(slice(60, 76), slice(40, 56))  # 16 x 16 points
    result: list[str] = []
    scan = threading.Thread(target=lambda: result.append(beamline.map_scan(data)))
    scan.start()
    scan.join(120)
    assert result, "scan did not finish"
    uid = result[0]
    wait_run_finished(daemon, uid)
    page.wait_for_function("document.getElementById('progress-text').textContent.includes('256 / 256')", timeout=10_000)
    page.wait_for_function(
        "document.querySelector('figure[data-key=\"stats/total\"] canvas.map').getAttribute('aria-label')"
        ".includes('256 measured')", timeout=10_000)

    # the recorder samples every 40 ms: let it catch the final value too
    page.wait_for_function("window.__progress.length && window.__progress[window.__progress.length - 1][0] === 256",
                           timeout=10_000)
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
    progress = page.evaluate("window.__progress")
    values = [v for v, m in progress if m == 256]
    assert values == sorted(values), "progress went backwards"
    assert any(0 < v < 256 for v in values), f"no intermediate progress seen: {sorted(set(values))}"
    assert values[-1] == 256
    assert page.evaluate("window.__mapImages.size") >= 3, "the map was not redrawn while the run streamed"
    assert uid in page.text_content("#run-title")
    assert page.locator("#runs li").count() == 1
    assert page.locator("figure[data-key='pca/components'] canvas.plot").count() == 1
    assert "connected" in page.text_content("#health")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_page.png"), full_page=True)
    page.locator("figure[data-key='stats/total']").screenshot(path=str(ARTIFACTS / "map.png"))
    assert (ARTIFACTS / "web_page.png").stat().st_size > 10_000
    assert not errors, errors


def test_map_values_by_hover_and_keyboard(proxy, beamline, make_daemon, browser_page):
    page, errors = browser_page
    daemon = make_daemon(source_yaml(proxy.out_address) + CONSUMERS)
    subscribe(daemon, proxy)
    data = stxm_map().region(slice(60, 66), slice(40, 48))  # 6 x 8
    uid = beamline.map_scan(data)
    wait_run_finished(daemon, uid)
    expected = data.spectra.astype(np.float64).sum(axis=-1)

    page.goto(daemon.http.url + "/")
    canvas = page.locator("figure[data-key='stats/total'] canvas.map")
    page.wait_for_function(
        "document.querySelector('figure[data-key=\"stats/total\"] canvas.map')?.getAttribute('aria-label')"
        "?.includes('48 measured')", timeout=10_000)
    label = canvas.get_attribute("aria-label")
    assert "6 by 8 points" in label and "OD" in label

    box = canvas.bounding_box()
    r, c = 4, 6
    page.mouse.move(box["x"] + (c + 0.5) * box["width"] / 8, box["y"] + (r + 0.5) * box["height"] / 6)
    tip = page.text_content("#tooltip")
    assert tip.startswith(f"stats/total[{r}, {c}] = ") and tip.endswith(" OD")
    assert float(re.search(r"= (\S+)", tip).group(1)) == pytest.approx(expected[r, c], rel=1e-3)

    canvas.focus()
    for key in ("ArrowDown", "ArrowRight", "ArrowRight", "ArrowDown"):  # first key puts the cursor at [0, 0]
        page.keyboard.press(key)
    readout = page.text_content("figure[data-key='stats/total'] output.readout")
    assert readout.startswith("stats/total[1, 2] = ")
    assert float(re.search(r"= (\S+)", readout).group(1)) == pytest.approx(expected[1, 2], rel=1e-3)
    assert not errors, errors
