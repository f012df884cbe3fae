"""Derived Bluesky documents: each consumer's results for a raw run, published as a run of its own.

For every raw run and every consumer with result buffers, the sink composes a derived run with
event_model's ``compose_run`` (every document is validated against event_model's schemas as it is
composed) and publishes it through a bluesky 0MQ Proxy with bluesky's own
``bluesky.callbacks.zmq.Publisher`` (msgpack, numpy arrays as msgpack-numpy), so LiveGrid, TiledWriter
or any ``RemoteDispatcher(prefix=b"beamlens")`` can consume it. The pattern is bluesky's
``LiveDispatcher`` (bluesky.callbacks.stream): the RunStart names the raw run in
``original_run_uid``.

The derived run of consumer ``C`` for raw run ``R``:

- RunStart: ``plan_name="beamlens:C"``, ``original_run_uid=R``, the raw ``scan_id``, ``shape`` and
  ``snaking`` (so a LiveGrid places points as it does for the raw run), and ``beamlens`` provenance
  (consumer class, parameters, version, ``model_sha256`` when the consumer has one).
- stream ``primary``: one event per processed scan point, carrying the raw event's ``seq_num``,
  ``nav_index`` (flat position in the map) and the value of every ``nav`` buffer at that point.
  Points are gathered and published as EventPages at most every ``event_interval_s``.
- stream ``summary``: the ``sig`` and ``single`` buffers (component spectra, explained variance,
  defect counts) as one event per interval in which they changed; signal axes (energy, eV) in the
  descriptor's ``configuration``.
- stream ``maps``: at the end, one event with every ``nav`` buffer as a whole map
  ``(*nav_shape, *extra_shape)``; consumers that refine earlier points (PCA rescoring) finish here.
- RunStop: the raw run's exit status (``incomplete`` raw runs, closed at shutdown, stop as ``abort``).

Data keys carry ``shape``, ``dims``, ``units`` and ``dtype_numpy``. Publishing happens in the router
thread (a 0MQ PUB send never blocks; a slow subscriber loses messages at the proxy's high-water
mark, as for every bluesky 0MQ subscriber).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from bluesky.callbacks.zmq import Publisher
from event_model import compose_run

from beamlens.consumers.base import BufferSpec

from ..config import DocumentsOutputConfig
from ..documents import msgpack_serializer
from ..metrics import Metrics
from ..placement import flat_positions
from ..results import ConsumerSlot, RunState
from .live import buffer_digest
from .provenance import consumer_provenance

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], None]
EXIT_STATUS = {"success": "success", "abort": "abort", "fail": "fail", "incomplete": "abort"}


def data_key(spec: BufferSpec, source: str, shape: tuple[int, ...], dims: list[str]) -> dict[str, Any]:
    """An event_model DataKey for one buffer's values of ``shape``."""
    return {"source": source, "object_name": source, "dtype": "array" if shape else "number",
            "dtype_numpy": np.dtype(spec.dtype).str, "shape": list(shape), "dims": dims, "units": spec.units}


def _dims(spec: BufferSpec) -> list[str]:
    dims = [f"{spec.name}_dim_{i}" for i in range(len(spec.extra_shape))]
    if spec.axis and dims:
        dims[-1] = spec.axis
    return dims


def _value(arr: np.ndarray) -> Any:
    return float(arr) if arr.ndim == 0 else np.array(arr)


class DerivedRun:
    """The derived run of one consumer of one raw run (router thread only).

    Args:
        run: the raw run.
        slot: the consumer, with its buffers allocated.
        emit: publishes ``(name, doc)``.
    """

    def __init__(self, run: RunState, slot: ConsumerSlot, emit: Emit):
        self.run, self.slot, self.emit = run, slot, emit
        self.source = f"beamlens:{slot.name}"
        raw = run.start_doc
        md: dict[str, Any] = {"plan_name": self.source, "original_run_uid": run.uid,
                              "beamlens": consumer_provenance(slot)}
        for key in ("scan_id", "shape", "snaking", "sample"):
            if key in raw:
                md[key] = raw[key]
        self.bundle = compose_run(metadata=md)
        emit("start", self.bundle.start_doc)
        self.nav = {n: s for n, s in slot.specs.items() if s.kind == "nav"}
        self.other = {n: s for n, s in slot.specs.items() if s.kind != "nav"}
        self.points = None
        if self.nav:
            keys = {"nav_index": {"source": self.source, "dtype": "integer", "dtype_numpy": "<i8", "shape": [],
                                  "dims": [], "units": ""}}
            keys.update({n: data_key(s, self.source, s.extra_shape, _dims(s)) for n, s in self.nav.items()})
            self.points = self.bundle.compose_descriptor(name="primary", data_keys=keys,
                                                         hints={slot.name: {"fields": list(self.nav)}})
            emit("descriptor", self.points.descriptor_doc)
        self.summary = None
        if self.other:
            keys = {n: data_key(s, self.source, s.extra_shape, _dims(s)) for n, s in self.other.items()}
            self.summary = self.bundle.compose_descriptor(name="summary", data_keys=keys,
                                                          configuration=self._axes_configuration())
            emit("descriptor", self.summary.descriptor_doc)
        self.pending: dict[int, int] = {}  # raw seq_num -> flat nav position, in arrival order
        self.summary_digests: dict[str, str] = {}

    def _axes_configuration(self) -> dict[str, Any]:
        axes = self.slot.consumer.run.axes
        used = {s.axis for s in self.other.values() if s.axis and s.axis in axes}
        if not used:
            return {}
        now = time.time()
        data = {a: np.asarray(axes[a][0], dtype=float) for a in used}
        keys = {a: {"source": self.source, "dtype": "array", "dtype_numpy": "<f8", "shape": list(data[a].shape),
                    "dims": [a], "units": axes[a][1]} for a in used}
        return {self.slot.name: {"data": data, "timestamps": {a: now for a in used}, "data_keys": keys}}

    def add_points(self, seq_nums: list[int], positions: np.ndarray) -> None:
        for seq, pos in zip(seq_nums, positions.tolist()):
            if pos >= 0:
                self.pending.pop(int(seq), None)
                self.pending[int(seq)] = pos

    def flush(self) -> None:
        """Publish the points gathered since the last flush and the summary, if it changed."""
        now = time.time()
        if self.points is not None and self.pending:
            seqs, positions = list(self.pending), np.fromiter(self.pending.values(), dtype=np.int64)
            self.pending = {}
            data: dict[str, list[Any]] = {"nav_index": positions.tolist()}
            for name, spec in self.nav.items():
                values = self.slot.arrays[name][positions]
                data[name] = values.tolist() if not spec.extra_shape else [np.array(v) for v in values]
            page = self.points.compose_event_page(data=data, timestamps={k: [now] * len(seqs) for k in data},
                                                  seq_num=seqs, time=[now] * len(seqs))
            self.emit("event_page", page)
        if self.summary is not None:
            digests = {n: buffer_digest(self.slot.arrays[n]) for n in self.other}
            if digests != self.summary_digests:
                self.summary_digests = digests
                data = {n: _value(self.slot.arrays[n]) for n in self.other}
                self.emit("event", self.summary.compose_event(data=data, timestamps={k: now for k in data}))

    def finish(self, status: str, reason: str) -> None:
        """Flush, publish the final maps, and stop the derived run."""
        self.flush()
        if self.nav:
            shape = self.run.published_nav_shape
            n = int(np.prod(shape))
            dims = [f"scan_dim_{i}" for i in range(len(shape))]
            keys = {name: data_key(s, self.source, (*shape, *s.extra_shape), dims + _dims(s))
                    for name, s in self.nav.items()}
            maps = self.bundle.compose_descriptor(name="maps", data_keys=keys)
            self.emit("descriptor", maps.descriptor_doc)
            now = time.time()
            data = {name: self.slot.arrays[name][:n].reshape(*shape, *s.extra_shape).copy() for name, s in self.nav.items()}
            self.emit("event", maps.compose_event(data=data, timestamps={k: now for k in data}))
        self.emit("stop", self.bundle.compose_stop(exit_status=EXIT_STATUS.get(status, "abort"), reason=reason))


class DocumentsSink:
    """Router listener publishing derived runs through a bluesky 0MQ Proxy.

    Args:
        config: the ``outputs.documents`` section.
        metrics: counts published documents and failures.
        publisher: where documents go; by default a ``bluesky.callbacks.zmq.Publisher`` connected to
            ``config.address`` with ``config.prefix`` and msgpack-numpy serialization.
    """

    def __init__(self, config: DocumentsOutputConfig, metrics: Metrics, publisher: Emit | None = None):
        self.config = config
        self.metrics = metrics
        self._publisher = publisher or Publisher(config.address, prefix=config.prefix.encode(),
                                                 serializer=msgpack_serializer)
        metrics.output_failures.labels("documents").inc(0)  # exported from the start, so increase() sees the first
        self._derived: dict[str, dict[str, DerivedRun]] = {}
        self._last_flush: dict[str, float] = {}

    def close(self) -> None:
        close = getattr(self._publisher, "close", None)
        if close is not None:
            close()

    def _emit(self, name: str, doc: dict[str, Any]) -> None:
        self._publisher(name, doc)
        self.metrics.documents_published.labels(name).inc()

    def __call__(self, name: str, run: RunState, doc: dict[str, Any]) -> None:
        """Router hook (router thread)."""
        try:
            self._handle(name, run, doc)
        except Exception:
            self.metrics.output_failures.labels("documents").inc()
            log.exception("derived documents of run %s: %s not published", run.uid, name)

    def _handle(self, name: str, run: RunState, doc: dict[str, Any]) -> None:
        if name == "start":
            return
        derived = self._derived.setdefault(run.uid, {})
        for slot in run.slots:
            if slot.name not in derived and slot.specs and slot.active:
                derived[slot.name] = DerivedRun(run, slot, self._emit)
        if name == "event_page":
            positions = flat_positions(np.asarray(doc["seq_num"]), run.nav_shape, run.snaking)
            for d in derived.values():
                d.add_points(doc["seq_num"], positions)
            now = time.monotonic()
            if now - self._last_flush.get(run.uid, 0.0) >= self.config.event_interval_s:
                self._last_flush[run.uid] = now
                for d in derived.values():
                    d.flush()
        elif name == "stop":
            reason = doc.get("reason") or ""
            for d in self._derived.pop(run.uid, {}).values():
                d.finish(run.status, reason)
            self._last_flush.pop(run.uid, None)
