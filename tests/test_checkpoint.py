"""Checkpoints (buffers + versioned JSON, no pickle): a Router restarted on the same state directory
resumes open runs with every consumer's buffers; an old-format (pickle) or tampered checkpoint is
refused as a whole, moved aside, and the run is analysed from where it can be (joined mid-run).
Consumer-level round trips are in each consumer's tests (``tests/partitions.checkpoint_round_trip``)."""
from __future__ import annotations

import json
import logging
import pickle
import zipfile

import numpy as np
import pytest

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


def router_on(state_dir, metrics=None, consumers=CONSUMERS, router="{strict: true}"):
    config = load_config(text=consumers + f"state: {{directory: '{state_dir}', checkpoint_interval_s: 3600}}\n"
                         f"router: {router}\n", environ={})
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


STATS_ONLY = """
consumers:
  - {name: stats, class: stats}
  - {name: counting, class: "fault_consumers:Counting"}
"""
ROUTER = "{strict: true, midway_hold_s: 0.1}"
EXPLODED = []


def _explode():
    EXPLODED.append(True)
    return {}


class _Payload:
    def __reduce__(self):
        return (_explode, ())


def _half_run(tmp_path):
    rng = np.random.default_rng(4)
    spectra = rng.poisson(30.0, size=(40, 16)).astype(np.float64)
    docs = map_run_documents(spectra)
    return spectra, docs, docs[0][1]["uid"], 2 + 20


def _resumes_from_where_it_can(tmp_path, spectra, docs, uid, half, metrics):
    """The refused run's remaining documents still analyse: joined mid-run, second half exact."""
    router, store, _ = router_on(tmp_path / "state", metrics, STATS_ONLY, ROUTER)
    try:
        assert metrics.registry.get_sample_value("beamlens_checkpoints_total", {"operation": "restore", "outcome": "failed"}) == 1
        assert metrics.registry.get_sample_value("beamlens_runs_resumed_total") == 0
        assert store.get(uid) is None  # nothing half-loaded
        submit(router, docs[half:])
        (run,) = [r for r in store.runs() if r.joined_midway]  # its events name their descriptor, not the run
        assert store.wait_finished(run.uid, 60)
    finally:
        router.stop()
    assert run.status == "success"
    total = store.snapshot(run.uid, "stats", "total").data.ravel()
    np.testing.assert_array_equal(total[20:], spectra[20:].sum(1))
    assert np.isnan(total[:20]).all()
    assert list((tmp_path / "state").glob("*.ckpt.bad"))


def test_old_format_pickle_checkpoint_is_refused_unopened(tmp_path, caplog):
    spectra, docs, uid, half = _half_run(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / f"{uid}.ckpt").write_bytes(pickle.dumps({"format": 1, "uid": uid, "payload": _Payload()}))
    with caplog.at_level(logging.ERROR, logger="beamlens.daemon.checkpoint"):
        _resumes_from_where_it_can(tmp_path, spectra, docs, uid, half, Metrics())
    assert not EXPLODED, "the old checkpoint was unpickled"
    assert "old-format checkpoint" in caplog.text and "no longer unpickled" in caplog.text


def _rewrite(path, change):
    """Rewrite the checkpoint zip with ``change(name, bytes) -> bytes`` applied to each member."""
    with zipfile.ZipFile(path) as z:
        members = [(n, z.read(n)) for n in z.namelist()]
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members:
            z.writestr(n, change(n, data))


def _flip_array(name, data):
    if name == "s0.total.npy":
        return data[:-8] + np.float64(1e9).tobytes()  # same shape and dtype, one value changed
    return data


def _change_layout(name, data):
    if name == "checkpoint.json":
        state = json.loads(data)
        state["slots"][1]["buffers"]["events"]["dtype"] = "<f8"
        return json.dumps(state).encode()
    return data


@pytest.mark.parametrize("tamper", ["array", "layout", "truncated", "json"])
def test_tampered_checkpoint_is_refused_and_the_run_goes_on(tmp_path, tamper, caplog):
    spectra, docs, uid, half = _half_run(tmp_path)
    router, store, _ = router_on(tmp_path / "state", Metrics(), STATS_ONLY, ROUTER)
    submit(router, docs[:half])
    router.stop()
    assert store.get(uid).status == "suspended"
    (path,) = (tmp_path / "state").glob("*.ckpt")
    if tamper == "array":
        _rewrite(path, _flip_array)
    elif tamper == "layout":
        _rewrite(path, _change_layout)
    elif tamper == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        _rewrite(path, lambda n, d: d[:-3] if n == "checkpoint.json" else d)
    with caplog.at_level(logging.ERROR):
        _resumes_from_where_it_can(tmp_path, spectra, docs, uid, half, Metrics())
    assert "refused, not resumed" in caplog.text


def _suspend_and_resume(tmp_path, docs, half, consumers, before=None):
    """Route the first ``half`` documents, stop (the run is checkpointed), start a new router on the
    same state directory, check it resumed the run, route the rest; the finished run and its store."""
    uid = docs[0][1]["uid"]
    router, store, _ = router_on(tmp_path / "state", Metrics(), consumers, ROUTER)
    submit(router, docs[:half])
    router.stop()
    if before is not None:
        before(store.get(uid))
    router, store, metrics = router_on(tmp_path / "state", Metrics(), consumers, ROUTER)
    try:
        assert metrics.registry.get_sample_value("beamlens_runs_resumed_total") == 1
        submit(router, docs[half:])
        assert store.wait_finished(uid, 60)
    finally:
        router.stop()
    return store.get(uid), store


def test_untampered_checkpoint_resumes_with_private_buffers(tmp_path):
    spectra, docs, uid, half = _half_run(tmp_path)
    run, store = _suspend_and_resume(tmp_path, docs, half, STATS_ONLY)
    assert run.status == "success" and not run.joined_midway
    np.testing.assert_array_equal(store.snapshot(uid, "stats", "total").data.ravel(), spectra.sum(1))
    counting = next(s for s in run.slots if s.name == "counting")
    assert counting.buffers.events[0] == 40 and "events" not in counting.arrays  # private, kept, not published


def test_a_run_whose_consumers_sat_out_on_the_memory_budget_resumes(tmp_path):
    """Signals taken by a consumer whose buffers were refused count as not taken: the checkpoint
    restores (nothing to bind for it) and the consumer still sits out."""
    spectra, docs, uid, half = _half_run(tmp_path)
    consumers = "consumers:\n  - {name: greedy, class: 'fault_consumers:Greedy', params: {mib: 100000}}\n"

    def refused(suspended):
        assert suspended.status == "suspended" and suspended.limited == "refused"
    run, _ = _suspend_and_resume(tmp_path, docs, half, consumers, before=refused)
    assert run.status == "success" and run.events_done == 40
    assert run.slots[0].inactive_reason == "memory budget exceeded" and not run.slots[0].signals


def test_a_run_handed_over_resumes_from_its_checkpoint_when_asked(tmp_path):
    """The Kafka source's router hooks on the run core: ``hand_over`` checkpoints and suspends an
    open run on the router thread (``Router.call``), a router with ``restore_at_start`` off leaves
    checkpoints alone at start, ``resume`` reopens the run (once; asking again while it is open
    neither reopens it nor refuses the checkpoint) and the run ends with the undisturbed maps."""
    spectra, docs, uid, half = _half_run(tmp_path)
    router, store, metrics = router_on(tmp_path / "state", Metrics(), STATS_ONLY, ROUTER)
    try:
        submit(router, docs[:half])
        task = router.call(lambda: router.supervisor.hand_over([uid, "not-open"]), timeout=30)
        assert task.done.is_set() and task.result == [uid]
        assert store.get(uid).status == "suspended" and uid not in router.open_runs
    finally:
        router.stop()
    path, state, arrays = router.checkpointer.load(uid, with_arrays=False)
    assert arrays == {} and state["events_done"] == 20
    (descriptor,) = state["descriptors"]
    assert state["max_seq_num"] == {descriptor: 20}  # what the Kafka source seeds its de-duplication with

    config = load_config(text=STATS_ONLY + f"state: {{directory: '{tmp_path / 'state'}', checkpoint_interval_s: 3600}}\n"
                         f"router: {ROUTER}\n", environ={})
    metrics, store = Metrics(), RunStore()
    router = Router(config, metrics, store)
    router.restore_at_start = False
    router.start()
    try:
        assert store.get(uid) is None and metrics.registry.get_sample_value("beamlens_runs_resumed_total") == 0
        resumed = router.call(lambda: router.supervisor.resume(uid), timeout=30).result
        assert resumed is not None and resumed.events_done == 20
        assert router.call(lambda: router.supervisor.resume(uid), timeout=30).result is None
        assert path.exists() and not list((tmp_path / "state").glob("*.bad"))
        submit(router, docs[half:])
        assert store.wait_finished(uid, 60)
    finally:
        router.stop()
    run = store.get(uid)
    assert run.status == "success" and run.events_done == 40
    assert metrics.registry.get_sample_value("beamlens_runs_resumed_total") == 1
    np.testing.assert_array_equal(store.snapshot(uid, "stats", "total").data.ravel(), spectra.sum(1))
    assert not path.exists()
