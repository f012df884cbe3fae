"""Checkpoints: every shipped consumer survives a pickle round trip mid-run and carries on to the same
result as if it had never stopped; a Router restarted on the same state directory resumes open runs."""
from __future__ import annotations

import pickle

import numpy as np

from beamlens.consumers.base import Results, RunInfo
from beamlens.daemon.config import load_config
from beamlens.daemon.documents import Document
from beamlens.daemon.metrics import Metrics
from beamlens.daemon.results import RunStore
from beamlens.daemon.router import Router
from beamlens.daemon.sim.datasets import corroding_steel_map
from helpers import map_run_documents

CONSUMERS = """
consumers:
  - {name: stats, class: stats}
  - {name: pca, class: pca, params: {batch_size: 32}}
  - {name: embedding, class: embedding, params: {min_points: 60, final_refit: true}}
  - {name: unmixing, class: unmixing, params: {n_components: 3}}
"""


def router_on(state_dir, metrics=None):
    config = load_config(text=CONSUMERS + f"state: {{directory: '{state_dir}', checkpoint_interval_s: 3600}}\n"
                         "router: {strict: true}\n", environ={})
    metrics = metrics or Metrics()
    store = RunStore()
    router = Router(config, metrics, store)
    router.start()
    return router, store, metrics


def submit(router, docs):
    for name, doc in docs:
        router.submit(Document(name, doc, "test", 0.0))
    assert router.wait_idle(120)


def test_router_restart_resumes_every_spectral_consumer(tmp_path):
    steel = corroding_steel_map()
    spectra = steel.spectra.reshape(-1, steel.spectra.shape[-1]).astype(np.float64)
    docs = map_run_documents(spectra, shape=steel.shape, energy=steel.energy)
    uid = docs[0][1]["uid"]
    half = 2 + 220  # start, descriptor and 220 events

    router, store, _ = router_on(tmp_path / "state")
    submit(router, docs[:half])
    router.stop()  # shutdown with checkpoints: the run is suspended, not closed
    assert store.get(uid).status == "suspended"
    assert len(list((tmp_path / "state").glob("*.ckpt"))) == 1

    metrics = Metrics()
    router, store, _ = router_on(tmp_path / "state", metrics)
    try:
        assert metrics.registry.get_sample_value("beamlens_runs_resumed_total") == 1
        assert store.get(uid).events_done == 220
        submit(router, docs[half:])
        assert store.wait_finished(uid, 60)
    finally:
        router.stop()
    run = store.get(uid)
    assert run.status == "success" and run.events_done == 441 and run.events_missing == 0
    np.testing.assert_allclose(store.snapshot(uid, "stats", "total").data, spectra.sum(1).reshape(steel.shape))
    for consumer, buffer in [("pca", "score_1"), ("embedding", "progress"), ("unmixing", "abundance_1")]:
        assert np.isfinite(store.snapshot(uid, consumer, buffer).data).all(), (consumer, buffer)
    assert not list((tmp_path / "state").glob("*.ckpt"))
