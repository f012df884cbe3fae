"""The daemon's pool: stages run concurrently but reach ``process`` in batch order, a failing stage
costs only its batch (counted as the consumer's failure), and pool time is timed and charged to the
consumer that asked for it."""
from __future__ import annotations

import numpy as np

from beamlens.daemon.config import load_config
from beamlens.daemon.documents import Document
from beamlens.daemon.metrics import Metrics
from beamlens.daemon.results import RunStore
from beamlens.daemon.router import Router
from fault_consumers import OrderedStage
from helpers import map_run_documents


def routed(consumers: str, docs, router="{pool_workers: 4, max_page_size: 1}"):
    config = load_config(text=f"consumers:\n{consumers}router: {router}\n", environ={})
    metrics, store = Metrics(), RunStore()
    r = Router(config, metrics, store)
    r.start()
    try:
        for name, doc in docs:
            r.submit(Document(name, doc, "test", 0.0))
        assert r.wait_idle(60)
        assert store.wait_finished(docs[0][1]["uid"], 60)
    finally:
        r.stop()
    return store.get(docs[0][1]["uid"]), metrics


def test_stages_reach_process_in_batch_order():
    docs = map_run_documents(np.random.default_rng(0).random((60, 4)))
    run, metrics = routed("  - {name: st, class: 'fault_consumers:OrderedStage'}\n", docs)
    assert run.status == "success"
    assert OrderedStage.order[run.uid] == list(range(1, 61))
    assert np.all(run.slots[0].arrays["seen"] == 1.0)
    m = metrics.registry.get_sample_value
    assert m("beamlens_consumer_jobs_total", {"consumer": "st", "method": "stage", "outcome": "ok"}) == 60
    assert m("beamlens_consumer_processing_seconds_count", {"consumer": "st", "method": "stage"}) == 60
    assert m("beamlens_consumer_processing_seconds_sum", {"consumer": "st", "method": "stage"}) >= 60 * 0.002


def test_a_failing_stage_costs_only_its_batch():
    docs = map_run_documents(np.random.default_rng(1).random((30, 4)))
    run, metrics = routed("  - {name: st, class: 'fault_consumers:OrderedStage', params: {fail_every: 10}}\n"
                          "  - {name: stats, class: stats}\n", docs)
    assert run.status == "success"
    assert OrderedStage.order[run.uid] == [k for k in range(1, 31) if k % 10]
    seen = run.slots[0].arrays["seen"]
    assert np.isnan(seen[[9, 19, 29]]).all() and np.sum(seen == 1.0) == 27
    m = metrics.registry.get_sample_value
    assert m("beamlens_consumer_failures_total", {"consumer": "st"}) == 3
    assert m("beamlens_consumer_jobs_total", {"consumer": "st", "method": "stage", "outcome": "failed"}) == 3
    assert np.isfinite(run.slots[1].arrays["total"]).all()  # the other consumer never noticed
