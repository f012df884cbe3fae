"""The trends consumer: real cells' capacity check-ups streamed as Bluesky runs through the real 0MQ
proxy into the daemon, forecast after each point with a prior from the earlier cells in the trend
store; plus the consumer alone (scopes, config errors)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from event_model import compose_run
from pydantic import ValidationError

from beamlens.consumers.base import Batch, Buffers, RunInfo
from beamlens.consumers.trend_model import TrendModel, first_crossing, learn_prior
from beamlens.consumers.trend_store import TrendStore
from beamlens.consumers.trends import TrendsConsumer, TrendsParams
from helpers import scrape, source_yaml, subscribe, wait_for, wait_run_finished
from partitions import event_signal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from trends import DEFAULT_CSV, load_cells  # noqa: E402  (the benchmark's loader: one definition)

N_CELLS = 5


def checkup_run(cycles, capacity, cell):
    """Documents of one cell's check-ups: one event per check-up (cycle, capacity in Ah)."""
    bundle = compose_run(metadata={"plan_name": "checkups", "cell_id": cell})
    desc = bundle.compose_descriptor(name="primary", data_keys={
        "cycle": {"source": "cycler", "dtype": "number", "shape": [], "units": "cycles"},
        "capacity": {"source": "cycler", "dtype": "number", "shape": [], "units": "Ah"}})
    events = [desc.compose_event(data={"cycle": float(c), "capacity": float(q)},
                                 timestamps={"cycle": 0.0, "capacity": 0.0}) for c, q in zip(cycles, capacity)]
    return bundle, desc.descriptor_doc, events


def points_conditioned_on(daemon, uid: str) -> int:
    """Points the run's capacity forecast is conditioned on (-1 before its buffers exist)."""
    try:
        return int(np.isfinite(daemon.store.snapshot(uid, "trends", "capacity_points").data[0]).sum())
    except KeyError:
        return -1


@pytest.fixture(scope="module")
def cells():
    if not DEFAULT_CSV.exists():
        pytest.skip(f"shared data not found: {DEFAULT_CSV}")
    return load_cells(DEFAULT_CSV)


def test_real_cells_streamed_through_the_proxy_forecast_after_each_point(proxy, beamline, make_daemon, tmp_path, cells):
    store_path = tmp_path / "state" / "trends.sqlite"
    config = source_yaml(proxy.out_address) + f"""
consumers:
  - name: trends
    class: trends
    params:
      store: {store_path}
      series:
        - {{name: capacity, key: primary/capacity, x: primary/cycle, threshold: 0.8, relative_to_first: true,
            min_prior_runs: 3, prior_floor: 0.6}}
"""
    daemon = make_daemon(config)
    subscribe(daemon, proxy)
    names = list(cells)[:N_CELLS]
    d = np.genfromtxt(DEFAULT_CSV, delimiter=",", names=True, dtype=None, encoding="utf-8")
    raw = {}  # capacity in Ah, as a cycler reports it; the consumer makes it relative to the first check-up
    for cell in names:
        r = d[(d["cell_id"] == cell) & np.isfinite(d["capacity_Ah"])]
        o = np.argsort(r["cycle"], kind="stable")
        raw[cell] = (r["cycle"][o].astype(float), r["capacity_Ah"][o].astype(float))
    for k, cell in enumerate(names):
        x, q = raw[cell]
        rel = q / q[0]
        truth = first_crossing(x, rel, 0.8)
        bundle, descriptor, events = checkup_run(x, q, cell)
        uid = bundle.start_doc["uid"]
        beamline.publisher("start", bundle.start_doc)
        beamline.publisher("descriptor", descriptor)
        for i, ev in enumerate(events):
            beamline.publisher("event", ev)
            n = i + 1
            wait_for(lambda n=n: points_conditioned_on(daemon, uid) == (0 if n < 2 else n), timeout=60)
            if i >= 1:  # a forecast after each point from the second on
                f = daemon.store.snapshot(uid, "trends", "capacity_forecast").data
                assert np.isfinite(f).all()
                assert (f[2] <= f[1]).all() and (f[1] <= f[3]).all()
            if x[i] <= 0.6 * truth < x[i + 1]:  # the benchmark's cut: forecast from check-ups up to 60 %
                if k >= 3:
                    # the prior is learned on the pool when the run starts; wait for it to be installed
                    wait_for(lambda: daemon.store.snapshot(uid, "trends", "prior_runs").data[0] == k, 60)
                crossing = daemon.store.snapshot(uid, "trends", "crossing").data[0]
                pess = daemon.store.snapshot(uid, "trends", "crossing_pessimistic").data[0]
                if k >= 3:
                    # the daemon's forecast is the library's, prior from the earlier cells only
                    earlier = [(raw[c][0], raw[c][1] / raw[c][1][0]) for c in names[:k]]
                    model = TrendModel(prior=learn_prior(earlier, floor=0.6), window=50)
                    model.add(x[:i + 1], rel[:i + 1])
                    expect = model.crossing(0.8)
                    assert crossing == pytest.approx(expect.mean, rel=1e-3)
                    assert pess == pytest.approx(expect.pessimistic, rel=1e-3)
                    assert abs(crossing - truth) < 250
                    label = ("beamlens_forecast_crossing", (("consumer", "trends"), ("series", "capacity")))
                    wait_for(lambda c=crossing: scrape(daemon.http.url).get(label) == pytest.approx(c, rel=1e-6), 30)
        beamline.publisher("stop", bundle.compose_stop())
        wait_run_finished(daemon, uid)
    with TrendStore(store_path) as store:
        runs = store.runs("primary/capacity")
        assert len(runs) == N_CELLS
        assert sum(len(r.x) for r in runs) == sum(len(raw[c][0]) for c in names)


def feed_points(consumer, info_x, info_y, xs, ys, start=0):
    n = len(xs)
    nav = np.arange(start, start + n)
    seq = nav + 1
    consumer.process(Batch(info_x, np.asarray(xs, float), nav, seq, np.zeros(n)))
    consumer.process(Batch(info_y, np.asarray(ys, float), nav, seq, np.zeros(n)))


def make(params, uid, nav=40):
    c = TrendsConsumer(TrendsParams.model_validate(params), RunInfo(uid=uid, nav_shape=(nav,), start_doc={}))
    sx, sy = event_signal("cycle"), event_signal("capacity")
    specs = c.signal(sx) + c.signal(sy)
    c.buffers = Buffers.allocate(specs, nav)
    return c, sx, sy


def test_scope_all_spans_runs_and_restarts(tmp_path):
    """A figure measured once per run (an electrode imaged once per cycle): the series is every
    stored point of the key; a new instance (a restarted daemon) continues it from the store."""
    params = {"store": str(tmp_path / "t.sqlite"),
              "series": [{"name": "area", "key": "primary/capacity", "x": "primary/cycle", "scope": "all",
                          "threshold": 0.5, "refit_every": 1}]}
    x = np.arange(0.0, 200.0, 20.0)
    y = 1.0 - 0.002 * x
    for i in range(len(x)):
        c, sx, sy = make(params, f"run-{i}", nav=1)
        feed_points(c, sx, sy, x[i:i + 1], y[i:i + 1])
        c.stop({})
    pts = c.buffers.area_points
    np.testing.assert_allclose(pts[0, :len(x)], x)
    assert c.buffers.crossing[0] == pytest.approx(250.0, abs=25)  # 1 - 0.002 x = 0.5 at x = 250
    assert c.buffers.crossing_pessimistic[0] <= c.buffers.crossing[0] <= c.buffers.crossing_optimistic[0]


def test_hyperparameters_refit_every_k_points_kept_between(tmp_path):
    c, sx, sy = make({"series": [{"name": "q", "key": "primary/capacity", "x": "primary/cycle", "refit_every": 3,
                                  "threshold": 0.0}]}, "r")
    x = np.arange(0.0, 18.0)
    y = 1 - 0.05 * x + 0.01 * np.sin(x)
    thetas = []
    for i in range(len(x)):
        feed_points(c, sx, sy, x[i:i + 1], y[i:i + 1], start=i)
        thetas.append(c.buffers.q_theta.copy())
    # a refit at every point of the short series (2..8 points), then every 3rd; unchanged between
    refits = [i for i in range(1, len(x)) if not np.array_equal(thetas[i], thetas[i - 1], equal_nan=True)]
    assert refits[-3:] == [10, 13, 16] and set(range(11, 18)) - set(refits) == {11, 12, 14, 15, 17}
    assert math.isfinite(c.buffers.crossing[0])
    assert c.params.store is None  # no store: points only in the run's buffers


def test_bad_series_configs_name_the_field():
    with pytest.raises(ValidationError, match="primary stream"):
        TrendsParams.model_validate({"series": [{"name": "a", "key": "baseline/cycle"}]})
    with pytest.raises(ValidationError, match="unique"):
        TrendsParams.model_validate({"series": [{"name": "a", "key": "primary/q"}, {"name": "a", "key": "primary/r"}]})
    with pytest.raises(ValidationError, match="x must be"):
        TrendsParams.model_validate({"series": [{"name": "a", "key": "primary/q", "x": "wall"}]})


def test_live_page_draws_the_forecast_with_its_points(proxy, beamline, make_daemon, tmp_path, cells):
    """Real Chromium: a cell's check-ups streamed through the proxy; the page's forecast card draws
    mean, band, threshold and the points, and changes as points arrive."""
    from test_web_page import ARTIFACTS, CHROMIUM, FLAGS, wait_js
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: run `make system-deps` as root")
    from playwright.sync_api import sync_playwright

    daemon = make_daemon(source_yaml(proxy.out_address) + """
consumers:
  - name: trends
    class: trends
    params:
      series:
        - {name: capacity, key: primary/capacity, x: primary/cycle, threshold: 0.8, relative_to_first: true}
outputs:
  web: {push_interval_s: 0.1}
""")
    subscribe(daemon, proxy)
    x, y = cells["ep_sanyo_002"]
    bundle, descriptor, events = checkup_run(x, y, "ep_sanyo_002")
    uid = bundle.start_doc["uid"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(daemon.http.url + "/")
            page.wait_for_selector("#connection.live", timeout=10_000)
            beamline.publisher("start", bundle.start_doc)
            beamline.publisher("descriptor", descriptor)
            card = "figure[data-key=\\\"trends/capacity_forecast\\\"] canvas.plot"
            images = set()
            for i, ev in enumerate(events[:6]):
                beamline.publisher("event", ev)
                wait_for(lambda n=i + 1: points_conditioned_on(daemon, uid) == (0 if n < 2 else n), 30)
                if i >= 1:
                    wait_js(page, f"document.querySelector('{card}') && document.querySelector('{card}')"
                                  ".getAttribute('aria-label').includes('5 curves')", timeout=20_000)
                    # each new point redraws the forecast (a picture not seen before)
                    wait_for(lambda: page.evaluate(f"document.querySelector('{card}').toDataURL()") not in images, 20)
                    images.add(page.evaluate(f"document.querySelector('{card}').toDataURL()"))
            assert len(images) == 5
            assert page.locator("figure[data-key='trends/capacity_points']").count() == 0  # drawn in the forecast
            ARTIFACTS.mkdir(exist_ok=True)
            page.locator("figure[data-key='trends/capacity_forecast']").screenshot(
                path=str(ARTIFACTS / "forecast_card.png"))
            assert not errors, errors
        finally:
            browser.close()
    beamline.publisher("stop", bundle.compose_stop())
    wait_run_finished(daemon, uid)
