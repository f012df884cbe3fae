"""Tiled sink: every run's results written into a Tiled server while the run goes, for facility
browsers and Tiled subscribers (``tiled.client``, the optional extra ``beamlens[tiled]``).

Layout under the configured container (``outputs.tiled.path``, default ``beamlens``)::

    <path>/                         container, created if missing
        <raw run uid>/              container; metadata: raw_run_uid, scan_id, plan_name, sample,
                                    status (open | finishing | success | abort | fail | incomplete;
                                    a closed one only once every buffer and the axes are written),
                                    nav_shape,
                                    beamlens_version, raw_start (the raw RunStart)
            <consumer>/             container; metadata: the consumer's provenance (class, params,
                                    version, model_sha256)
                <buffer>            array; nav: (*nav_shape, *extra_shape) map in the run's shape,
                                    NaN where no point is processed yet; sig/single: extra_shape;
                                    metadata: kind, units, description, axis, dims
                <axis>              array (eV, ...) of a sig buffer's signal axis, metadata units
            axes/<motor>            array: the scan axes in motor units, written at the RunStop
                                    (:mod:`beamlens.daemon.sinks.axes`), metadata units, dim

**Growing live.** A writer thread wakes every ``write_interval_s``, copies the buffers of every run
the router touched (documents, frames or ``"results"``; open runs also for
:data:`~beamlens.daemon.sinks.live.SETTLE_S` after their last document or frame, for results that
consumers write after the notification) from the run store, and writes what changed: a new node
with ``write_array``; a map of known shape by ``ArrayClient.patch`` of the rows (slowest axis) that
changed; a map of a run of unknown length (frame series without ``n_frames``) by
``patch(new_rows, offset=(n_old,), extend=True)``; spectra and scalars by ``patch`` of the whole
value. Each write is a Tiled update that subscribers (``node.subscribe()``) receive. The router
thread only marks runs as touched (it never waits on the network); the latest state always wins, so
nothing queues up behind a slow server.

**Failures.** The client connects lazily and reconnects after an error; every failed pass is
logged and counted in ``beamlens_output_failures_total{output="tiled"}`` and retried at the next
interval from the nodes already on the server. ``tiled.client`` retries a refused connection for
about 25 s before failing, so a dead server also delays shutdown by that much per pending pass
(``close`` waits at most 60 s). A run that leaves the run store (``router.keep_runs``)
before a successful final write is lost to Tiled (its run file and derived documents are not).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import __version__
from ..config import TiledOutputConfig
from ..metrics import Metrics
from ..results import LIVE_STATUSES, BufferSnapshot, RunState, RunStore
from .axes import RunReadings
from .live import settling
from .provenance import consumer_provenance

log = logging.getLogger(__name__)


@dataclass
class _RunNodes:
    """What has been written of one run: its container, and per ``consumer/buffer`` the node and a
    copy of the last value written."""

    container: Any
    consumers: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, Any] = field(default_factory=dict)
    written: dict[str, np.ndarray] = field(default_factory=dict)
    status: str = "open"


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise equality with NaN == NaN, reduced over all but the first axis: ``(len(a),)`` bool."""
    eq = (a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else (a == b)
    return eq.reshape(len(a), -1).all(axis=1) if a.ndim else np.asarray([bool(eq)])


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class TiledSink:
    """Router listener and writer thread putting results into a Tiled server.

    Args:
        config: the ``outputs.tiled`` section.
        metrics: counts failures (``output="tiled"``).
        store: where buffers are copied from.
        client: a ``tiled.client`` container to write under (tests, embedding); by default
            ``tiled.client.from_uri(config.uri, api_key=config.api_key)``, connected in the thread.
    """

    def __init__(self, config: TiledOutputConfig, metrics: Metrics, store: RunStore, client: Any = None):
        self.config, self.metrics, self.store = config, metrics, store
        self._client = client
        self._owned: Any = None  # a client this sink connected, closed with the sink
        self._root: Any = None
        self._touched: set[str] = set()
        self._readings = RunReadings()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._done = threading.Event()
        self._runs: dict[str, _RunNodes] = {}
        self._thread: threading.Thread | None = None
        self.passes = 0
        """Completed write passes (tests wait on it)."""
        metrics.output_failures.labels("tiled").inc(0)  # exported from the start, so increase() sees the first

    # -- router thread -----------------------------------------------------------------------
    def __call__(self, name: str, run: RunState, doc: dict[str, Any]) -> None:
        """Router hook: mark ``run`` as changed; gather its motor readings for the scan axes."""
        with self._lock:
            self._touched.add(run.uid)
            self._readings.observe(name, run, doc)
            if name == "stop":
                self._wake.set()  # write the final state now, not at the next interval

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="beamlens-tiled", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Write what is pending (final states of stopped runs included), then stop the thread."""
        if self._thread is None:
            return
        self._done.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("Tiled writes still going after %.0f s", timeout)
        self._thread = None

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.config.write_interval_s)
            self._wake.clear()
            done = self._done.is_set()
            self.write_pass()
            if done:
                self._disconnect()
                return

    # -- writer thread -----------------------------------------------------------------------
    def _connect(self) -> Any:
        if self._root is None:
            client = self._client
            if client is None:
                from tiled.client import from_uri

                self._disconnect()
                key = self.config.api_key.get_secret_value() if self.config.api_key is not None else None
                client = self._owned = from_uri(self.config.uri, api_key=key)
            path = self.config.path
            if path not in client:
                client.create_container(path, metadata={"beamlens_version": __version__,
                                                        "description": "beamlens live-analysis results by raw run uid"})
            self._root = client[path]
        return self._root

    def _disconnect(self) -> None:
        if self._owned is not None:
            try:
                self._owned.context.close()
            except Exception:
                log.debug("closing the Tiled client failed", exc_info=True)
            self._owned = None

    def write_pass(self) -> None:
        """One pass: write every touched run's changes (writer thread; also callable from tests)."""
        with self._lock:
            touched, self._touched = self._touched, set()
        touched |= settling(self.store)
        pending = set(touched)
        try:
            root = self._connect()
            for uid in sorted(touched):
                self._write_run(root, uid)
                pending.discard(uid)
        except Exception:
            self.metrics.output_failures.labels("tiled").inc()
            log.exception("Tiled write failed; retrying %d run(s) at the next interval", len(pending))
            with self._lock:
                self._touched |= pending
            self._root = None
            self._runs.clear()  # re-read the nodes from the server next time
        self.passes += 1

    def _write_run(self, root: Any, uid: str) -> None:
        run = self.store.get(uid)
        if run is None:
            return
        status = run.status
        nodes = self._runs.get(uid)
        if nodes is None:
            # never a closed status before _finish: a reader that waits for "success" must find every
            # buffer and the axes written (a run first seen closed reads "open" until then)
            shown = status if status in LIVE_STATUSES else "open"
            nodes = self._runs[uid] = _RunNodes(self._container(root, uid, self._run_metadata(run, shown)))
        for slot in run.slots:
            if not slot.specs:
                continue
            consumer = nodes.consumers.get(slot.name)
            if consumer is None:
                consumer = nodes.consumers[slot.name] = self._container(
                    nodes.container, slot.name, _jsonable(consumer_provenance(slot)))
            for buffer in list(slot.arrays):
                try:
                    snap = self.store.snapshot(uid, slot.name, buffer)
                except KeyError:
                    continue
                self._write_buffer(nodes, consumer, snap)
        if status in LIVE_STATUSES:  # a finishing run's final fit may still change its results
            return
        if nodes.status == "open":
            self._finish(nodes, run)
        nodes.status = status
        with self._lock:
            self._readings.forget(uid)
        del self._runs[uid]

    @staticmethod
    def _container(parent: Any, key: str, metadata: dict[str, Any]) -> Any:
        if key in parent:
            node = parent[key]
            node.update_metadata(metadata=metadata)
            return node
        return parent.create_container(key, metadata=metadata)

    @staticmethod
    def _run_metadata(run: RunState, status: str) -> dict[str, Any]:
        start = run.start_doc
        return _jsonable({"raw_run_uid": run.uid, "scan_id": start.get("scan_id"), "plan_name": start.get("plan_name"),
                          "sample": start.get("sample"), "status": status,
                          "nav_shape": list(run.published_nav_shape), "beamlens_version": __version__,
                          "raw_start": start})

    def _write_buffer(self, nodes: _RunNodes, consumer: Any, snap: BufferSnapshot) -> None:
        spec = snap.spec
        key = f"{snap.consumer}/{spec.name}"
        data = np.ascontiguousarray(snap.data)
        old = nodes.written.get(key)
        node = nodes.arrays.get(key)
        if node is None and spec.name in consumer:
            node = nodes.arrays[key] = consumer[spec.name]
            old = None if tuple(node.shape) != data.shape else old
        if node is None:
            dims = ([f"scan_dim_{i}" for i in range(data.ndim - len(spec.extra_shape))] if spec.kind == "nav" else [])
            dims += [f"{spec.name}_dim_{i}" for i in range(len(spec.extra_shape))]
            if spec.axis and spec.extra_shape:
                dims[-1] = spec.axis
            md = {"kind": spec.kind, "units": spec.units, "description": spec.description, "axis": spec.axis,
                  "dims": dims}
            nodes.arrays[key] = consumer.write_array(data, key=spec.name, metadata=md, dims=dims)
            if snap.axis is not None and spec.axis and spec.axis not in consumer:
                values, units = snap.axis
                consumer.write_array(np.asarray(values, dtype=np.float64), key=spec.axis,
                                     metadata={"units": units, "kind": "axis"}, dims=[spec.axis])
        elif old is None or data.shape[1:] != old.shape[1:] or data.ndim == 0:
            node.patch(data, offset=(0,) * data.ndim, extend=data.ndim > 0 and data.shape[0] > node.shape[0])
        else:
            n_old = min(len(old), len(data))
            changed = np.flatnonzero(~_same(data[:n_old], old[:n_old]))
            if changed.size:
                lo, hi = int(changed[0]), int(changed[-1]) + 1
                node.patch(data[lo:hi], offset=(lo,) + (0,) * (data.ndim - 1))
            if len(data) > len(old):  # a run of unknown length grew
                node.patch(data[len(old):], offset=(len(old),) + (0,) * (data.ndim - 1), extend=True)
        nodes.written[key] = data

    def _finish(self, nodes: _RunNodes, run: RunState) -> None:
        with self._lock:
            axes = self._readings.axes(run)
        container = self._container(nodes.container, "axes", {"description": "scan axes in motor units"})
        for axis in axes:
            if axis.name not in container:
                container.write_array(np.asarray(axis.values, dtype=np.float64), key=axis.name,
                                      metadata={"units": axis.units, "dim": axis.dim}, dims=[f"scan_dim_{axis.dim}"])
        nodes.container.update_metadata(metadata=self._run_metadata(run, run.status))
