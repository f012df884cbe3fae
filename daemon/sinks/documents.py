"""Derived Bluesky documents: each consumer's results for a raw run, published as a run of its own.

For every raw run and every consumer with result buffers, the sink composes a derived run with
event_model's ``compose_run`` (every document is validated against event_model's schemas as it is
composed) and publishes it through a bluesky 0MQ Proxy with bluesky's own
``bluesky.callbacks.zmq.Publisher`` (msgpack, numpy arrays as msgpack-numpy), so LiveGrid, TiledWriter
or any ``RemoteDispatcher(prefix=b"beamlens")`` can consume it; or, with ``target: kafka``, to a Kafka
topic as ``bluesky_kafka.Publisher`` writes (:mod:`beamlens.daemon.sinks.kafka_documents`), keyed by
the raw run's uid. The pattern is bluesky's
``LiveDispatcher`` (bluesky.callbacks.stream): the RunStart names the raw run in
``original_run_uid``.

The derived run of consumer ``C`` for raw run ``R``:

- RunStart: ``plan_name="beamlens:C"``, ``plan_type="beamlens"``, ``original_run_uid=R``,
  ``scan_id`` (the raw run's; runs without one, such as frame-only runs, are numbered by the sink),
  ``shape``/``snaking``/``num_points`` (so a LiveGrid places points as it does for the raw run),
  ``motors`` and ``hints.dimensions`` (the raw run's motors, else ``nav_index``), and ``beamlens``
  provenance (consumer class, parameters, version, ``model_sha256`` when the consumer has one).
- stream ``primary``: one event per processed scan point or detector frame, carrying the raw event's
  ``seq_num`` (frame ``k``: ``k + 1``), ``nav_index`` (flat position in the map), the raw event's
  motor readings and the value of every ``nav`` buffer at that point. Points are gathered and
  published as EventPages at most every ``event_interval_s``; frames are announced by the router
  (listener name ``"frames"``); points never published by the RunStop (a raster run whose
  detector sent frames but whose RunEngine sent no events) are published before the final maps.
  A point is published once its consumer has written it (some float ``nav`` buffer is no longer
  NaN there), not merely once it was announced: consumers may write a batch's results after the
  router's notification (the defects consumer post-processes a batch in a worker while the
  network runs on the next one, and holds its first frames until its classes are fitted), and an
  event carrying NaN would never be corrected. A point still unwritten after
  :data:`HOLD_S` (a point the consumer skipped) is published as it is; at the RunStop, all are.
  Every notification of a run (``"results"`` too: buffers changed by background work) flushes.
- stream ``summary``: the ``sig`` and ``single`` buffers (component spectra, explained variance,
  defect counts) as one event per interval in which they changed; signal axes (energy, eV) in the
  descriptor's ``configuration``. A 2-D buffer of up to 16 rows (``components`` ``(k, n_energy)``)
  is one 1-D key per row, ``components_1 .. components_k``; larger ones are not in the documents.
- stream ``maps``: at the end, one event per row of the slowest scan axis, carrying ``row`` and that
  row of every ``nav`` map; consumers that refine earlier points (PCA rescoring) finish here.
- stream ``external`` (only with run files on: ``outputs.files``): at the end, one event
  referencing every buffer the other streams do not carry in full (3 or more dimensions in all:
  per-point spectra of a 2-D map, per-frame defect lists, class patches; images of more than 16
  rows) as event_model Resource/Datum documents pointing into the run's NeXus file; a client
  resolves them with event_model's ``Filler`` and
  :class:`beamlens.daemon.sinks.external.NexusDatasetHandler` (see that module).
- RunStop: the raw run's exit status (``incomplete`` raw runs, closed at shutdown, stop as ``abort``).

Every value in an event is a number or a 1-D array, so bluesky's ``TiledWriter`` (whose event tables
are pyarrow tables and hold at most 1-D cells) stores every derived run, and its ``maps`` columns
read back as ``(*nav_shape, *extra_shape)`` arrays. Buffers that would need more dimensions per event
(defect positions per frame, class patches) are referenced in the ``external`` stream (with run
files on), and are in the Tiled sink, the HTTP API and the run files.

Data keys carry ``shape``, ``dims``, ``units`` and ``dtype_numpy``. Publishing happens in the router
thread (a 0MQ PUB send never blocks; a slow subscriber loses messages at the proxy's high-water
mark, as for every bluesky 0MQ subscriber).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bluesky.callbacks.zmq import Publisher
from event_model import compose_run

from ..config import DocumentsOutputConfig
from ..documents import msgpack_serializer
from ..metrics import Metrics
from ..placement import flat_positions
from ..results import BufferSpec, ConsumerSlot, RunState
from .axes import motor_names
from .external import SPEC
from .live import buffer_digest
from .provenance import consumer_provenance
from .runfiles import dataset_path, run_file_name

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], None]
EXIT_STATUS = {"success": "success", "abort": "abort", "fail": "fail", "incomplete": "abort"}
HOLD_S = 10.0
"""A point announced but not yet written by its consumer is held at most this long (s), then
published as it is (NaN: a point the consumer skipped)."""


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


MAX_SPLIT = 16
"""A 2-D ``sig``/``single`` buffer with at most this many rows (components, classes) is published
as one 1-D data key per row; larger ones (images) are left out of the documents."""


def summary_keys(name: str, spec: BufferSpec) -> list[tuple[str, int | None]]:
    """The summary data keys of one buffer: ``[(key, row)]``; ``row`` is None for the whole value.

    Every value in an event is at most 1-D, because bluesky's TiledWriter stores event data in a
    table (pyarrow) that holds scalars and 1-D arrays only. A 2-D value of up to :data:`MAX_SPLIT`
    rows (``components`` ``(k, n_energy)``, ``transition_matrix`` ``(k, k)``) becomes ``k`` keys
    ``<name>_1 .. <name>_k``; anything else of 2 or more dimensions is not published as documents
    (it is in the Tiled sink, the HTTP API and the run files).
    """
    shape = spec.extra_shape
    if len(shape) <= 1:
        return [(name, None)]
    if len(shape) == 2 and shape[0] <= MAX_SPLIT:
        return [(f"{name}_{i + 1}", i) for i in range(shape[0])]
    return []


class DerivedRun:
    """The derived run of one consumer of one raw run (router thread only).

    Args:
        run: the raw run.
        slot: the consumer, with its buffers allocated.
        emit: publishes ``(name, doc)``.
        scan_id: the derived run's ``scan_id`` (the raw run's, or a number the sink gives runs
            without one, such as frame-only runs).
        motors: motor name -> its raw data key (``units`` etc.), in RunStart ``motors`` order.
        run_files: the run files directory (``outputs.files``), or None when run files are off
            (then buffers too large for events are not in the documents).
    """

    def __init__(self, run: RunState, slot: ConsumerSlot, emit: Emit, scan_id: int,
                 motors: dict[str, dict[str, Any]] | None = None, run_files: Path | None = None):
        self.run, self.slot, self.emit = run, slot, emit
        self.run_files = run_files
        self.source = f"beamlens:{slot.name}"
        raw = run.start_doc
        self.motors = dict(motors or {})
        md: dict[str, Any] = {"plan_name": self.source, "plan_type": "beamlens", "original_run_uid": run.uid,
                              "scan_id": scan_id, "beamlens": consumer_provenance(slot)}
        for key in ("shape", "snaking", "sample", "extents", "gridding"):
            if key in raw:
                md[key] = raw[key]
        if run.nav_shape != (0,):
            md["shape"], md["snaking"] = list(run.nav_shape), list(run.snaking)
            md["num_points"] = int(np.prod(run.nav_shape))
        if self.motors:
            md["motors"] = list(self.motors)
            md["hints"] = {"dimensions": [[[m], "primary"] for m in self.motors]}
            if "gridding" in (raw.get("hints") or {}):
                md["hints"]["gridding"] = raw["hints"]["gridding"]
        else:
            md["hints"] = {"dimensions": [[["nav_index"], "primary"]]}
        self.bundle = compose_run(metadata=md)
        emit("start", self.bundle.start_doc)
        self.nav = {n: s for n, s in slot.specs.items() if s.kind == "nav" and len(s.extra_shape) <= 1}
        self.maps = {n: s for n, s in slot.specs.items() if s.kind == "nav"}
        self.other = {n: s for n, s in slot.specs.items() if s.kind != "nav" and summary_keys(n, s)}
        self.points = None
        if self.nav:
            keys = {"nav_index": {"source": self.source, "dtype": "integer", "dtype_numpy": "<i8", "shape": [],
                                  "dims": [], "units": ""}}
            keys.update({m: {**_motor_key(dk), "source": f"{self.source}:{m}"} for m, dk in self.motors.items()})
            keys.update({n: data_key(s, self.source, s.extra_shape, _dims(s)) for n, s in self.nav.items()})
            self.points = self.bundle.compose_descriptor(name="primary", data_keys=keys,
                                                         hints={slot.name: {"fields": list(self.nav)}})
            emit("descriptor", self.points.descriptor_doc)
        self.summary = None
        if self.other:
            keys = {}
            for n, s in self.other.items():
                for key, row in summary_keys(n, s):
                    shape = s.extra_shape if row is None else s.extra_shape[1:]
                    dims = _dims(s) if row is None else _dims(s)[1:]
                    keys[key] = data_key(s, self.source, shape, dims)
            self.summary = self.bundle.compose_descriptor(name="summary", data_keys=keys,
                                                          configuration=self._axes_configuration())
            emit("descriptor", self.summary.descriptor_doc)
        self.pending: dict[int, tuple[int, dict[str, float], float]] = {}
        """raw seq_num -> (flat position, motor readings, monotonic time queued)."""
        self.watched = [n for n, s in self.nav.items() if np.dtype(s.dtype).kind == "f"]
        """Float nav buffers: NaN at a point in all of them means the consumer has not written it yet."""
        self.published: set[int] = set()
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

    def add_points(self, seq_nums: list[int], positions: np.ndarray, motors: dict[str, np.ndarray] | None = None) -> None:
        """Queue points for the next flush: raw ``seq_nums`` at flat ``positions`` ``(n,)`` int64
        (``-1``: outside the map, skipped), with the raw events' motor readings ``{motor: (n,)}``."""
        motors = motors or {}
        queued = time.monotonic()
        for i, (seq, pos) in enumerate(zip(seq_nums, positions.tolist())):
            if pos >= 0:
                self.pending.pop(int(seq), None)
                self.pending[int(seq)] = (pos, {m: float(v[i]) for m, v in motors.items() if m in self.motors}, queued)

    def written(self, positions: np.ndarray) -> np.ndarray:
        """Which of flat ``positions`` ``(n,)`` int64 the consumer has written: ``(n,)`` bool, True
        where some float nav buffer is not NaN (all True for a consumer without float nav buffers)."""
        done = np.zeros(len(positions), dtype=bool) if self.watched else np.ones(len(positions), dtype=bool)
        for name in self.watched:
            arr = self.slot.arrays[name]
            inside = positions < len(arr)
            values = arr[positions[inside]].reshape(int(inside.sum()), -1)
            done[inside] |= ~np.isnan(values).all(axis=1)
        return done

    def _due(self, final: bool) -> list[int]:
        """The pending seq_nums to publish now: written ones, those held :data:`HOLD_S`, or all."""
        if final:
            return list(self.pending)
        seqs = list(self.pending)
        positions = np.fromiter((self.pending[s][0] for s in seqs), dtype=np.int64, count=len(seqs))
        late = time.monotonic() - HOLD_S
        done = self.written(positions)
        return [s for s, ok in zip(seqs, done.tolist()) if ok or self.pending[s][2] <= late]

    def flush(self, final: bool = False) -> None:
        """Publish the gathered points the consumer has written (every one if ``final``) and the
        summary, if it changed."""
        now = time.time()
        seqs = self._due(final) if self.points is not None and self.pending else []
        if seqs:
            due = [self.pending.pop(s) for s in seqs]
            positions = np.fromiter((p for p, _, _ in due), dtype=np.int64, count=len(seqs))
            readings = [r for _, r, _ in due]
            self.published.update(positions.tolist())
            data: dict[str, list[Any]] = {"nav_index": positions.tolist()}
            for m in self.motors:
                data[m] = [r.get(m, float("nan")) for r in readings]
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
                data = {}
                for n, s in self.other.items():
                    arr = self.slot.arrays[n]
                    for key, row in summary_keys(n, s):
                        data[key] = _value(arr if row is None else arr[row])
                self.emit("event", self.summary.compose_event(data=data, timestamps={k: now for k in data}))

    def finish(self, status: str, reason: str) -> None:
        """Publish every point not yet published (frame runs), flush, publish the final maps, and
        stop the derived run."""
        shape = self.run.published_nav_shape
        n = int(np.prod(shape))
        if self.points is not None:
            queued = {p for p, _, _ in self.pending.values()}
            rest = [p for p in range(n) if p not in self.published and p not in queued]
            if rest:
                self.add_points(_seq_nums_of(np.asarray(rest, dtype=np.int64), shape, self.run.snaking), np.asarray(rest))
        self.flush(final=True)
        rows = {name: s for name, s in self.maps.items() if len(shape) - 1 + len(s.extra_shape) <= 1}
        if rows and n:
            # the final maps, one event per row of the slowest scan axis (each value at most 1-D:
            # stacked by TiledWriter into (*nav_shape, *extra_shape) arrays)
            dims = [f"scan_dim_{i}" for i in range(1, len(shape))]
            keys = {name: data_key(s, self.source, (*shape[1:], *s.extra_shape), dims + _dims(s)) for name, s in rows.items()}
            keys["row"] = {"source": self.source, "dtype": "integer", "dtype_numpy": "<i8", "shape": [], "dims": [], "units": ""}
            maps = self.bundle.compose_descriptor(name="maps", data_keys=keys)
            self.emit("descriptor", maps.descriptor_doc)
            now = time.time()
            values = {name: self.slot.arrays[name][:n].reshape(*shape, *s.extra_shape) for name, s in rows.items()}
            data: dict[str, list[Any]] = {"row": list(range(shape[0]))}
            for name, s in rows.items():
                v = values[name]
                data[name] = v.tolist() if v.ndim == 1 else [np.array(r) for r in v]
            self.emit("event_page", maps.compose_event_page(
                data=data, timestamps={k: [now] * shape[0] for k in data},
                seq_num=list(range(1, shape[0] + 1)), time=[now] * shape[0]))
        self._external(shape, rows)
        self.emit("stop", self.bundle.compose_stop(exit_status=EXIT_STATUS.get(status, "abort"), reason=reason))


    def _external(self, shape: tuple[int, ...], rows: dict[str, BufferSpec]) -> None:
        """The ``external`` stream: one event of Datum references into the run file for every
        buffer no other stream carries in full (nav buffers not in ``maps``; other buffers without
        :func:`summary_keys`)."""
        if self.run_files is None:
            return
        specs = {n: s for n, s in self.slot.specs.items()
                 if (n not in rows if s.kind == "nav" else not summary_keys(n, s))}
        if not specs:
            return
        resource = self.bundle.compose_resource(
            spec=SPEC, root=str(Path(self.run_files).resolve()),
            resource_path=run_file_name(self.run.uid, self.run.start_doc), resource_kwargs={"run_uid": self.run.uid})
        self.emit("resource", resource.resource_doc)
        data, keys = {}, {}
        for name, s in specs.items():
            datum = resource.compose_datum(datum_kwargs={"dataset": dataset_path(self.slot.name, name)})
            self.emit("datum", datum)
            data[name] = datum["datum_id"]
            full = (*shape, *s.extra_shape) if s.kind == "nav" else s.extra_shape
            dims = ([f"scan_dim_{i}" for i in range(len(shape))] if s.kind == "nav" else []) + _dims(s)
            keys[name] = {**data_key(s, self.source, full, dims), "dtype": "array", "external": "FILESTORE:"}
        stream = self.bundle.compose_descriptor(name="external", data_keys=keys)
        self.emit("descriptor", stream.descriptor_doc)
        now = time.time()
        self.emit("event", stream.compose_event(data=data, timestamps={k: now for k in data},
                                                filled={k: False for k in data}))


def _motor_key(dk: dict[str, Any]) -> dict[str, Any]:
    return {"dtype": "number", "dtype_numpy": "<f8", "shape": [], "dims": [], "units": str(dk.get("units") or "")}


def _seq_nums_of(positions: np.ndarray, shape: tuple[int, ...], snaking: tuple[bool, ...]) -> list[int]:
    """The seq_nums that land on flat ``positions`` (the inverse of ``flat_positions``)."""
    if shape == (0,) or not any(snaking):
        return (positions + 1).tolist()
    size = int(np.prod(shape))
    all_pos = flat_positions(np.arange(1, size + 1), shape, snaking)
    inverse = np.empty(size, dtype=np.int64)
    inverse[all_pos] = np.arange(1, size + 1)
    return inverse[positions].tolist()


class DocumentsSink:
    """Router listener publishing derived runs through a bluesky 0MQ Proxy or to a Kafka topic.

    Args:
        config: the ``outputs.documents`` section.
        metrics: counts published documents and failures.
        run_files: the run files directory (``outputs.files.directory`` when run files are on).
        publisher: where documents go; by default a ``bluesky.callbacks.zmq.Publisher`` connected to
            ``config.address`` with ``config.prefix`` and msgpack-numpy serialization, or with
            ``target: kafka`` a :class:`~beamlens.daemon.sinks.kafka_documents.KafkaDocumentPublisher`
            (messages keyed by the raw run's uid).
    """

    def __init__(self, config: DocumentsOutputConfig, metrics: Metrics, publisher: Emit | None = None,
                 run_files: Path | None = None):
        self.config = config
        self.run_files = run_files
        """The run files directory when ``outputs.files`` is on: large buffers are referenced there."""
        self.metrics = metrics
        self._keyed = publisher is None and config.target == "kafka"
        if self._keyed:
            from .kafka_documents import KafkaDocumentPublisher  # optional extra beamlens[kafka]
            publisher = KafkaDocumentPublisher(config.kafka, metrics)
        self._publisher = publisher or Publisher(config.address, prefix=config.prefix.encode(),
                                                 serializer=msgpack_serializer)
        metrics.output_failures.labels("documents").inc(0)  # exported from the start, so increase() sees the first
        self._derived: dict[str, dict[str, DerivedRun]] = {}
        self._last_flush: dict[str, float] = {}
        self._motors: dict[str, dict[str, dict[str, Any]]] = {}  # raw run uid -> motor -> raw data key
        self._scan_ids: dict[str, int] = {}
        self._next_scan_id = 1

    def close(self) -> None:
        close = getattr(self._publisher, "close", None)
        if close is not None:
            close()

    def _emit(self, name: str, doc: dict[str, Any], raw_uid: str | None = None) -> None:
        if self._keyed:
            self._publisher(name, doc, raw_uid)  # Kafka: keyed by the raw run, one partition per raw run
        else:
            self._publisher(name, doc)
        self.metrics.documents_published.labels(name).inc()

    def _emitter(self, raw_uid: str) -> Emit:
        return lambda name, doc: self._emit(name, doc, raw_uid)

    def __call__(self, name: str, run: RunState, doc: dict[str, Any]) -> None:
        """Router hook (router thread)."""
        try:
            self._handle(name, run, doc)
        except Exception:
            self.metrics.output_failures.labels("documents").inc()
            log.exception("derived documents of run %s: %s not published", run.uid, name)

    def _scan_id(self, run: RunState) -> int:
        """The raw run's ``scan_id``; runs without one (frame-only runs) are numbered by this sink."""
        raw = run.start_doc.get("scan_id")
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if run.uid not in self._scan_ids:
            self._scan_ids[run.uid], self._next_scan_id = self._next_scan_id, self._next_scan_id + 1
        return self._scan_ids[run.uid]

    def _handle(self, name: str, run: RunState, doc: dict[str, Any]) -> None:
        if name == "start":
            return
        if name == "descriptor" and run.uid not in self._derived and doc.get("name", "primary") == "primary":
            keys = doc.get("data_keys") or {}
            self._motors[run.uid] = {m: keys[m] for m in motor_names(run.start_doc)
                                     if isinstance(keys.get(m), dict) and not keys[m].get("shape")}
        derived = self._derived.setdefault(run.uid, {})
        for slot in run.slots:
            if slot.name not in derived and slot.specs and slot.active:
                derived[slot.name] = DerivedRun(run, slot, self._emitter(run.uid), self._scan_id(run),
                                              self._motors.get(run.uid), self.run_files)
        if name in ("event_page", "frames"):
            seq_nums = np.asarray(doc["seq_num"])
            positions = flat_positions(seq_nums, run.nav_shape, run.snaking)
            motors = {}
            for m in self._motors.get(run.uid, {}):
                try:
                    values = np.asarray(doc.get("data", {}).get(m), dtype=np.float64).reshape(-1)
                except (TypeError, ValueError):
                    continue
                if values.shape == seq_nums.shape:
                    motors[m] = values
            for d in derived.values():
                d.add_points(doc["seq_num"], positions, motors)
        if name == "stop":
            reason = doc.get("reason") or ""
            for d in self._derived.pop(run.uid, {}).values():
                d.finish(run.status, reason)
            self._last_flush.pop(run.uid, None)
            self._motors.pop(run.uid, None)
            self._scan_ids.pop(run.uid, None)
            return
        # any other notification (event_page, frames, results: buffers written by background work)
        # may have brought results of points announced earlier
        now = time.monotonic()
        if now - self._last_flush.get(run.uid, 0.0) >= self.config.event_interval_s:
            self._last_flush[run.uid] = now
            for d in derived.values():
                d.flush()
