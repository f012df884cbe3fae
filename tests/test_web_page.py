"""The live page in real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) while
a real RunEngine streams a scan through a real bluesky 0MQ proxy into the daemon.

Screenshots go to test-artifacts/ (gitignored): web_page.png (whole page) and map.png (one map).
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from beamlens.daemon.sim.datasets import stxm_map

from helpers import http_get, source_yaml, subscribe, wait_run_finished

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


UI_MS = 120_000
"""Bound on every wait for the page (ms): the page is waited on for what it shows, never for a time,
and this only stops a hung page; on a loaded machine Chromium and the daemon share the cores with
everything else, and a click's cards have taken over 10 s to appear."""


def wait_js(page, expression: str, timeout: float = UI_MS) -> None:
    """Wait until a JavaScript expression is truthy. (As a function, which Playwright compiles over
    the DevTools protocol: the page's Content-Security-Policy forbids eval, and stays on in tests.)"""
    page.wait_for_function(f"() => ({expression})", timeout=timeout)


def pixel_centre(canvas, r: int, c: int, rows: int, cols: int) -> dict[str, float]:
    """Position of map point [r, c] in the map canvas (CSS px from its top-left corner), drawn y
    up (row 0 at the bottom for a rising slow axis), for ``canvas.click(position=...)`` and
    ``canvas.hover(position=...)``: Playwright then scrolls the canvas into view, waits until its
    box is stable and checks that it receives the pointer, so a page still laying out (or
    scrolled away by an earlier screenshot) cannot take the click elsewhere."""
    g = json.loads(canvas.get_attribute("data-geometry"))
    scale = canvas.bounding_box()["width"] / g["W"]
    dc = cols - 1 - c if g["flipX"] else c
    dr = r if g["flipY"] else rows - 1 - r
    return {"x": (g["L"] + (dc + 0.5) * g["s"]) * scale, "y": (g["T"] + (dr + 0.5) * g["s"]) * scale}


@pytest.fixture
def browser_page() -> Iterator[tuple[object, list[str]]]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the live-page tests need Debian's chromium; "
                    "run `make system-deps` as root (or apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(UI_MS)  # clicks, navigation and selects too, not only the waits below
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
    page.wait_for_selector("#connection.live", timeout=UI_MS)
    page.evaluate(RECORDER)

    data = stxm_map().region(slice(60, 76), slice(40, 56))  # 16 x 16 points
    result: list[str] = []
    scan = threading.Thread(target=lambda: result.append(beamline.map_scan(data)))
    scan.start()
    scan.join(120)
    assert result, "scan did not finish"
    uid = result[0]
    wait_run_finished(daemon, uid)
    wait_js(page, "document.getElementById('progress-text').textContent.includes('256 / 256')", timeout=UI_MS)
    wait_js(page, 
        "document.querySelector('figure[data-key=\"stats/total\"] canvas.map').getAttribute('aria-label')"
        ".includes('256 measured')", timeout=UI_MS)

    # the recorder samples every 40 ms: let it catch the final value too
    wait_js(page, "window.__progress.length && window.__progress[window.__progress.length - 1][0] === 256",
                           timeout=UI_MS)
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
    wait_js(page, 
        "document.querySelector('figure[data-key=\"stats/total\"] canvas.map')?.getAttribute('aria-label')"
        "?.includes('48 measured')", timeout=UI_MS)
    label = canvas.get_attribute("aria-label")
    assert "6 by 8 points" in label and "OD" in label

    r, c = 4, 6
    canvas.hover(position=pixel_centre(canvas, r, c, rows=6, cols=8))
    tip = page.text_content("#tooltip")
    assert tip.startswith(f"stats/total[{r}, {c}] = ") and " OD" in tip
    assert float(re.search(r"= (\S+)", tip).group(1)) == pytest.approx(expected[r, c], rel=1e-3)
    assert "sample_x = " in tip and "sample_y = " in tip  # motor positions of the point

    canvas.focus()
    for key in ("ArrowUp", "ArrowRight", "ArrowRight", "ArrowUp"):  # first key puts the cursor at [0, 0]
        page.keyboard.press(key)
    readout = page.text_content("figure[data-key='stats/total'] output.readout")
    assert readout.startswith("stats/total[1, 2] = ")
    assert float(re.search(r"= (\S+)", readout).group(1)) == pytest.approx(expected[1, 2], rel=1e-3)
    assert not errors, errors


def test_scientist_steers_from_the_page(proxy, beamline, make_daemon, browser_page):
    """Motor axes y up, click a pixel -> its model spectrum equals the API's, colour limits,
    server-side history that survives a reload, the run picker; screenshot for the README."""
    page, errors = browser_page
    daemon = make_daemon(source_yaml(proxy.out_address) + CONSUMERS)
    subscribe(daemon, proxy)
    t_scans = time.time()
    first = beamline.map_scan(stxm_map().region(slice(70, 76), slice(40, 46)))
    wait_run_finished(daemon, first)
    data = stxm_map().region(slice(60, 72), slice(40, 56))  # 12 x 16
    uid = beamline.map_scan(data)
    wait_run_finished(daemon, uid)
    status, body, _ = http_get(f"{daemon.http.url}/api/runs/{uid}")
    summary = json.loads(body)
    (ya,), (xa,) = ([a for a in summary["axes"] if a["dim"] == d] for d in (0, 1))
    assert (ya["name"], xa["name"]) == ("sample_y", "sample_x") and ya["motor"] and xa["num"] == 16
    assert ya["start"] == pytest.approx(float(data.y[0])) and ya["stop"] == pytest.approx(float(data.y[-1]))

    page.goto(daemon.http.url + "/")
    sel = "figure[data-key='stats/total'] canvas.map"
    wait_js(page, f"document.querySelector(\"{sel}\")?.getAttribute('aria-label')?.includes('192 measured')",
                           timeout=UI_MS)
    canvas = page.locator(sel)
    geometry = json.loads(canvas.get_attribute("data-geometry"))
    assert geometry["flipY"] == bool(data.y[-1] < data.y[0]) and geometry["flipX"] == bool(data.x[-1] < data.x[0])

    # click a pixel: the model spectrum drawn equals the API's answer for that point
    r, c = 9, 3
    canvas.click(position=pixel_centre(canvas, r, c, rows=12, cols=16))
    card = "figure.point-card[data-consumer='pca'] canvas.plot"
    page.wait_for_selector(card, timeout=UI_MS)
    drawn = page.evaluate(f"document.querySelector(\"{card}\").__series")
    status, body, _ = http_get(f"{daemon.http.url}/api/runs/{uid}/pca/point?nav={r},{c}")
    point = json.loads(body)
    assert status == 200 and point["nav"] == [r, c]
    np.testing.assert_allclose(drawn[0]["y"], point["model"]["spectrum"], rtol=1e-12)
    np.testing.assert_allclose(drawn[0]["x"], point["model"]["axis"]["values"])
    assert len(drawn) == 3  # the model and its two weighted components
    assert f"[{r},{c}]" in page.text_content("#point")
    # ... and beside it the MEASURED spectrum of that point, as pca analysed it (its private
    # `points` buffer: pca does not preprocess, so the raw spectrum itself)
    measured_card = "figure.measured-card[data-consumer='pca'][data-measured='points']"
    measured = point["measured"]
    assert measured is not None, point
    assert measured["preprocessed"] is False and measured["source"] == "points"
    np.testing.assert_allclose(measured["spectrum"], data.spectra[r, c].astype(np.float64), rtol=1e-6)
    np.testing.assert_allclose(measured["axis"]["values"], point["model"]["axis"]["values"])
    page.wait_for_selector(f"{measured_card} canvas.plot", timeout=UI_MS)
    drawn_measured = page.evaluate(f"document.querySelector(\"{measured_card} canvas.plot\").__series")
    np.testing.assert_allclose(drawn_measured[0]["y"], measured["spectrum"], rtol=1e-12)
    np.testing.assert_allclose(drawn_measured[1]["y"], point["model"]["spectrum"], rtol=1e-12)
    assert "as analysed" in page.text_content(measured_card)
    # the private buffer is read for that one point only: not listed, not served whole
    summary_after = json.loads(http_get(f"{daemon.http.url}/api/runs/{uid}")[1])
    assert '"points"' not in json.dumps(summary_after["consumers"]["pca"])
    assert http_get(f"{daemon.http.url}/api/runs/{uid}/pca/points.json")[0] == 404
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(measured_card).screenshot(path=str(ARTIFACTS / "measured_spectrum.png"))
    total = point_total = json.loads(http_get(f"{daemon.http.url}/api/runs/{uid}/stats/point?nav={r},{c}")[1])
    assert point_total["values"]["total"]["value"] == pytest.approx(float(data.spectra[r, c].astype(np.float64).sum()), rel=1e-6)
    assert total["model"] is None
    for bad in ("12,0", "0,16", "-1,2", "1", "a,b", "1,2,3", "99999999999,1"):
        assert http_get(f"{daemon.http.url}/api/runs/{uid}/pca/point?nav={bad}")[0] == 400, bad

    # colour limits: fixed, then percentiles
    page.select_option("figure[data-key='stats/total'] select.cmode", "fixed")
    inputs = page.locator("figure[data-key='stats/total'] input.clim")
    inputs.nth(0).fill("10")
    inputs.nth(0).dispatch_event("change")
    inputs.nth(1).fill("20")
    inputs.nth(1).dispatch_event("change")
    assert canvas.get_attribute("data-clim") == "10,20"
    before = canvas.evaluate("c => c.toDataURL()")
    page.select_option("figure[data-key='stats/total'] select.cmode", "pct")
    totals = data.spectra.astype(np.float64).sum(axis=-1).ravel()
    lo, hi = map(float, canvas.get_attribute("data-clim").split(","))
    assert lo == pytest.approx(np.percentile(totals, 2), rel=1e-4) and hi == pytest.approx(np.percentile(totals, 98), rel=1e-4)
    assert canvas.evaluate("c => c.toDataURL()") != before

    # history on the server's wall clock: the same after a reload
    status, body, _ = http_get(f"{daemon.http.url}/api/runs/{uid}/pca/explained_variance_ratio/history")
    history = json.loads(body)
    # stamped by the server's wall clock while the scans ran (a bracket, not a tolerance: the
    # steps above may take minutes on a loaded machine)
    assert status == 200 and history["t"] and t_scans <= history["t"][0] <= history["t"][-1] <= time.time()
    page.reload()
    wait_js(page, "document.querySelector(\"figure[data-key='pca/explained_variance_ratio'] output.readout\")"
                           "?.textContent.startsWith('now:')", timeout=UI_MS)
    label = page.get_attribute("figure[data-key='pca/explained_variance_ratio'] canvas.plot", "aria-label")
    assert "time (server clock)" in label

    # the run picker shows the older run
    wait_js(page, f"document.querySelectorAll('#run-picker option').length === 2", timeout=UI_MS)
    page.select_option("#run-picker", first)
    wait_js(page, f"document.querySelector(\"{sel}\")?.getAttribute('aria-label')?.includes('36 measured')",
                           timeout=UI_MS)
    assert first in page.text_content("#run-title")
    assert page.is_checked("#follow") is False

    page.select_option("#run-picker", uid)
    wait_js(page, f"document.querySelector(\"{sel}\")?.getAttribute('aria-label')?.includes('192 measured')",
                           timeout=UI_MS)
    page.locator(sel).click(position=pixel_centre(page.locator(sel), r, c, rows=12, cols=16))
    page.wait_for_selector(card, timeout=UI_MS)
    page.mouse.move(0, 0)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_page_steer.png"), full_page=True)
    assert not errors, errors


def test_frame_run_shows_the_newest_frame_with_its_defects(make_daemon, browser_page):
    """A microscope movie (array-1.0 over ZeroMQ) through the defects network: the page shows the
    newest frame with as many class-coloured circles as the API lists defects for it."""
    from frame_helpers import defects_movie_daemon

    page, errors = browser_page
    daemon, _ = defects_movie_daemon(make_daemon, 16)
    (run,) = daemon.store.summaries()
    status, body, _ = http_get(f"{daemon.http.url}/api/runs/{run['uid']}/defects/frame_defects.json")
    listed = sum(row[0] is not None for row in json.loads(body)["data"])
    assert status == 200 and listed > 0
    page.goto(daemon.http.url + "/")
    sel = "figure[data-key='defects/frame'] canvas.frame"
    wait_js(page, f"document.querySelector(\"{sel}\")?.dataset.defects === '{listed}'", timeout=UI_MS)
    assert page.locator("figure[data-key='defects/frame'] .legend span").count() >= 1
    assert page.locator("figure[data-key='defects/frame_defects']").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("figure[data-key='defects/frame']").screenshot(path=str(ARTIFACTS / "frame.png"))
    assert not errors, errors


def _png_pixels(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_frame_run_map_changes_on_the_page_while_the_movie_streams(make_daemon, browser_page):
    """The demo's microscope movie (array-1.0 over ZeroMQ, defects post-processed in the consumer's
    worker): the defect-density map and the progress change on the open page while frames
    arrive, without a reload; two screenshots of the map taken during the movie differ."""
    from frame_helpers import GatedMovie, daemon_yaml, frame_source_yaml
    from helpers import wait_for

    page, errors = browser_page
    n = 24
    sel = "figure[data-key='defects/density_map'] canvas.map"
    with GatedMovie(n) as movie:
        daemon = make_daemon(daemon_yaml([frame_source_yaml("stem", "array-1.0", movie.address)],
                                         consumers="  - {name: defects, class: defects, params: {fit_after: 8}}\n",
                                         router="{series_quiet_s: 120}") + "outputs:\n  web: {push_interval_s: 0.1}\n")
        page.goto(daemon.http.url + "/")
        page.wait_for_selector("#connection.live", timeout=UI_MS)
        page.evaluate("() => { window.__sameDocument = true; }")
        shots = []
        for upto in (6, 16):
            movie.send(daemon, upto - movie.sent)
            (run,) = daemon.store.runs()
            wait_js(page, f"document.getElementById('progress-text').textContent.startsWith('{upto} / {n} points')",
                    timeout=UI_MS)

            def page_shows_the_map_served() -> bool:  # the map drawn is the API's map now
                status, body, _ = http_get(f"{daemon.http.url}/api/runs/{run.uid}/defects/density_map.json")
                data = np.array(json.loads(body)["data"], dtype=float)
                clim = page.evaluate(f"document.querySelector(\"{sel}\")?.dataset.clim")
                if not clim:
                    return False
                lo, hi = map(float, clim.split(","))
                return np.isclose(lo, np.nanmin(data), rtol=1e-5) and np.isclose(hi, np.nanmax(data), rtol=1e-5)
            wait_for(page_shows_the_map_served, timeout=UI_MS / 1000)
            assert run.status == "open" and "open" in page.text_content("#run-title")
            shots.append(_png_pixels(page.locator(sel).screenshot()))
        movie.send(daemon, n - movie.sent)
        assert daemon.store.wait_finished(run.uid, UI_MS / 1000)
    wait_js(page, "document.getElementById('progress-text').textContent.includes('success')", timeout=UI_MS)
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
    first, second = shots
    assert first.shape == second.shape
    changed = np.abs(first - second).sum(axis=-1) > 0
    assert changed.mean() > 0.01, f"only {changed.mean():.1%} of the map's pixels changed between frames 6 and 16"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_page_frames.png"), full_page=True)
    assert not errors, errors


def test_clicking_a_frame_of_a_frame_run_shows_its_values_and_defects(make_daemon, browser_page):
    """A frame series is a 1-D run: clicking its per-frame curve picks that frame; the page shows
    the frame's values as the API gives them and its defects, circled in their class colours."""
    from frame_helpers import defects_movie_daemon

    page, errors = browser_page
    n = 12
    daemon, _ = defects_movie_daemon(make_daemon, n)
    (run,) = daemon.store.summaries()
    page.goto(daemon.http.url + "/")
    sel = "figure[data-key='defects/total'] canvas.plot"
    wait_js(page, f"document.querySelector(\"{sel}\")?.dataset.geometry", timeout=UI_MS)
    wait_js(page, "document.getElementById('progress-text').textContent.includes('success')", timeout=UI_MS)
    canvas = page.locator(sel)
    g = json.loads(canvas.get_attribute("data-geometry"))
    frame = 7
    x = g["L"] + (frame - g["x0"]) / (g["x1"] - g["x0"]) * (g["W"] - g["L"] - g["R"])  # CSS px in the canvas
    canvas.click(position={"x": x, "y": 100})  # scrolled into view by Playwright
    page.wait_for_selector("figure.point-card[data-list='positions'] canvas", timeout=UI_MS)
    assert f"Values at [{frame}]" in page.text_content("#point")

    status, body, _ = http_get(f"{daemon.http.url}/api/runs/{run['uid']}/defects/point?nav={frame}")
    point = json.loads(body)
    assert status == 200 and point["nav"] == [frame]
    total = daemon.store.snapshot(run["uid"], "defects", "total").data[frame]
    assert point["values"]["total"]["value"] == total
    rows = point["lists"]["positions"]["rows"]
    positions = daemon.store.snapshot(run["uid"], "defects", "positions").data[frame]
    assert len(rows) == total and np.allclose(rows, positions[:len(rows)])
    cells = {r.split("\t")[0]: r.split("\t")[1] for r in page.locator("#point table tr").all_inner_texts()}
    assert float(cells["defects/total"].split()[0]) == total
    assert page.get_attribute("figure.point-card[data-list='positions'] canvas", "data-rows") == str(int(total))
    legend = page.text_content("figure.point-card[data-list='positions'] .legend")
    counts = daemon.store.snapshot(run["uid"], "defects", "counts").data[frame]
    for k, c in enumerate(counts):
        if c:
            assert f"class {k}: {int(c)}" in legend
    # the picked frame is marked on the curve; the density map (a frame-shaped image) picks nothing
    assert page.locator("figure[data-key='defects/density_map'] canvas.map").count() == 1
    page.locator("figure[data-key='defects/density_map'] canvas.map").click()
    assert f"Values at [{frame}]" in page.text_content("#point")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_page_frame_click.png"), full_page=True)
    assert not errors, errors


def test_point_api_serves_the_preprocessed_spectrum_of_a_spectral_consumer(proxy, beamline, make_daemon):
    """unmixing keeps its spectra after preprocessing (private ``spectra``): the point API answers
    that row, normalised and windowed as analysed, on the analysed axis, beside the model; the
    buffer itself is never listed nor served."""
    from beamlens.consumers.spectral.preprocess import Preprocessor, PreprocessParams

    data = stxm_map().region(slice(60, 66), slice(40, 48))  # 6 x 8
    prep = {"normalize": "max", "energy_window": [float(data.energy[10]), float(data.energy[-10])]}
    daemon = make_daemon(source_yaml(proxy.out_address) + f"""
consumers:
  - {{name: nmf, class: unmixing, params: {{n_components: 2, min_points: 8, preprocess: {json.dumps(prep)}}}}}
""")
    subscribe(daemon, proxy)
    uid = beamline.map_scan(data)
    wait_run_finished(daemon, uid)
    r, c = 3, 5
    status, body, _ = http_get(f"{daemon.http.url}/api/runs/{uid}/nmf/point?nav={r},{c}")
    point = json.loads(body)
    assert status == 200
    measured = point["measured"]
    assert measured is not None and measured["source"] == "spectra" and measured["preprocessed"] is True
    p = Preprocessor(PreprocessParams(**prep), data.energy, len(data.energy))
    expected, ok, _ = p(data.spectra[r, c][None].astype(np.float64))
    assert ok[0]
    np.testing.assert_allclose(measured["spectrum"], expected[0], rtol=1e-9)
    assert max(measured["spectrum"]) == pytest.approx(1.0)  # max-normalised: not the raw OD
    assert measured["axis"]["name"] == "energy" and measured["axis"]["units"] == "eV"
    np.testing.assert_allclose(measured["axis"]["values"], p.axis)
    assert len(p.axis) == len(data.energy) - 19  # the window applied
    assert point["model"] is not None and len(point["model"]["spectrum"]) == len(measured["spectrum"])
    summary = json.loads(http_get(f"{daemon.http.url}/api/runs/{uid}")[1])
    assert '"spectra"' not in json.dumps(summary["consumers"]["nmf"])
    assert http_get(f"{daemon.http.url}/api/runs/{uid}/nmf/spectra.json")[0] == 404
