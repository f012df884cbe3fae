"""Joining a run mid-way: events whose descriptor (and RunStart) the daemon never saw are held,
analysed after a late descriptor, or under a descriptor built from them; bounded and counted."""
from __future__ import annotations

import time

import numpy as np
import pytest
from event_model import compose_run

from beamlens.daemon.config import load_config
from beamlens.daemon.documents import Document
from beamlens.daemon.metrics import Metrics
from beamlens.daemon.midway import descriptor_from_pages
from beamlens.daemon.results import RunStore
from beamlens.daemon.router import Router

from helpers import wait_for

CONSUMERS = "consumers:\n  - {name: stats, class: stats}\n"


def make_router(extra: str = "") -> tuple[Router, Metrics, RunStore]:
    config = load_config(text=CONSUMERS + "router: {strict: true, midway_hold_s: 0.2" + extra + "}\n", environ={})
    metrics, store = Metrics(), RunStore()
    router = Router(config, metrics, store)
    router.start()
    return router, metrics, store


def a_run(n: int = 12, channels: int = 16):
    run = compose_run(metadata={"shape": [3, 4], "plan_name": "grid_scan"})
    desc = run.compose_descriptor(name="primary", data_keys={
        "spectrum": {"source": "sim", "dtype": "array", "shape": [channels]},
        "i0": {"source": "sim", "dtype": "number", "shape": []}})
    x = np.random.default_rng(0).random((n, channels))
    events = [desc.compose_event(data={"spectrum": x[i], "i0": float(i)}, timestamps={"spectrum": 0.0, "i0": 0.0},
                                 seq_num=i + 1) for i in range(n)]
    return run, desc, events, x


def submit(router: Router, name: str, doc: dict) -> None:
    router.submit(Document(name, dict(doc), "test", time.time()))


def test_descriptor_built_from_events_keeps_the_rest_of_the_run():
    router, metrics, store = make_router()
    run, desc, events, x = a_run()
    try:
        for e in events[4:]:  # the daemon (re)started after the RunStart, the descriptor and 4 events
            submit(router, "event", e)
        uid = "midway-" + desc.descriptor_doc["uid"]
        wait_for(lambda: store.get(uid) is not None and store.get(uid).events_done == 8, timeout=30)
        submit(router, "stop", run.compose_stop())
        assert router.wait_idle(30)
        r = store.get(uid)
        assert r.joined_midway and r.status == "success"  # the RunStop (num_events 12 >= 8) closed it
        total = store.snapshot(uid, "stats", "total").data.ravel()
        np.testing.assert_allclose(total[4:12], x[4:].sum(axis=1))  # a 1-D map placed by seq_num
        assert metrics.registry.get_sample_value("beamlens_runs_joined_midway_total") == 1
        assert metrics.registry.get_sample_value("beamlens_bad_messages_total",
                                                 {"source": "test", "reason": "event_before_descriptor"}) is None
    finally:
        router.stop()


def test_a_late_descriptor_gets_its_held_events_in_order():
    router, metrics, store = make_router(", midway_hold_s: 30")
    run, desc, events, x = a_run()
    try:
        submit(router, "start", run.start_doc)
        for e in events[:3]:
            submit(router, "event", e)
        submit(router, "descriptor", desc.descriptor_doc)
        for e in events[3:]:
            submit(router, "event", e)
        submit(router, "stop", run.compose_stop())
        assert router.wait_idle(30)
        uid = run.start_doc["uid"]
        r = store.get(uid)
        assert r.events_done == 12 and not r.joined_midway and r.nav_shape == (3, 4)
        np.testing.assert_allclose(store.snapshot(uid, "stats", "total").data.ravel(), x.sum(axis=1))
    finally:
        router.stop()


def test_holding_is_bounded():
    router, metrics, store = make_router(", midway_hold_s: 30, midway_max_descriptors: 1, midway_max_events: 5")
    run, desc, events, _ = a_run()
    other = compose_run().compose_descriptor(name="primary", data_keys={"y": {"source": "s", "dtype": "number", "shape": []}})
    try:
        submit(router, "event", other.compose_event(data={"y": 1.0}, timestamps={"y": 0.0}))  # holds the one place
        for e in events[:2]:
            submit(router, "event", e)
        assert router.wait_idle(30)
        assert metrics.registry.get_sample_value("beamlens_bad_messages_total",
                                                 {"source": "test", "reason": "event_before_descriptor"}) == 2
        for i in range(6):  # the held descriptor reaches midway_max_events: built at once, nothing lost
            submit(router, "event", other.compose_event(data={"y": float(i)}, timestamps={"y": 0.0}))
        assert router.wait_idle(30)
        built = store.get("midway-" + other.descriptor_doc["uid"])
        assert built is not None and built.descriptor_streams[other.descriptor_doc["uid"]] == "unknown"
    finally:
        router.stop()


def test_built_descriptor_has_event_model_data_keys():
    page = {"descriptor": "d", "time": [5.0], "seq_num": [1],
            "data": {"img": [np.zeros((2, 3), dtype=np.uint16)], "x": [1.5], "n": [3], "ok": [True], "s": ["a"]}}
    doc = descriptor_from_pages("d", [page])
    keys = doc["data_keys"]
    assert keys["img"] == {"source": "beamlens:built-from-events", "dtype": "array", "shape": [2, 3], "dtype_numpy": "<u2"}
    assert [keys[k]["dtype"] for k in ("x", "n", "ok", "s")] == ["number", "integer", "boolean", "string"]
    assert doc["name"] == "primary" and doc["run_start"] == "midway-d" and doc["time"] == 5.0


@pytest.fixture
def tiled_runs(tmp_path):
    """A real Tiled server in this process (SQLite catalog, on a free 127.0.0.1 port) and bluesky's
    TiledWriter writing into it, as a beamline's run store."""
    from bluesky.callbacks.tiled_writer import TiledWriter
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    with SimpleTiledServer(directory=tmp_path / "tiled") as server:
        client = from_uri(server.uri)
        yield server, TiledWriter(client)
        client.context.close()


def snaking_run(n: int = 12, channels: int = 16):
    run = compose_run(metadata={"shape": [3, 4], "snaking": [False, True], "plan_name": "grid_scan"})
    desc = run.compose_descriptor(name="primary", data_keys={
        "spectrum": {"source": "sim", "dtype": "array", "shape": [channels], "dtype_numpy": "<f8"}})
    x = np.random.default_rng(1).random((n, channels))
    events = [desc.compose_event(data={"spectrum": x[i]}, timestamps={"spectrum": 0.0}, seq_num=i + 1) for i in range(n)]
    return run, desc, events, x


def lookup_router(server) -> tuple[Router, Metrics, RunStore]:
    uri = server.uri.replace("http://", "tiled://", 1)
    config = load_config(text=CONSUMERS + "sources:\n  bluesky:\n    - {address: 'tcp://127.0.0.1:5578', name: test, "
                         f"lookup: '{uri}'}}\nrouter: {{strict: true, midway_hold_s: 0.2}}\n", environ={})
    metrics, store = Metrics(), RunStore()
    router = Router(config, metrics, store)
    router.start()
    return router, metrics, store


@pytest.mark.parametrize("missed", ["start", "start_and_descriptor"])
def test_a_tiled_lookup_restores_grid_shape_and_snaking(tiled_runs, missed):
    server, writer = tiled_runs
    run, desc, events, x = snaking_run()
    writer("start", run.start_doc)
    writer("descriptor", desc.descriptor_doc)
    for e in events[:4]:  # the run store has everything so far; the daemon restarts now
        writer("event", e)
    router, metrics, store = lookup_router(server)
    try:
        if missed == "start":
            submit(router, "descriptor", desc.descriptor_doc)
        for e in events[4:]:
            submit(router, "event", e)
        submit(router, "stop", run.compose_stop())
        uid = run.start_doc["uid"]
        wait_for(lambda: store.get(uid) is not None and store.get(uid).status == "success", timeout=60)
        r = store.get(uid)
        assert r.joined_midway and r.nav_shape == (3, 4) and r.snaking == (False, True)
        total = store.snapshot(uid, "stats", "total").data
        expected = x.sum(axis=1).reshape(3, 4)
        expected[1] = expected[1, ::-1]  # the snaked row was measured right to left
        assert np.isnan(total.ravel()[:4]).all() or np.allclose(total.ravel()[:4], 0)  # never seen
        np.testing.assert_allclose(total[1:], expected[1:])
        assert metrics.registry.get_sample_value("beamlens_runs_joined_midway_total") == 1
    finally:
        router.stop()
