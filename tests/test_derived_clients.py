"""bluesky's own callbacks on beamlens' derived runs: ``LiveTable``, ``LiveGrid`` and ``TiledWriter``
(into a real in-process Tiled server) run on every derived run of the demo's two kinds, a spectral
``grid_scan`` (snaked) from a real RunEngine and a frame-only run from an emulated DECTRIS detector,
without an error logged or raised, and with the right grid.

The derived documents are received through a real bluesky 0MQ Proxy by a ``RemoteDispatcher`` (as
in test_documents_sink.py) and then replayed into each callback, in the order they arrived.
"""
from __future__ import annotations

import json
import logging

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from bluesky.callbacks import LiveTable  # noqa: E402
from bluesky.callbacks.mpl_plotting import LiveGrid  # noqa: E402
from bluesky.callbacks.tiled_writer import TiledWriter  # noqa: E402
from tiled.client import from_uri  # noqa: E402

from beamlens.daemon.sim.datasets import stxm_map  # noqa: E402
from beamlens.daemon.sim.detectors import DetectorEmulator, raster_series_plan, synthetic_frames  # noqa: E402

from frame_helpers import frame_source_yaml  # noqa: E402
from helpers import http_get, source_yaml, subscribe, wait_for, wait_run_finished  # noqa: E402
from test_documents_sink import Collector  # noqa: E402

NY, NX = 6, 5


@pytest.fixture
def collector(proxy):
    c = Collector(proxy.out_address, proxy.in_address)
    yield c
    c.close()


def documents_yaml(proxy_in: str) -> str:
    return f"""
outputs:
  documents: {{enabled: true, address: "{proxy_in}", prefix: beamlens, event_interval_s: 0.05}}
"""


def served(daemon, uid: str, consumer: str, buffer: str) -> np.ndarray:
    status, body, _ = http_get(f"{daemon.http.url}/api/runs/{uid}/{consumer}/{buffer}.json")
    assert status == 200
    got = json.loads(body)
    return np.array(got["data"], dtype=float).reshape(got["shape"])


@pytest.fixture
def tiled_client(tiled_server):
    client = from_uri(tiled_server.uri)
    yield client
    client.context.close()


def replay(docs, *callbacks) -> None:
    for name, doc in docs:
        for cb in callbacks:
            cb(name, doc)


@pytest.fixture
def no_callback_errors(caplog):
    """bluesky's plotting callbacks log their exceptions (make_class_safe) instead of raising."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("bluesky")]
    assert errors == [], errors


def test_livetable_livegrid_tiledwriter_on_a_spectral_map_run(proxy, beamline, make_daemon, collector,
                                                              tiled_client, no_callback_errors, capsys):
    daemon = make_daemon(source_yaml(proxy.out_address) + """
consumers:
  - {name: stats, class: stats}
  - {name: pca, class: pca, params: {n_components: 2, batch_size: 8}}
""" + documents_yaml(proxy.in_address))
    subscribe(daemon, proxy)
    data = stxm_map().region(slice(60, 60 + NY), slice(40, 40 + NX))
    raw_uid = beamline.map_scan(data, snake=True)
    wait_run_finished(daemon, raw_uid)
    wait_for(lambda: sum(n == "stop" for n, _ in collector.docs) == 2, timeout=30)
    runs = {docs[0][1]["plan_name"]: docs for docs in collector.runs().values()}
    assert set(runs) == {"beamlens:stats", "beamlens:pca"}
    client = tiled_client
    writer = TiledWriter(client)
    raw_start = daemon.store.get(raw_uid).start_doc
    for plan, docs in runs.items():
        consumer, field = plan.split(":")[1], {"beamlens:stats": "total", "beamlens:pca": "score_1"}[plan]
        start = docs[0][1]
        assert start["scan_id"] == raw_start["scan_id"] and start["plan_type"] == "beamlens"
        table = LiveTable([field, "sample_y", "sample_x"])
        grid = LiveGrid((NY, NX), field)  # snaking from the RunStart, as for the raw run
        replay(docs, table, grid, writer)
        expected = served(daemon, raw_uid, consumer, field)
        if consumer == "stats":
            np.testing.assert_allclose(grid._Idata, expected, rtol=1e-12)
        else:  # a point published before PCA scored its batch has no score yet (NaN); the maps stream has all
            assert grid._Idata.shape == (NY, NX) and np.isfinite(grid._Idata).any()
        run = client[start["uid"]]
        assert run.metadata["start"]["original_run_uid"] == raw_uid
        assert run.metadata["stop"]["exit_status"] == "success"
        maps = run["maps"][field].read()
        assert maps.shape == (NY, NX)
        np.testing.assert_allclose(maps, expected, rtol=1e-12)
        primary = run["primary"]
        assert primary["seq_num"].read().tolist() == list(range(1, NY * NX + 1)) or \
            sorted(primary["seq_num"].read().tolist()) == list(range(1, NY * NX + 1))
        positions = primary["nav_index"].read()
        np.testing.assert_allclose(primary["sample_x"].read(), data.x[positions % NX])
        if consumer == "pca":
            comps = [run["summary"][f"components_{i}"].read() for i in (1, 2)]
            assert all(c.shape[1:] == (len(data.energy),) for c in comps)
            np.testing.assert_allclose(np.stack([c[-1] for c in comps]), served(daemon, raw_uid, "pca", "components"),
                                       rtol=1e-12)
    out = capsys.readouterr().out
    assert "beamlens beamlens:stats" in out  # LiveTable's closing line: plan_type, plan_name, scan id


def test_livetable_livegrid_tiledwriter_on_a_frame_run(proxy, beamline, make_daemon, collector, tiled_client,
                                                       no_callback_errors):
    """The demo's frame run: a Bluesky raster run (RunStart shape, snaked, no events of its own)
    during which a DECTRIS stream-v2 detector sends one frame per scan point."""
    shape = (3, 4)
    frames = list(synthetic_frames(shape[0] * shape[1], (16, 16), seed=3))
    with DetectorEmulator("dectris-v2") as emu:
        daemon = make_daemon(source_yaml(proxy.out_address) + "  frames:\n"
                             + frame_source_yaml("det", "dectris-v2", emu.address)
                             + "consumers:\n  - {name: fs, class: frame_stats, params: {units: counts}}\n"
                             + "router: {series_end_grace_s: 5}\n" + documents_yaml(proxy.in_address))
        subscribe(daemon, proxy)
        (raw_uid,) = beamline.RE(raster_series_plan(emu, frames, shape, snake=True,
                                                    run_seen=lambda u: daemon.store.get(u) is not None))
        wait_run_finished(daemon, raw_uid)
        wait_for(lambda: any(n == "stop" for n, _ in collector.docs), timeout=30)
    (docs,) = collector.runs().values()
    start = docs[0][1]
    raw_start = daemon.store.get(raw_uid).start_doc
    assert start["plan_name"] == "beamlens:fs" and start["scan_id"] == raw_start["scan_id"]
    assert start["shape"] == list(shape) and start["snaking"] == [False, True]
    primary = {x["uid"] for m, x in docs if m == "descriptor" and x["name"] == "primary"}
    events = [d for n, d in docs if n == "event_page" and d["descriptor"] in primary]
    assert sorted(s for e in events for s in e["seq_num"]) == list(range(1, len(frames) + 1)), \
        "every frame is a derived event, placed by its frame number"
    grid = LiveGrid(shape, "total")
    replay(docs, LiveTable(["total"]), grid, TiledWriter(tiled_client))
    expected = served(daemon, raw_uid, "fs", "total")
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(grid._Idata, expected)
    run = tiled_client[start["uid"]]
    assert run.metadata["start"]["original_run_uid"] == raw_uid
    np.testing.assert_allclose(run["maps"]["total"].read(), expected)
