"""Tiled sink against a real in-process Tiled server (``tiled.server.SimpleTiledServer``), read back
with the real ``tiled.client``:

- a snaked ``grid_scan`` from a real RunEngine through a real bluesky 0MQ Proxy: every map, spectrum
  and scalar in Tiled equals what the daemon's HTTP API serves, with motor axes and the raw run uid;
- live growth: a Tiled subscriber on a map sees it change while the run goes (patches), before the
  RunStop;
- a frame series of unknown length (DECTRIS stream v1 without ``n_frames`` would be one; here a
  frame-only run whose nav buffers grow) grows its per-frame results with ``extend=True``.
"""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from event_model import compose_run
from tiled.client import from_uri

from beamlens.daemon.documents import Document
from beamlens.daemon.sim.datasets import stxm_map
from beamlens.daemon.sim.detectors import DetectorEmulator, synthetic_frames

from frame_helpers import frame_source_yaml
from helpers import http_get, scrape, source_yaml, subscribe, wait_for, wait_run_finished

CONSUMERS = """
consumers:
  - {name: stats, class: stats, params: {units: OD}}
  - {name: pca, class: pca, params: {n_components: 2, batch_size: 8}}
"""


def tiled_yaml(server, interval: float = 0.05) -> str:
    return f"""
outputs:
  tiled: {{enabled: true, uri: "{server.uri.split('?')[0]}", api_key: "{server.api_key}", write_interval_s: {interval}}}
"""


@pytest.fixture
def client(tiled_server):
    c = from_uri(tiled_server.uri)
    yield c
    c.context.close()


def lookup(client, *keys):
    """The node at ``client/keys...``, or None while the sink has not written it yet."""
    node = client
    for key in keys:
        try:
            node = node[key]
        except KeyError:
            return None
    return node


def served(daemon, uid: str, consumer: str, buffer: str) -> np.ndarray:
    status, body, _ = http_get(f"{daemon.http.url}/api/runs/{uid}/{consumer}/{buffer}.json")
    assert status == 200
    got = json.loads(body)
    return np.array(got["data"], dtype=float).reshape(got["shape"])


def test_map_run_in_tiled_equals_the_http_api(proxy, beamline, make_daemon, tiled_server, client):
    daemon = make_daemon(source_yaml(proxy.out_address) + CONSUMERS + tiled_yaml(tiled_server))
    subscribe(daemon, proxy)
    data = stxm_map().region(slice(60, 66), slice(40, 45))
    raw_uid = beamline.map_scan(data, snake=True)
    wait_run_finished(daemon, raw_uid)
    wait_for(lambda: (lookup(client, "beamlens", raw_uid) or client).metadata.get("status") == "success")
    run = client["beamlens"][raw_uid]
    md = run.metadata
    assert md["raw_run_uid"] == raw_uid and md["raw_start"]["uid"] == raw_uid and md["nav_shape"] == [6, 5]
    assert md["scan_id"] == daemon.store.get(raw_uid).start_doc["scan_id"] and md["plan_name"] == "grid_scan"
    assert set(run) >= {"stats", "pca", "axes"}
    assert run["pca"].metadata["class"] == "beamlens.consumers.pca:PCAConsumer"
    for consumer in ("stats", "pca"):
        for buffer in daemon.store.get(raw_uid).summary()["consumers"][consumer]["buffers"]:
            node = run[consumer][buffer]
            np.testing.assert_allclose(node.read(), served(daemon, raw_uid, consumer, buffer), rtol=1e-12,
                                       err_msg=f"{consumer}/{buffer}")
    total = run["stats"]["total"]
    assert total.shape == (6, 5) and total.metadata["units"] == "OD" and total.metadata["kind"] == "nav"
    assert run["pca"]["components"].shape == (2, len(data.energy))
    np.testing.assert_allclose(run["pca"]["energy"].read(), data.energy)
    assert run["pca"]["energy"].metadata["units"] == "eV"
    np.testing.assert_allclose(run["axes"]["sample_y"].read(), data.y)
    np.testing.assert_allclose(run["axes"]["sample_x"].read(), data.x)
    assert scrape(daemon.http.url)[("beamlens_output_failures_total", (("output", "tiled"),))] == 0


NY, NX, NE = 4, 5, 12


def grid_docs():
    bundle = compose_run(metadata={"scan_id": 3, "plan_name": "grid_scan", "shape": [NY, NX], "snaking": [False, False]})
    desc = bundle.compose_descriptor(name="primary", data_keys={
        "det_spectrum": {"source": "sim", "dtype": "array", "shape": [NE], "units": "OD"}})
    spectra = np.random.default_rng(4).gamma(2.0, 1.0, size=(NY * NX, NE))
    events = [("event", desc.compose_event(data={"det_spectrum": s}, timestamps={"det_spectrum": 0.0})) for s in spectra]
    return (bundle.start_doc["uid"], [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)], events,
            ("stop", bundle.compose_stop()), spectra)


def test_subscribers_see_the_map_grow_while_the_run_goes(make_daemon, tiled_server, client):
    daemon = make_daemon("consumers:\n  - {name: stats, class: stats}\n" + tiled_yaml(tiled_server))
    uid, head, events, stop, spectra = grid_docs()

    def submit(docs):
        for name, doc in docs:
            daemon.router.submit(Document(name, doc, "test", time.time()))
        assert daemon.router.wait_idle(30)

    submit(head + events[:6])
    wait_for(lambda: lookup(client, "beamlens", uid, "stats", "total") is not None
             and np.isfinite(lookup(client, "beamlens", uid, "stats", "total").read()).sum() == 6)
    node = client["beamlens"][uid]["stats"]["total"]
    updates, got = [], threading.Event()

    def on_data(update):
        updates.append(update)
        got.set()

    sub = node.subscribe()
    sub.new_data.add_callback(on_data)
    sub.start_in_thread()
    try:
        submit(events[6:14])
        assert got.wait(30), "no Tiled update reached the subscriber while the run was open"
        assert daemon.store.get(uid).status == "open"
        wait_for(lambda: np.isfinite(node.read()).sum() == 14)
        submit(events[14:] + [stop])
        wait_for(lambda: client["beamlens"][uid].metadata["status"] == "success")
    finally:
        sub.disconnect()
    np.testing.assert_allclose(node.read(), spectra.sum(axis=1).reshape(NY, NX), rtol=1e-12)
    assert len(updates) >= 1


def test_a_run_first_written_after_its_stop_reads_success_only_once_complete(make_daemon, tiled_server, client):
    """The race a loaded machine showed: the sink's first pass for a run comes after its RunStop.
    Its container must not read "success" while its buffers are still being written (a reader
    waiting for "success" would see a half-written run). Deterministic: the sink's pass is called
    here, after the run has finished, and every buffer write looks at the status on the server."""
    from beamlens.daemon.config import load_config
    from beamlens.daemon.metrics import Metrics
    from beamlens.daemon.sinks.tiled import TiledSink

    daemon = make_daemon(CONSUMERS)
    config = load_config(text=tiled_yaml(tiled_server), environ={}).outputs.tiled
    seen: list[str] = []
    reader = from_uri(tiled_server.uri)

    class Watched(TiledSink):
        def _write_buffer(self, nodes, consumer, snap):
            seen.append(reader["beamlens"][uid].metadata["status"])
            super()._write_buffer(nodes, consumer, snap)

    sink = Watched(config, Metrics(), daemon.store)  # never started: no writer thread, only this pass
    daemon.router.listeners.append(sink)
    uid, head, events, stop, spectra = grid_docs()
    for name, doc in head + events + [stop]:
        daemon.router.submit(Document(name, doc, "test", time.time()))
    assert daemon.router.wait_idle(30) and daemon.store.wait_finished(uid, 30)
    assert daemon.store.get(uid).status == "success"
    try:
        sink.write_pass()
        assert len(seen) >= 3 and set(seen) == {"open"}, seen  # stats and pca buffers, all while "open"
        run = client["beamlens"][uid]
        assert run.metadata["status"] == "success" and set(run) >= {"stats", "pca", "axes"}
        np.testing.assert_allclose(run["stats"]["total"].read(), spectra.sum(axis=1).reshape(NY, NX), rtol=1e-12)
    finally:
        reader.context.close()
        sink._disconnect()


def test_frame_run_of_unknown_length_grows_with_extend(make_daemon, tiled_server, client):
    frames = list(synthetic_frames(9, (16, 16), seed=5))
    with DetectorEmulator("dectris-v2") as emu:
        daemon = make_daemon("sources:\n  frames:\n" + frame_source_yaml("det", "dectris-v2", emu.address)
                             + "consumers:\n  - {name: fs, class: frame_stats, params: {units: counts}}\n"
                             + tiled_yaml(tiled_server))
        messages = list(emu.messages(frames, series=1))  # no n_frames: the run's length is unknown
        emu.socket.send_multipart(messages[0])
        for parts in messages[1:5]:
            emu.socket.send_multipart(parts)
        wait_for(lambda: any(r["frames_done"] == 4 for r in daemon.store.summaries()))
        (uid,) = [r["uid"] for r in daemon.store.summaries()]
        wait_for(lambda: (lookup(client, "beamlens", uid, "fs", "total") or client).metadata.get("kind") == "nav"
                 and lookup(client, "beamlens", uid, "fs", "total").shape == (4,))
        for parts in messages[5:]:
            emu.socket.send_multipart(parts)
        wait_for(lambda: daemon.store.get(uid).status != "open")
    wait_for(lambda: client["beamlens"][uid].metadata["status"] != "open")
    node = client["beamlens"][uid]["fs"]["total"]
    assert node.shape == (9,), "the per-frame results grew from 4 to 9 frames"
    np.testing.assert_allclose(node.read(), [f.astype(np.float64).sum() for f in frames])
    np.testing.assert_allclose(node.read(), served(daemon, uid, "fs", "total"))


@pytest.fixture
def no_client_retries():
    """tiled.client retries a refused connection for ~25 s (stamina); stamina's testing mode makes
    it one attempt, so the test sees the failure at once."""
    import stamina
    stamina.set_testing(True, attempts=1)
    yield
    stamina.set_testing(False)


def test_unreachable_server_is_counted_and_the_daemon_goes_on(no_client_retries, make_daemon):
    import socket
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = make_daemon("consumers:\n  - {name: stats, class: stats}\n" + f"""
outputs:
  tiled: {{enabled: true, uri: "http://127.0.0.1:{port}/api/v1", api_key: x, write_interval_s: 0.05}}
""")
    uid, head, events, stop, spectra = grid_docs()
    for name, doc in head + events + [stop]:
        daemon.router.submit(Document(name, doc, "test", time.time()))
    assert daemon.router.wait_idle(30)
    wait_for(lambda: scrape(daemon.http.url)[("beamlens_output_failures_total", (("output", "tiled"),))] >= 1)
    assert daemon.store.get(uid).status == "success"
    np.testing.assert_allclose(served(daemon, uid, "stats", "total"), spectra.sum(axis=1).reshape(NY, NX), rtol=1e-12)
    status, _, _ = http_get(daemon.http.url + "/health")
    assert status == 200


def test_tiled_config_is_checked_and_the_api_key_never_dumped():
    from beamlens.daemon.config import ConfigError, load_config
    config = load_config(text="outputs:\n  tiled: {enabled: true, api_key: s3cret}\n", environ={})
    assert config.outputs.tiled.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in json.dumps(config.model_dump(mode="json", by_alias=True))  # as run files record it
    with pytest.raises(ConfigError, match="outputs.tiled.uri"):
        load_config(text="outputs:\n  tiled: {uri: 'ftp://x'}\n", environ={})
