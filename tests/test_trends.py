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

from beamlens.consumers.base import Batch, Buffers, NotApplicable, RunInfo
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
    store_path = tmp_path / "state" / "trends.sqlite"  # the default store: under the state directory
    config = source_yaml(proxy.out_address) + f"""
state:
  directory: {tmp_path / "state"}
consumers:
  - name: trends
    class: trends
    params:
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


@pytest.mark.parametrize("split", [2, 7])
def test_checkpoint_round_trip_gives_the_uninterrupted_result(tmp_path, split):
    """The daemon's checkpoint of a trends run after ``split`` batches (hyper-parameters of the
    last refit and the points since it are private buffers), restored into a fresh instance: the
    remaining check-ups give exactly the uninterrupted forecast, refits at the same points."""
    from partitions import assert_buffers_equal, checkpoint_round_trip, make_batches

    sx, sy = event_signal("cycle"), event_signal("capacity")
    x = np.arange(0.0, 24.0) * 50
    y = 1 - 0.0004 * x + 0.005 * np.sin(x / 70)
    batches = [b for pair in zip(make_batches(sx, x, batch_size=2), make_batches(sy, y, batch_size=2)) for b in pair]
    params = {"series": [{"name": "q", "key": "primary/capacity", "x": "primary/cycle", "refit_every": 3,
                          "threshold": 0.8}]}
    whole, resumed = checkpoint_round_trip(TrendsConsumer, params, [sx, sy], batches, len(x),
                                           tmp_path / "trends.ckpt", split=split)
    assert np.isfinite(whole.buffers.crossing[0])
    assert_buffers_equal(whole, resumed, private=True)


def test_store_defaults_to_the_state_directory_else_a_config_error(tmp_path):
    """Params validated as the daemon validates them: the store defaults to
    ``<state.directory>/trends.sqlite``; without a state directory a series spanning runs is a
    config error naming the field, a run-scoped one runs without history; ``store: false`` opts out."""
    from beamlens.daemon.config import ConfigError, consumer_params, load_config

    def config(state, store=None, scope="run"):
        text = "consumers:\n  - name: t\n    class: trends\n    params:\n"
        text += f"      series: [{{name: q, key: primary/q, scope: {scope}}}]\n"
        if store is not None:
            text += f"      store: {store}\n"
        if state:
            text += f"state:\n  directory: {state}\n"
        return load_config(text=text, environ={})

    c = config(tmp_path / "state")
    assert consumer_params(TrendsConsumer, c.consumers[0].params, c).store == tmp_path / "state" / "trends.sqlite"
    c = config(tmp_path / "state", store="false")
    assert consumer_params(TrendsConsumer, c.consumers[0].params, c).store is None
    c = config(None)
    assert consumer_params(TrendsConsumer, c.consumers[0].params, c).store is None
    with pytest.raises(ConfigError) as info:
        config(None, scope="all")
    assert info.value.errors[0][0] == "consumers[0].params"
    assert "store" in info.value.errors[0][1] and "state.directory" in info.value.errors[0][1]
    assert TrendsParams.model_validate({"series": [{"name": "q", "key": "primary/q", "scope": "all"}]}).store is None


def test_a_derived_event_per_forecast_update_reaches_a_remote_dispatcher(proxy, beamline, make_daemon, cells):
    """Derived documents through the real proxy to a real RemoteDispatcher: the trends run's
    ``summary`` stream carries one event per forecast update (one per check-up, published as the
    point is processed), each conditioned on one more check-up, the last the daemon's final forecast."""
    from event_model import DocumentNames, schema_validators
    from test_documents_sink import Collector, events_of

    collector = Collector(proxy.out_address, proxy.in_address)
    try:
        daemon = make_daemon(source_yaml(proxy.out_address) + f"""
consumers:
  - name: trends
    class: trends
    params:
      store: false
      series:
        - {{name: capacity, key: primary/capacity, x: primary/cycle, threshold: 0.8, relative_to_first: true}}
outputs:
  documents: {{enabled: true, address: "{proxy.in_address}", prefix: beamlens, event_interval_s: 0}}
""")
        subscribe(daemon, proxy)
        cell = next(iter(cells))
        x, q = cells[cell][0][:8], cells[cell][1][:8]
        bundle, descriptor, events = checkup_run(x, q, cell)
        uid = bundle.start_doc["uid"]
        beamline.publisher("start", bundle.start_doc)
        beamline.publisher("descriptor", descriptor)
        def processed(n):  # the n-th check-up is in (its x) and its forecast written
            xs = daemon.store.snapshot(uid, "trends", "capacity_x").data
            return np.isfinite(xs).sum() == n and points_conditioned_on(daemon, uid) == (0 if n < 2 else n)

        wait_for(lambda: points_conditioned_on(daemon, uid) == 0, timeout=60)
        for i, ev in enumerate(events):
            beamline.publisher("event", ev)  # one at a time: each its own page, its own update
            wait_for(lambda n=i + 1: processed(n), timeout=60)
        beamline.publisher("stop", bundle.compose_stop())
        wait_run_finished(daemon, uid)
        wait_for(lambda: any(n == "stop" for n, _ in collector.docs), timeout=30)
        for name, doc in collector.docs:
            schema_validators[DocumentNames[name]].validate(doc)
        (docs,) = collector.runs().values()
        assert docs[0][1]["plan_name"] == "beamlens:trends" and docs[0][1]["original_run_uid"] == uid
        summary = next(d for n, d in docs if n == "descriptor" and d["name"] == "summary")
        assert {"crossing", "crossing_pessimistic", "capacity_forecast_1", "capacity_forecast_2"} <= set(summary["data_keys"])
        updates = events_of(docs, summary)
        # possibly the buffers as allocated (when the descriptor's notification already finds the
        # derived run), then one per point: the first sets the threshold, each later one refits
        if np.isnan(np.ravel(updates[0]["data"]["threshold"])).all():
            updates = updates[1:]
        assert len(updates) == len(events)
        # update k is conditioned on the first k check-ups (a forecast from the second on)
        assert [int(np.isfinite(e["data"]["capacity_points_1"]).sum()) for e in updates] == [0, *range(2, len(events) + 1)]
        assert all(np.ravel(e["data"]["threshold"])[0] == 0.8 for e in updates)
        crossings = [np.ravel(e["data"]["crossing"])[0] for e in updates]
        assert np.isnan(crossings[0]) and not np.isnan(crossings[-1])  # inf: no crossing within the horizon
        assert crossings[-1] == daemon.store.snapshot(uid, "trends", "crossing").data[0]
        f = daemon.store.snapshot(uid, "trends", "capacity_forecast").data
        np.testing.assert_allclose(updates[-1]["data"]["capacity_forecast_2"], f[1])
    finally:
        collector.close()


def test_a_consumer_result_read_through_the_store_forecasts_as_its_writer_does(tmp_path):
    """``features/mean_particle_area`` declared as a trends series (``reads: store``): the features
    consumer writes each frame's features to the shared trend store, the trends consumer (after it
    in the config) reads them on the same frame batch and forecasts them. Consumers never read one
    another; the store is the seam. One run per cycle, as in the demo: the trends forecast equals the
    features consumer's own forecast of the same series, and its nav buffers hold the run's point."""
    from dataclasses import replace

    from beamlens.consumers.features import FeaturesConsumer, FeaturesParams
    from beamlens.daemon.sim.electrode import ElectrodeGenerator
    from partitions import frame_signal

    store = tmp_path / "trends.sqlite"
    forecast = {"threshold": 0.4, "log_x": True, "refit_every": 2, "horizon": 3000}
    fparams = FeaturesParams(store=store, forecasts=[{"feature": "mean_particle_area", **forecast}])
    tparams = TrendsParams.model_validate({"store": str(store), "series": [
        {"name": "mean_particle_area", "key": "features/mean_particle_area", "reads": "store", "scope": "all",
         "prior": "none", **forecast}]})
    assert tparams.series[0].x == "stored"
    gen = ElectrodeGenerator(seed=4)
    for c in [0, 50, 100, 200, 300, 400, 600, 800, 1000]:
        img, truth = gen.frame(c)
        run = RunInfo(uid=f"cycle-{c}", nav_shape=(1,), start_doc={})
        feats, trends = FeaturesConsumer(fparams, run), TrendsConsumer(tparams, run)
        info = frame_signal("sem", img.shape, dtype=str(img.dtype))
        info = replace(info, series=replace(info.series, meta={"pixel_size_um": gen.pixel_size_um, "cycle": c}))
        for consumer in (feats, trends):  # the daemon's order: the config's
            consumer.buffers = Buffers.allocate(consumer.signal(info), 1)
        batch = Batch(info, img[None], np.array([0]), np.array([1]), np.zeros(1))
        feats.process(batch)
        assert trends.process(batch) is True
        trends.finish()
        assert trends.buffers.mean_particle_area_x[0] == c
        assert trends.buffers.mean_particle_area_value[0] == feats.buffers.mean_particle_area[0]
        for name in ("mean_particle_area_forecast", "mean_particle_area_points", "crossing", "crossing_pessimistic"):
            np.testing.assert_array_equal(trends.buffers[name], feats.buffers[name], err_msg=f"cycle {c}: {name}")
        trends.stop({})
    assert 1000 < trends.buffers.crossing[0] < 2500
    with TrendStore(store) as s:  # every feature of every frame is stored, not only the forecast one
        assert s.count("features/void_fraction") == 9 and s.count("features/mean_particle_area") == 9


def test_stored_series_need_a_store_and_other_streams_are_refused_with_why():
    with pytest.raises(ValidationError, match="reads: store"):
        TrendsParams.model_validate({"store": False, "series": [
            {"name": "a", "key": "features/mean_particle_area", "reads": "store"}]})
    with pytest.raises(ValidationError, match="give x only"):
        TrendsParams.model_validate({"series": [{"name": "a", "key": "baseline/cycle"}]})
    with pytest.raises(ValidationError, match="x: stored"):
        TrendsParams.model_validate({"store": "/tmp/x.sqlite", "series": [
            {"name": "a", "key": "features/void_area", "reads": "store", "x": "primary/cycle"}]})


def test_x_from_the_baseline_stream_through_the_proxy(proxy, beamline, make_daemon, tmp_path):
    """A real RunEngine with ophyd sim devices and ``SupplementalData(baseline=[cycle])``, through
    the real proxy: each run's x is its baseline cycle reading at run start (the motor moves on
    before the end-of-run baseline reading), the values the run's primary capacity readings; the
    forecast spans runs (scope all). stats, which does not opt in to other streams, is never
    offered the baseline keys."""
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp
    from bluesky.preprocessors import SupplementalData
    from ophyd import Signal
    from ophyd.sim import SynAxis

    store_path = tmp_path / "trends.sqlite"
    daemon = make_daemon(source_yaml(proxy.out_address) + f"""
consumers:
  - name: stats
    class: stats
  - name: trends
    class: trends
    params:
      store: {store_path}
      series:
        - {{name: capacity, key: primary/capacity, x: baseline/cycle, scope: all, threshold: 0.8, prior: none}}
""")
    subscribe(daemon, proxy)
    cycle = SynAxis(name="cycle")
    capacity = Signal(name="capacity", value=1.0)
    beamline.RE.preprocessors.append(SupplementalData(baseline=[cycle]))

    def checkup(c, q):
        yield from bps.mv(cycle, c, capacity, q)

        @bpp.run_decorator(md={"plan_name": "checkup"})
        def run():  # baseline read at open_run (x = c); the cycler moves on before the close_run reading
            for _ in range(2):
                yield from bps.trigger_and_read([capacity])
            yield from bps.mv(cycle, c + 50)

        return (yield from run())

    cycles = [100.0, 200.0, 300.0, 400.0, 500.0]
    uids = []
    for c in cycles:
        (uid,) = beamline.RE(checkup(c, 1.0 - 0.0004 * c))
        uids.append(uid)
        wait_run_finished(daemon, uid)
    last = daemon.store.get(uids[-1])
    stats, trends = last.slots
    assert all(i.stream == "primary" for i in stats.signals)
    assert {i.name for i in trends.signals} == {"baseline/cycle", "capacity"}
    x = daemon.store.snapshot(uids[-1], "trends", "capacity_x").data
    assert x[:2].tolist() == [500.0, 500.0]  # the run-start reading, not the run-end one (550)
    pts = daemon.store.snapshot(uids[-1], "trends", "capacity_points").data
    ok = np.isfinite(pts[0])
    assert sorted(pts[0][ok].tolist()) == sorted(np.repeat(cycles, 2).tolist())
    assert np.allclose(pts[1][ok], 1.0 - 0.0004 * pts[0][ok])
    crossing = daemon.store.snapshot(uids[-1], "trends", "crossing").data[0]
    assert crossing == pytest.approx(500.0, abs=60.0)  # 1 - 0.0004 x reaches 0.8 at x = 500
    with TrendStore(store_path) as store:
        runs = store.runs("primary/capacity")
        assert [r.run_uid for r in runs] == uids
        assert [r.x.tolist() for r in runs] == [[c, c] for c in cycles]


def baseline_signal(key: str = "cycle"):
    from beamlens.daemon.signals import event_signals

    desc = {"uid": "bl", "name": "baseline", "run_start": "run",
            "data_keys": {key: {"source": "sim", "dtype": "number", "shape": [], "units": "cycles"}}}
    (info,) = event_signals(desc, "baseline")
    return info


@pytest.mark.parametrize("split", [1, 3])
def test_x_from_another_stream_in_either_order_skips_bad_readings_and_round_trips(tmp_path, split):
    """The run's x is the first *finite* reading of ``baseline/cycle`` (NaN and inf skipped, like
    primary ones), whether it arrives before or after the primary values; the private ``_run_x``
    survives a checkpoint (the baseline SignalInfo round-trips with its stream)."""
    from partitions import assert_buffers_equal, checkpoint_round_trip

    sb, sy = baseline_signal(), event_signal("capacity")
    assert (sb.name, sb.stream) == ("baseline/cycle", "baseline")
    params = {"series": [{"name": "q", "key": "primary/capacity", "x": "baseline/cycle", "threshold": 0.8,
                          "prior": "none"}]}
    y = np.array([1.0, 0.99, np.nan, 0.97, 0.96, 0.95])
    nav = np.arange(6)
    batches = [Batch(sy, y[:2], nav[:2], nav[:2] + 1, np.zeros(2)),
               Batch(sb, np.array([np.nan, np.inf]), np.array([0, 1]), np.array([1, 2]), np.zeros(2)),
               Batch(sb, np.array([300.0, 350.0]), np.array([2, 3]), np.array([3, 4]), np.zeros(2)),
               Batch(sy, y[2:], nav[2:], nav[2:] + 1, np.zeros(4)),
               Batch(sb, np.array([999.0]), np.array([4]), np.array([5]), np.zeros(1))]  # later readings: ignored
    whole, resumed = checkpoint_round_trip(TrendsConsumer, params, [sy, sb], batches, 6, tmp_path / "t.ckpt",
                                           split=split)
    b = whole.buffers
    assert b.q_run_x.tolist() == [300.0]
    assert [v for v in b.q_x.tolist() if v == v] == [300.0] * 6
    assert int(np.nansum(b.q_stored)) == 5  # the NaN value is not a point
    assert_buffers_equal(whole, resumed, private=True)
    with pytest.raises(NotApplicable):
        TrendsConsumer(TrendsParams.model_validate(params), RunInfo(uid="r", nav_shape=(6,), start_doc={})).signal(
            baseline_signal("temperature"))


def test_stream_x_configs():
    ok = TrendsParams.model_validate({"series": [{"name": "a", "key": "primary/q", "x": "baseline/cycle"}]})
    assert ok.series[0].x_stream == "baseline" and ok.series[0].x_key is None
    stored = TrendsParams.model_validate({"store": "/tmp/x.sqlite", "series": [
        {"name": "a", "key": "features/void_area", "reads": "store", "x": "baseline/cycle"}]})
    assert stored.series[0].x == "baseline/cycle"
    with pytest.raises(ValidationError, match="scope: run"):
        TrendsParams.model_validate({"store": "/tmp/x.sqlite", "series": [
            {"name": "a", "key": "features/void_area", "reads": "store", "x": "baseline/cycle", "scope": "all"}]})
    with pytest.raises(ValidationError, match="give x only"):
        TrendsParams.model_validate({"series": [{"name": "a", "key": "baseline/cycle", "x": "primary/q"}]})


@pytest.mark.parametrize("baseline_first", [True, False])
def test_a_stored_result_takes_its_x_from_the_baseline_stream(tmp_path, baseline_first):
    """``reads: store`` with ``x: baseline/cycle``: the features consumer's stored point of the run
    gets the run's baseline cycle as x (not the writer's stored x), whichever arrives first."""
    from dataclasses import replace

    from beamlens.consumers.features import FeaturesConsumer, FeaturesParams
    from beamlens.daemon.sim.electrode import ElectrodeGenerator
    from partitions import frame_signal

    store = tmp_path / "trends.sqlite"
    tparams = TrendsParams.model_validate({"store": str(store), "series": [
        {"name": "area", "key": "features/mean_particle_area", "reads": "store", "x": "baseline/cycle",
         "prior": "none"}]})
    img, _ = ElectrodeGenerator(seed=4).frame(100)
    run = RunInfo(uid="r", nav_shape=(1,), start_doc={})
    feats, trends = FeaturesConsumer(FeaturesParams(store=store), run), TrendsConsumer(tparams, run)
    info, sb = frame_signal("sem", img.shape, dtype=str(img.dtype)), baseline_signal()
    info = replace(info, series=replace(info.series, meta={"cycle": 100}))  # the writer's x: 100
    feats.buffers = Buffers.allocate(feats.signal(info), 1)
    trends.buffers = Buffers.allocate(trends.signal(sb) + trends.signal(info), 1)
    frames = Batch(info, img[None], np.array([0]), np.array([1]), np.zeros(1))
    base = Batch(sb, np.array([123.0]), np.array([0]), np.array([1]), np.zeros(1))
    if baseline_first:
        assert trends.process(base) is False  # no stored point of the run yet
        feats.process(frames)
        assert trends.process(frames) is True
    else:
        feats.process(frames)
        assert trends.process(frames) is False  # the stored point waits for the run's x
        assert trends.process(base) is True
    assert trends.buffers.area_x[0] == 123.0
    assert trends.buffers.area_value[0] == feats.buffers.mean_particle_area[0]
    trends.stop({})


def test_a_run_with_a_baseline_x_resumes_after_a_router_restart(tmp_path):
    """The daemon's own checkpoint of a run whose trends series takes x from ``baseline/cycle``:
    the baseline SignalInfo (with its stream) is saved and offered again on restore, the run's x
    survives, and after the restart the rest of the run's points get it. A baseline reading that is
    not a number is counted (``wrong_shape``) and skipped, the next one is used; stats, which does
    not opt in, never takes a baseline key, nor does a consumer that takes the first signal offered."""
    from beamlens.daemon.config import load_config
    from beamlens.daemon.documents import Document
    from beamlens.daemon.metrics import Metrics
    from beamlens.daemon.results import RunStore
    from beamlens.daemon.router import Router

    def router_on(metrics):
        config = load_config(text=f"""
consumers:
  - {{name: stats, class: stats}}
  - {{name: counting, class: "fault_consumers:Counting"}}
  - name: trends
    class: trends
    params:
      series: [{{name: q, key: primary/capacity, x: baseline/cycle, threshold: 0.8, prior: none}}]
state: {{directory: '{tmp_path / "state"}', checkpoint_interval_s: 3600}}
router: {{strict: true}}
""", environ={})
        store = RunStore()
        router = Router(config, metrics, store)
        router.start()
        return router, store

    def submit(router, docs):
        for name, doc in docs:
            router.submit(Document(name, doc, "test", 0.0))
        assert router.wait_idle(120)

    bundle = compose_run(metadata={"num_points": 6})
    uid = bundle.start_doc["uid"]
    base = bundle.compose_descriptor(name="baseline", data_keys={
        "cycle": {"source": "cycler", "dtype": "number", "shape": [], "units": "cycles"}})
    prim = bundle.compose_descriptor(name="primary", data_keys={
        "capacity": {"source": "cycler", "dtype": "number", "shape": [], "units": "Ah"}})
    b_ev = [base.compose_event(data={"cycle": v}, timestamps={"cycle": 0.0}) for v in ("n/a", 300.0, 350.0)]
    p_ev = [prim.compose_event(data={"capacity": 1.0 - 0.01 * i}, timestamps={"capacity": 0.0}) for i in range(6)]
    first = [("start", bundle.start_doc), ("descriptor", base.descriptor_doc), ("event", b_ev[0]),
             ("descriptor", prim.descriptor_doc), *[("event", e) for e in p_ev[:2]], ("event", b_ev[1]),
             ("event", p_ev[2])]
    rest = [*[("event", e) for e in p_ev[3:]], ("event", b_ev[2]), ("stop", bundle.compose_stop())]

    metrics = Metrics()
    router, store = router_on(metrics)
    submit(router, first)
    assert metrics.registry.get_sample_value("beamlens_points_skipped_total",
                                             {"consumer": "trends", "reason": "wrong_shape"}) == 1
    router.stop()
    assert store.get(uid).status == "suspended"
    router, store = router_on(Metrics())
    try:
        run = store.get(uid)
        assert run.signals["baseline/cycle"].stream == "baseline"
        assert store.snapshot(uid, "trends", "q_x").data[:3].tolist() == [300.0] * 3
        submit(router, rest)
        assert store.wait_finished(uid, 60)
    finally:
        router.stop()
    run = store.get(uid)
    stats, counting, trends = run.slots
    assert all(i.stream == "primary" for i in stats.signals)
    # counting takes the first signal offered: the baseline descriptor came first, yet it got capacity
    assert [i.name for i in counting.signals] == ["capacity"]
    assert store.snapshot(uid, "counting", "total").data.tolist() == [1.0 - 0.01 * i for i in range(6)]
    assert [i.name for i in trends.signals] == ["baseline/cycle", "capacity"]
    assert store.snapshot(uid, "trends", "q_x").data.tolist() == [300.0] * 6
    assert np.isfinite(store.snapshot(uid, "trends", "q_forecast").data).all()
