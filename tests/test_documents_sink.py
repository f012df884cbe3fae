"""Derived Bluesky documents through a real bluesky 0MQ Proxy to a real RemoteDispatcher.

One proxy carries both the raw run (no prefix) and the derived runs (prefix ``beamlens``), as at a
facility with one proxy: the daemon must not consume its own output, and a RemoteDispatcher that
filters on the prefix sees only derived runs. Every received document is validated against
event_model's schemas and its values are compared with numpy on the raw data.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import defaultdict
from typing import Any

import h5py
import numpy as np
import pytest
from bluesky.callbacks.zmq import Publisher, RemoteDispatcher
from event_model import DocumentNames, schema_validators, unpack_event_page

from beamlens.daemon.documents import make_deserializer, msgpack_serializer
from beamlens.daemon.placement import flat_positions
from beamlens.daemon.sim.datasets import stxm_map

from helpers import http_get, scrape, source_yaml, subscribe, wait_for, wait_run_finished

CONSUMERS = """
consumers:
  - {name: stats, class: stats, params: {units: OD}}
  - {name: pca, class: pca, params: {n_components: 2, batch_size: 16}}
"""


def outputs_yaml(proxy_in: str) -> str:
    return f"""
outputs:
  documents: {{enabled: true, address: "{proxy_in}", prefix: beamlens, event_interval_s: 0.05}}
"""


class Collector:
    """A RemoteDispatcher (msgpack, prefix ``beamlens``) in its own thread, recording documents."""

    def __init__(self, proxy_out: str, proxy_in: str):
        self.docs: list[tuple[str, dict[str, Any]]] = []
        self.marker = f"handshake-{uuid.uuid4()}"
        self.dispatcher = RemoteDispatcher(proxy_out, prefix=b"beamlens", deserializer=make_deserializer("msgpack"))
        self.dispatcher.subscribe(self)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._handshake(proxy_in)

    def _run(self) -> None:
        try:
            self.dispatcher.start()
        except asyncio.CancelledError:  # close(): the poll task was cancelled; start() cleans up
            pass

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if doc.get("uid") == self.marker:  # handshake markers, also those still in flight after it
            self.marker_seen = True
            return
        self.docs.append((name, doc))

    def _handshake(self, proxy_in: str) -> None:
        """Publish marker RunStarts until one arrives (PUB/SUB slow joiner); markers are never kept."""
        publisher = Publisher(proxy_in, prefix=b"beamlens", serializer=msgpack_serializer)
        self.marker_seen = False
        try:
            def arrived() -> bool:
                publisher("start", {"uid": self.marker, "time": time.time()})
                return self.marker_seen
            wait_for(arrived, timeout=30, interval=0.05)
        finally:
            publisher.close()

    def close(self) -> None:
        self.dispatcher.loop.call_soon_threadsafe(self.dispatcher._task.cancel)
        self.thread.join(10)

    def runs(self) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Documents by derived run uid (events keyed through their descriptors)."""
        by_run: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        descriptor_run = {}
        resource_run = {}
        for name, doc in list(self.docs):
            if name == "start":
                run = doc["uid"]
            elif name == "resource":
                run = resource_run[doc["uid"]] = doc["run_start"]
            elif name == "datum":
                run = resource_run[doc["resource"]]
            elif name == "descriptor":
                run = descriptor_run[doc["uid"]] = doc["run_start"]
            elif name in ("event", "event_page"):
                run = descriptor_run[doc["descriptor"]]
            else:
                run = doc["run_start"]
            by_run[run].append((name, doc))
        return by_run


@pytest.fixture
def collector(proxy):
    c = Collector(proxy.out_address, proxy.in_address)
    yield c
    c.close()


def events_of(docs: list[tuple[str, dict[str, Any]]], descriptor: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, doc in docs:
        if name == "event" and doc["descriptor"] == descriptor["uid"]:
            out.append(doc)
        elif name == "event_page" and doc["descriptor"] == descriptor["uid"]:
            out.extend(unpack_event_page(doc))
    return out


def test_derived_runs_are_valid_and_carry_the_consumer_values(proxy, beamline, make_daemon, collector):
    daemon = make_daemon(source_yaml(proxy.out_address) + CONSUMERS + outputs_yaml(proxy.in_address))
    subscribe(daemon, proxy)
    data = stxm_map().region(slice(60, 70), slice(40, 48))  # 10 x 8 points
    raw_uid = beamline.map_scan(data, snake=True)
    wait_run_finished(daemon, raw_uid)
    wait_for(lambda: sum(n == "stop" for n, _ in collector.docs) == 2, timeout=30)

    for name, doc in collector.docs:
        schema_validators[DocumentNames[name]].validate(doc)
    runs = {docs[0][1]["plan_name"]: docs for docs in collector.runs().values()}
    assert set(runs) == {"beamlens:stats", "beamlens:pca"}, "the daemon must not re-consume its own output"
    raw = daemon.store.get(raw_uid)
    expected_total = data.spectra.astype(np.float64).sum(axis=-1)

    # -- stats: every point once, with its value, placed by the raw seq_num -------------------
    docs = runs["beamlens:stats"]
    start = docs[0][1]
    assert start["original_run_uid"] == raw_uid and start["shape"] == [10, 8] and start["scan_id"] == raw.start_doc["scan_id"]
    assert start["beamlens"]["class"] == "beamlens.consumers.stats:StatsConsumer"
    assert start["beamlens"]["params"]["units"] == "OD"
    descriptors = {d["name"]: d for n, d in docs if n == "descriptor"}
    assert set(descriptors) == {"primary", "maps"}
    key = descriptors["primary"]["data_keys"]["total"]
    assert key["dtype"] == "number" and key["shape"] == [] and key["units"] == "OD" and key["dims"] == []
    events = events_of(docs, descriptors["primary"])
    seq_nums = [e["seq_num"] for e in events]
    assert sorted(seq_nums) == list(range(1, 81))
    positions = flat_positions(np.asarray(seq_nums), (10, 8), raw.snaking)
    assert [e["data"]["nav_index"] for e in events] == positions.tolist()
    np.testing.assert_allclose([e["data"]["total"] for e in events], expected_total.ravel()[positions], rtol=1e-12)
    assert start["plan_type"] == "beamlens" and start["motors"] == ["sample_y", "sample_x"]
    assert start["hints"]["dimensions"] == [[["sample_y"], "primary"], [["sample_x"], "primary"]]
    for e in events:  # each point carries the motor positions it was measured at
        iy, ix = np.unravel_index(e["data"]["nav_index"], (10, 8))
        assert e["data"]["sample_y"] == pytest.approx(data.y[iy]) and e["data"]["sample_x"] == pytest.approx(data.x[ix])
    rows = events_of(docs, descriptors["maps"])  # one event per row of the map
    assert descriptors["maps"]["data_keys"]["total"]["shape"] == [8]
    assert descriptors["maps"]["data_keys"]["total"]["dims"] == ["scan_dim_1"]
    assert [r["data"]["row"] for r in rows] == list(range(10))
    np.testing.assert_allclose([r["data"]["total"] for r in rows], expected_total, rtol=1e-12)
    stop = docs[-1][1]
    assert docs[-1][0] == "stop" and stop["exit_status"] == "success"
    assert stop["num_events"] == {"primary": 80, "maps": 10}

    # -- pca: final maps and spectra equal what the daemon serves ----------------------------
    docs = runs["beamlens:pca"]
    descriptors = {d["name"]: d for n, d in docs if n == "descriptor"}
    assert set(descriptors) == {"primary", "summary", "maps"}
    # (2, n_energy) components: one 1-D key per component (TiledWriter's tables hold at most 1-D cells)
    comp = descriptors["summary"]["data_keys"]["components_1"]
    assert comp["shape"] == [len(data.energy)] and comp["dims"] == ["energy"]
    assert "components" not in descriptors["summary"]["data_keys"]
    config = descriptors["summary"]["configuration"]["pca"]
    assert config["data_keys"]["energy"]["units"] == "eV"
    np.testing.assert_allclose(config["data"]["energy"], data.energy)
    summaries = events_of(docs, descriptors["summary"])
    assert len(summaries) >= 2, "the summary is published as the fit improves, not only at the end"
    served = {b: http_get(f"{daemon.http.url}/api/runs/{raw_uid}/pca/{b}.json")[1] for b in ("components", "score_1")}
    np.testing.assert_allclose([summaries[-1]["data"][f"components_{i}"] for i in (1, 2)],
                               json.loads(served["components"])["data"], rtol=1e-12)
    rows = events_of(docs, descriptors["maps"])
    np.testing.assert_allclose([r["data"]["score_1"] for r in rows], json.loads(served["score_1"])["data"], rtol=1e-12)

    metrics = scrape(daemon.http.url)
    assert metrics[("beamlens_documents_published_total", (("type", "stop"),))] == 2
    assert metrics[("beamlens_output_failures_total", (("output", "documents"),))] == 0


def test_large_buffers_are_resource_datum_references_into_the_run_file(proxy, make_daemon, collector, tmp_path):
    """The defects consumer's 3-D buffers (per-frame defect positions, class patches) do not fit in
    events: the derived run's ``external`` stream references them in the NeXus run file
    (Resource/Datum), and event_model's Filler with beamlens' h5py handler resolves them to the
    arrays the daemon holds."""
    from event_model import Filler

    from beamlens.daemon.sinks.external import SPEC, NexusDatasetHandler
    from frame_helpers import defects_movie_daemon

    runs_dir = tmp_path / "runs"
    daemon, _ = defects_movie_daemon(make_daemon, 12, outputs=outputs_yaml(proxy.in_address)
                                     + f"  files: {{enabled: true, directory: '{runs_dir}'}}\n")
    wait_for(lambda: any(n == "stop" for n, _ in collector.docs), timeout=60)
    (raw,) = daemon.store.summaries()
    wait_for(lambda: list(runs_dir.glob("*.nxs")), timeout=30)  # written after the RunStop
    (docs,) = collector.runs().values()
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    (resource,) = [d for n, d in docs if n == "resource"]
    assert resource["spec"] == SPEC and resource["resource_kwargs"] == {"run_uid": raw["uid"]}
    assert (runs_dir / resource["resource_path"]).is_file()
    (external,) = [d for n, d in docs if n == "descriptor" and d["name"] == "external"]
    keys = external["data_keys"]
    assert {"positions", "class_patches"} <= set(keys)
    assert all(k["external"] == "FILESTORE:" for k in keys.values())
    positions = daemon.store.snapshot(raw["uid"], "defects", "positions").data
    assert keys["positions"]["shape"] == list(positions.shape) and positions.ndim == 3
    assert keys["positions"]["units"] == "px"
    assert "components" not in keys and "total" not in keys  # carried in full by the other streams

    filled = []
    with Filler({SPEC: NexusDatasetHandler}, inplace=False) as filler:
        for name, doc in docs:
            name, doc = filler(name, doc)
            if name == "event" and doc["descriptor"] == external["uid"]:
                filled.append(doc)
    (event,) = filled
    assert all(event["filled"].values())
    for name in keys:
        served = daemon.store.snapshot(raw["uid"], "defects", name).data
        np.testing.assert_array_equal(event["data"][name], served)
    assert np.isfinite(event["data"]["positions"]).any(), "no defect listed"
    stop = docs[-1][1]
    assert stop["num_events"]["external"] == 1
    # private state buffers stay unpublished: not in any stream, not in the run file
    slot = next(sl for sl in daemon.store.get(raw["uid"]).slots if sl.name == "defects")
    private = {n for n, sp in slot.buffers.specs.items() if sp.private}
    assert private
    published = {k for n, d in docs if n == "descriptor" for k in d["data_keys"]}
    assert not private & published
    with h5py.File(runs_dir / resource["resource_path"], "r") as f:
        assert not private & set(f["entry/defects"])


def test_documents_output_is_off_by_default(make_daemon):
    daemon = make_daemon(CONSUMERS)
    assert daemon.config.outputs.documents.enabled is False
    assert daemon.documents is None
