"""Consumer isolation, run timeouts and mid-run joins, driven through a real Router in-process."""
from __future__ import annotations

import threading
import time

import numpy as np

from beamlens.daemon.config import load_config
from beamlens.daemon.documents import Document
from beamlens.daemon.metrics import Metrics
from beamlens.daemon.results import RunStore
from beamlens.daemon.router import Router
from helpers import map_run_documents, route_in_process, wait_for

SPECTRA = np.random.default_rng(0).random((100, 32))


def value(metrics, name, **labels):
    v = metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_consumer_raising_every_tenth_event_loses_only_its_own_points():
    config = """
router: {max_page_size: 1, max_failures_per_run: 50}
consumers:
  - {name: flaky, class: "fault_consumers:Flaky", params: {every: 10}}
  - {name: stats, class: stats}
"""
    first = map_run_documents(SPECTRA, shape=(10, 10))
    second = map_run_documents(SPECTRA, shape=(10, 10))
    _, store, metrics = route_in_process(config, first + second)
    for docs in (first, second):
        uid = docs[0][1]["uid"]
        assert store.get(uid).status == "success"
        np.testing.assert_allclose(store.snapshot(uid, "stats", "total").data.ravel(), SPECTRA.sum(1))
        seen = store.snapshot(uid, "flaky", "seen").data.ravel()
        assert np.isnan(seen[9::10]).all() and (seen[np.arange(100) % 10 != 9] == 1).all()
    assert value(metrics, "beamlens_consumer_failures_total", consumer="flaky") == 20
    assert value(metrics, "beamlens_consumer_failures_total", consumer="stats") == 0
    assert value(metrics, "beamlens_events_processed_total") == 200


def test_repeated_failures_quarantine_for_the_run_only():
    config = """
router: {max_page_size: 1, max_failures_per_run: 3}
consumers:
  - {name: flaky, class: "fault_consumers:Flaky", params: {every: 2}}
  - {name: stats, class: stats}
"""
    first = map_run_documents(SPECTRA[:20])
    second = map_run_documents(SPECTRA[:20])
    _, store, metrics = route_in_process(config, first + second)
    assert value(metrics, "beamlens_consumers_quarantined_total", consumer="flaky", reason="failures") == 2
    assert value(metrics, "beamlens_consumer_failures_total", consumer="flaky") == 6  # 3 per run, then quiet
    for docs in (first, second):
        summary = store.get(docs[0][1]["uid"]).summary()
        assert summary["consumers"]["flaky"]["quarantined"] and summary["consumers"]["stats"]["active"]
        np.testing.assert_allclose(store.snapshot(docs[0][1]["uid"], "stats", "total").data, SPECTRA[:20].sum(1))


def test_slow_consumer_is_shed_and_intake_never_drops_a_document():
    config = load_config(text="""
router: {document_queue_size: 60, max_page_size: 1, shed_queue_fraction: 0.5}
consumers:
  - {name: sleepy, class: "fault_consumers:Sleepy", params: {seconds_per_page: 0.05}}
  - {name: stats, class: stats}
""", environ={})
    metrics, store = Metrics(), RunStore()
    router = Router(config, metrics, store)
    router.start()
    docs = map_run_documents(SPECTRA, shape=(10, 10))
    try:
        feeder = threading.Thread(target=lambda: [router.submit(Document(n, d, "test", time.time())) for n, d in docs])
        feeder.start()
        feeder.join(60)
        assert not feeder.is_alive()
        assert store.wait_finished(docs[0][1]["uid"], 60)
    finally:
        router.stop()
    uid = docs[0][1]["uid"]
    summary = store.get(uid).summary()
    assert summary["consumers"]["sleepy"]["quarantined"] and summary["events_done"] == 100
    assert value(metrics, "beamlens_consumers_quarantined_total", consumer="sleepy", reason="too_slow") == 1
    np.testing.assert_allclose(store.snapshot(uid, "stats", "total").data.ravel(), SPECTRA.sum(1))
    assert metrics.registry.get_sample_value("beamlens_bad_messages_total", {"source": "test", "reason": "router_error"}) is None


def test_run_without_stop_times_out_as_incomplete_and_counts_gaps():
    config = load_config(text="router: {run_timeout_s: 0.5}\nconsumers:\n  - {name: stats, class: stats}\n", environ={})
    metrics, store = Metrics(), RunStore()
    router = Router(config, metrics, store)
    router.start()
    docs = map_run_documents(SPECTRA[:10], shape=(2, 5))[:-1]  # no RunStop
    del docs[5]  # the event with seq_num 4 never arrives
    try:
        for name, doc in docs:
            router.submit(Document(name, doc, "test", time.time()))
        uid = docs[0][1]["uid"]
        wait_for(lambda: store.get(uid) is not None and store.get(uid).status == "incomplete", timeout=10)
    finally:
        router.stop()
    assert value(metrics, "beamlens_runs_total", exit_status="incomplete") == 1
    assert value(metrics, "beamlens_events_missing_total") == 1
    assert store.get(uid).summary()["events_missing"] == 1


def test_events_announced_by_the_run_stop_but_never_received_are_counted():
    docs = map_run_documents(SPECTRA[:10], shape=(2, 5))
    del docs[3:6]  # three events lost upstream
    _, store, metrics = route_in_process("consumers:\n  - {name: stats, class: stats}\n", docs)
    assert docs[-1][1]["num_events"] == {"primary": 10}
    assert value(metrics, "beamlens_events_missing_total") == 3
    assert store.get(docs[0][1]["uid"]).status == "success"


def test_joining_mid_run_analyses_what_follows():
    docs = map_run_documents(SPECTRA[:30], shape=(5, 6))
    joined = docs[1:]  # the RunStart was missed
    _, store, metrics = route_in_process("consumers:\n  - {name: stats, class: stats}\n", joined)
    uid = docs[0][1]["uid"]
    run = store.get(uid)
    assert run.joined_midway and run.status == "success" and run.events_done == 30
    np.testing.assert_allclose(store.snapshot(uid, "stats", "total").data, SPECTRA[:30].sum(1))
    assert value(metrics, "beamlens_runs_joined_midway_total") == 1
