"""Hostile and broken input on the bluesky path: each is counted under its reason, nothing in it runs,
and a good run afterwards is processed fully."""
from __future__ import annotations

import os
import pickle
import time

import msgpack
import msgpack_numpy
import numpy as np
from event_model import compose_run

from beamlens.daemon.sim.datasets import corroding_steel_map
from helpers import RawPublisher, scrape, source_yaml, subscribe, wait_for, wait_run_finished

CONSUMERS = "consumers:\n  - {name: stats, class: stats}\n  - {name: pca, class: pca}\n"


class _Exploit:
    """Unpickling this would create a file: proof that nothing in a message runs."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def pack(doc: dict) -> bytes:
    return msgpack.packb(doc, default=msgpack_numpy.encode)


def test_hostile_messages_are_counted_and_harmless(proxy, beamline, make_daemon, tmp_path):
    # one unknown descriptor's events may be held (joining a run mid-way); a second one's are rejected
    daemon = make_daemon(source_yaml(proxy.out_address, max_message_bytes=100000) + CONSUMERS
                         + "router: {midway_max_descriptors: 1}\n")
    raw = RawPublisher(proxy.in_address)
    try:
        raw.ready(daemon)
        marker = tmp_path / "pwned"
        bundle = compose_run()
        desc = bundle.compose_descriptor(name="primary", data_keys={"x": {"source": "s", "dtype": "number", "shape": []}})
        event = desc.compose_event(data={"x": 1.0}, timestamps={"x": time.time()})
        other = bundle.compose_descriptor(name="other", data_keys={"y": {"source": "s", "dtype": "number", "shape": []}})
        event2 = other.compose_event(data={"y": 1.0}, timestamps={"y": time.time()})
        orphan_stop = compose_run().compose_stop()
        # msgpack-numpy's own decoder would unpickle this object array
        object_array = {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1], b"data": pickle.dumps(_Exploit(str(marker)))}
        hostile = {
            # (bytes not starting with the subscribed prefix + b" " never pass 0MQ's subscription filter)
            "malformed": [b" " + os.urandom(200).replace(b" ", b"x")],
            "undecodable": [b" start " + os.urandom(300),                                    # random payload
                            b" start " + pack(bundle.start_doc)[:-7],                        # truncated
                            b" start " + pickle.dumps(_Exploit(str(marker)))],               # pickle, refused
            "unsafe_array": [b" event " + msgpack.packb({**event, "data": {"x": object_array}})],
            "schema_invalid": [b" start " + pack({"uid": 42, "time": "noon"})],
            "unknown_document_type": [b" bogus " + pack({})],
            "oversized": [b" start " + b"\x00" * 150_000],
            "too_deep": [b" start " + msgpack.packb(_nested(200))],
            "event_before_descriptor": [b" start " + pack(bundle.start_doc), b" event " + pack(event),
                                        b" event " + pack(event2)],
            "stop_for_unknown_run": [b" stop " + pack(orphan_stop)],
        }
        for messages in hostile.values():
            for m in messages:
                raw.send(m)

        def counted():
            m = scrape(daemon.http.url)
            return all(m.get(("beamlens_bad_messages_total", (("reason", r), ("source", "test"))), 0) >= 1 for r in hostile)
        wait_for(counted, timeout=30)
        m = scrape(daemon.http.url)
        assert m[("beamlens_bad_messages_total", (("reason", "undecodable"), ("source", "test")))] == 3
        assert not marker.exists(), "a pickle in a message was executed"
    finally:
        raw.close()

    # the daemon is still healthy: a good run afterwards is analysed fully
    subscribe(daemon, proxy)
    steel = corroding_steel_map().region(slice(0, 6), slice(0, 7))
    uid = beamline.map_scan(steel)
    wait_run_finished(daemon, uid)
    run = daemon.store.get(uid)
    assert run.status == "success" and run.events_done == 42 and run.progress == 1.0
    total = daemon.store.snapshot(uid, "stats", "total").data
    np.testing.assert_allclose(total, steel.spectra.astype(float).sum(-1), rtol=1e-12)


def _nested(depth: int):
    node: object = 1
    for _ in range(depth):
        node = [node]
    return {"uid": "deep", "time": 0, "x": node}


def test_nan_spectra_are_skipped_and_counted(proxy, beamline, make_daemon):
    daemon = make_daemon(source_yaml(proxy.out_address) + CONSUMERS)
    subscribe(daemon, proxy)
    steel = corroding_steel_map().region(slice(0, 5), slice(0, 6))
    steel.spectra = steel.spectra.copy()
    steel.spectra[1, 2, 10] = np.nan
    steel.spectra[3, 4, :] = np.inf
    uid = beamline.map_scan(steel)
    wait_run_finished(daemon, uid)
    m = scrape(daemon.http.url)
    for consumer in ("stats", "pca"):
        assert m[("beamlens_points_skipped_total", (("consumer", consumer), ("reason", "nonfinite")))] == 2
    total = daemon.store.snapshot(uid, "stats", "total").data
    assert np.isnan(total[1, 2]) and np.isnan(total[3, 4])
    assert np.isfinite(np.delete(total.ravel(), [1 * 6 + 2, 3 * 6 + 4])).all()
    assert np.isfinite(daemon.store.snapshot(uid, "pca", "score_1").data[0, 0])
    assert daemon.store.get(uid).status == "success"
