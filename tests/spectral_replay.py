"""Replay a spectral map through the real Router in-process (no sockets): documents made with
event_model.compose_run, one Event per scan point, exactly as a grid_scan publishes them."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from event_model import compose_run

from beamlens.daemon.config import load_config
from beamlens.daemon.documents import Document
from beamlens.daemon.metrics import Metrics
from beamlens.daemon.results import RunStore
from beamlens.daemon.router import Router
from beamlens.daemon.sim.datasets import SpectralMap


@dataclass
class Replay:
    router: Router
    store: RunStore
    metrics: Metrics
    uid: str

    def get(self, consumer: str, buffer: str) -> np.ndarray:
        return self.store.snapshot(self.uid, consumer, buffer).data

    def consumer(self, name: str):
        run = self.store.get(self.uid)
        return next(s.consumer for s in run.slots if s.name == name)


def replay(consumers_yaml: str, data: SpectralMap, *, order: np.ndarray | None = None, stop: bool = True,
           timeout: float = 120.0, settle_after: int | None = None, page_size: int = 256,
           axis_key: str | None = "xas_energy", axis_units: str | None = None) -> Replay:
    """Feed ``data`` point by point (raster order, or ``order`` of flat indices) to a Router.

    The router runs in strict mode, so a consumer exception fails the test.

    Args:
        settle_after: after this many events, wait until the router is idle and every consumer's
            background refits have finished, so what follows meets a fitted model (deterministic
            whatever the machine's speed).
        page_size: the router's ``max_page_size``.
        axis_key: configuration key that carries ``data.energy`` as the signal axis (None: the
            descriptor declares no axis); axis_units: its ``units`` in the configuration data keys.
    """
    config = load_config(text=consumers_yaml + f"\nrouter: {{strict: true, max_page_size: {page_size}}}\n", environ={})
    metrics, store = Metrics(), RunStore()
    router = Router(config, metrics, store)
    router.start()
    ny, nx = data.shape
    n_ch = len(data.energy)
    run = compose_run(metadata={"shape": [ny, nx], "snaking": [False, False], "plan_name": "grid_scan"})
    axis_meta = {"source": "sim", "dtype": "array", "shape": [n_ch], **({"units": axis_units} if axis_units else {})}
    configuration = {} if axis_key is None else {
        "xas": {"data": {axis_key: data.energy.tolist()}, "timestamps": {axis_key: time.time()},
                "data_keys": {axis_key: axis_meta}}}
    desc = run.compose_descriptor(
        name="primary",
        data_keys={"xas_spectrum": {"source": "sim", "dtype": "array", "shape": [n_ch]}},
        configuration=configuration,
        object_keys={"xas": ["xas_spectrum"]})
    now = time.time()

    def submit(name: str, doc: dict) -> None:
        router.submit(Document(name, dict(doc), "test", now))

    submit("start", run.start_doc)
    submit("descriptor", desc.descriptor_doc)
    flat = data.spectra.reshape(ny * nx, n_ch)
    for count, i in enumerate(np.arange(ny * nx) if order is None else order):
        if count == settle_after:
            _settle(router, store, run.start_doc["uid"], timeout)
        submit("event", desc.compose_event(data={"xas_spectrum": flat[i].astype(np.float64)},
                                           timestamps={"xas_spectrum": now}, seq_num=int(i) + 1))
    if stop:
        submit("stop", run.compose_stop())
    try:
        assert router.wait_idle(timeout), "router did not finish in time"
    finally:
        if stop:
            router.stop()
    return Replay(router, store, metrics, run.start_doc["uid"])


def _settle(router: Router, store: RunStore, uid: str, timeout: float) -> None:
    """Wait until the router is idle and every background job of the run's consumers (refits on
    the daemon's pool) has been installed."""
    assert router.wait_idle(timeout), "router did not finish in time"
    deadline = time.monotonic() + timeout
    for slot in store.get(uid).slots:
        while slot.jobs:
            assert time.monotonic() < deadline, f"{slot.name}: background jobs still running"
            time.sleep(0.01)
