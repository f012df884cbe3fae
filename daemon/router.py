"""The document router and the daemon's routing loop (event_model ``RunRouter`` semantics).

One thread takes items from a bounded queue (documents are never dropped: a full queue blocks the
source) and, per run:

- ``start``: opens the run (:meth:`RunTable.open`: one instance of every enabled consumer);
- ``descriptor``: remembers shapes and streams; the first descriptor of the ``primary`` stream
  makes the run's event signals (:func:`beamlens.daemon.signals.event_signals`: arrays and numeric
  scalars, hinted first), which are offered to every consumer, whose declared buffers are then
  allocated; the first descriptor of another named stream (``baseline``) offers its numeric scalars
  as ``"<stream>/<key>"`` signals only to consumers that opt in (``Consumer.streams``), their
  events' ``nav_index`` the index in that stream (never placed in the scan);
- ``event`` / ``event_page``: coalesces consecutive events of one descriptor into pages of at most
  ``max_page_size``, checks seq_nums, places each event in the map from its seq_num (events outside
  the scan are dropped and counted once, ``seq_num_outside_scan``), stacks each accepted signal's
  column once (an event of the wrong shape is dropped, counted ``wrong_shape`` per consumer that
  takes the signal) and hands the :class:`~beamlens.consumers.base.Batch` es to the consumers;
- ``stop``: once the frame path has caught up (:class:`~beamlens.daemon.frame_router.FrameRouter`,
  the stop gate), the run is finished (:meth:`RunTable.finish`: ``finishing`` while its
  consumers' final jobs run on the pool, then closed).

A descriptor whose RunStart was never seen (the daemon joined mid-run) opens the run with an unknown
length. An event before its descriptor, a stop of an unknown run and a second start with the same
uid are rejected and counted. Consumers are called through the
:class:`~beamlens.daemon.dispatch.Dispatcher` (isolation, quarantine, strict mode, timing).

Detector frames (:class:`~beamlens.daemon.frames.SeriesEvent`, ``FrameBatch``, ``FrameBarrier``)
travel through the same queue and thread, so consumer methods are never called concurrently and a
run's start, frames and stop stay ordered. Run timeouts, slow-consumer shedding and checkpoints are
the :class:`~beamlens.daemon.supervision.Supervisor`'s, ticking on this thread; background jobs
are installed here too (:meth:`RunTable.poll`).
"""
from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from event_model import pack_event_page
from threadpoolctl import threadpool_limits

from beamlens.consumers.base import SignalInfo

from .checkpoint import Checkpointer
from .config import Config
from .documents import Document
from .frame_router import FrameRouter
from .frames import FrameBarrier, FrameBatch, SeriesEvent
from .isolation import RateLimitedLog
from .limits import MAX_WIRE_INDEX, checked_seq_nums
from .metrics import Metrics
from .midway import MidwayJoiner, lookups_from_config
from .placement import flat_positions
from .results import RunState, RunStore
from .runtable import RunTable, result_budget_bytes, synthetic_stop, wants_stream
from .signals import event_batch, event_signals
from .supervision import TICK_S, Supervisor

log = logging.getLogger(__name__)

_STOP = object()
_WAKE = object()
PRIMARY = "primary"
STREAM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
"""A stream name (other than primary) whose data keys may be offered to consumers."""

__all__ = ["Router", "RouterTask", "StopGate", "result_budget_bytes"]


class RouterTask:
    """A function run on the router thread after every item submitted before it (see
    :meth:`Router.call`). ``done`` is set when it has run; ``result`` holds what it returned."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        finally:
            self.done.set()


class StopGate(Protocol):
    """All the document router knows of the frame path (:class:`~beamlens.daemon.frame_router.FrameRouter`)."""

    @property
    def waiting(self) -> bool:
        """A RunStop or a frame-only series waits on time: call :meth:`expire` often."""

    def park_stop(self, run: RunState, doc: dict[str, Any]) -> bool:
        """Hold ``run``'s RunStop until the frame path caught up; False: finish it now."""

    def expire(self) -> None:
        """Release what has waited long enough (held stops, quiet frame-only series)."""

    def handle(self, item: FrameBatch | SeriesEvent | FrameBarrier) -> None:
        """Route one frame-source item."""


class Router:
    """Routes documents and frames from a bounded queue to per-run consumer instances.

    Args:
        config: the validated daemon config (consumers and router sections are used).
        metrics: where to count.
        store: where runs live for the sinks.
    """

    def __init__(self, config: Config, metrics: Metrics, store: RunStore):
        self.config = config.router
        self.limits = config.limits
        self._rlog = RateLimitedLog(log)
        self._item_n = 1
        self._item_received = 0.0
        """Receive time (``time.time()``) of the item being routed: RunStarts are rate-limited by arrival."""
        # Consumers do linear algebra on small matrices from several threads: multithreaded BLAS
        # only adds contention (IncrementalPCA's SVD: 62 ms with 2 threads vs 2 ms with 1 on a loaded
        # 2-core machine). BLAS has one setting per process, so this is process-wide.
        threadpool_limits(config.router.blas_threads, user_api="blas")
        self.metrics = metrics
        self.store = store
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=config.router.document_queue_size)
        self.table = RunTable(config, metrics, store, wake=self._wake)
        self.budget_bytes = self.table.budget_bytes
        self._pending: Document | None = None
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._in_flight = 0
        self._wake_pending = False
        self.frames = FrameRouter(self.table, self.config)
        """The frame path; the document router uses only its :class:`StopGate` side."""
        self.midway = MidwayJoiner(config.router.midway_hold_s, config.router.midway_max_descriptors,
                                   config.router.midway_max_events, self._descriptor, self._event_page,
                                   start=self._start_midway, lookups=lookups_from_config(config),
                                   open_runs=lambda: self.table.runs)
        self.checkpointer = (Checkpointer(config.state.directory, config.state.checkpoint_interval_s)
                             if config.state.directory is not None else None)
        self.supervisor = Supervisor(self.table, self.queue, metrics, self.checkpointer)
        self.restore_at_start = True
        """Resume every checkpointed run at start (off for Kafka sources: a group's members may share
        the state directory, so each resumes a run only when it reads the run again:
        :meth:`Supervisor.resume <beamlens.daemon.supervision.Supervisor.resume>`)."""
        self.heartbeat = time.monotonic()
        """Monotonic time the loop last came round (idle or not); a stale value means a consumer hangs."""

    @property
    def listeners(self) -> list[Callable[[str, RunState, dict[str, Any]], None]]:
        """Sinks told of ``start``, ``descriptor``, ``event_page``, ``frames`` and ``stop``."""
        return self.table.listeners

    @listeners.setter
    def listeners(self, value: list[Callable[[str, RunState, dict[str, Any]], None]]) -> None:
        self.table.listeners = value

    @property
    def open_runs(self) -> dict[str, RunState]:
        """Open runs by uid, oldest first (router thread only)."""
        return self.table.runs

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.checkpointer is not None and self.restore_at_start:
            self.supervisor.restore_checkpoints()
        self._thread = threading.Thread(target=self._loop, name="beamlens-router", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Process everything queued, let finishing runs complete (up to ``finish_timeout_s``), then
        checkpoint open runs (``suspended``, resumed after a restart) or, without checkpoints,
        close them as ``incomplete``; join the thread."""
        if self._thread is None:
            return
        if not self._thread.is_alive():
            # the loop died (a bug beyond the isolation): its state is no longer touched, so save it from here
            log.critical("router thread is dead; checkpointing open runs from the stopping thread")
            self._shutdown_runs()
            self._thread = None
            return
        try:
            self.queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.error("router queue still full after %.0f s; stopping without draining it", timeout)
        self._thread.join(timeout + self.config.finish_timeout_s)
        self._thread = None

    @property
    def thread(self) -> threading.Thread | None:
        """The routing thread (for the daemon's thread watch)."""
        return self._thread

    def submit(self, document: Document | FrameBatch | SeriesEvent | FrameBarrier) -> None:
        """Queue a document (or a frame source's series event, frame batch or barrier), blocking while the
        queue is full (documents are never dropped; frame sources bound what they queue)."""
        with self._idle:
            self._in_flight += 1
        self.queue.put(document)
        self.metrics.queue_depth.labels("documents").set(self.queue.qsize())

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> RouterTask:
        """Run ``fn`` on the router thread once everything submitted before has been routed.

        Args:
            timeout: wait at most this long for it to have run (None: do not wait); check
                ``task.done`` for whether it did.
        """
        task = RouterTask(fn)
        self.submit(task)
        if timeout is not None:
            task.done.wait(timeout)
        return task

    def _wake(self) -> None:
        """A pool job finished (worker thread): wake the loop if it waits on an empty queue (one
        wake-up item at a time, so finished jobs never fill the queue)."""
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            self.queue.put_nowait(_WAKE)
        except queue.Full:
            self._wake_pending = False  # the loop is busy and polls the pool every turn

    def stalled_for(self) -> float:
        """Seconds since the loop last came round (0 while it is idle or moving); ``inf`` when the
        router thread is not running."""
        if self._thread is None or not self._thread.is_alive():
            return float("inf")
        return max(0.0, time.monotonic() - self.heartbeat - TICK_S)

    def wait_idle(self, timeout: float) -> bool:
        """Block until every submitted document has been processed (tests, shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            self.table.guard("jobs", self.table.poll)
            if self.frames.waiting:
                self.table.guard("frames_expire", self.frames.expire)
            if self.midway.waiting:
                self.table.guard("midway_expire", self.midway.expire)
            if self.supervisor.due():
                self.supervisor.next_tick = time.monotonic() + TICK_S  # a failing tick is not retried at once
                self.table.guard("supervision", self.supervisor.tick)
            if self._pending is not None:
                item, self._pending = self._pending, None
            else:
                waiting = self.frames.waiting or self.midway.waiting or self.table.busy
                try:
                    item = self.queue.get(timeout=0.05 if waiting else TICK_S)
                except queue.Empty:
                    continue
            if item is _WAKE:
                self._wake_pending = False
                continue
            if item is _STOP:
                self._shutdown_runs()
                return
            self._item_n = 1
            received = getattr(item, "received", None)
            self._item_received = received if isinstance(received, float) else time.time()
            try:
                self._route(item)
            except Exception as exc:  # the router must outlive any item (and its own bugs)
                kind = getattr(item, "name", None) if isinstance(getattr(item, "name", None), str) else type(item).__name__
                self.table.count_internal("router")
                self._rlog.log(logging.ERROR, f"router:{kind}:{type(exc).__name__}", "router failed on a %s item "
                               "(%s: %s); item dropped", kind, type(exc).__name__, str(exc)[:300], exc_info=True)
                source = getattr(item, "source", "unknown")
                self.metrics.bad_messages.labels(source if isinstance(source, str) else "unknown", "router_error").inc(
                    self._item_n)
            finally:
                self.metrics.queue_depth.labels("documents").set(self.queue.qsize())
                with self._idle:
                    self._in_flight -= self._item_n
                    self._idle.notify_all()

    def _route(self, item: Any) -> None:
        if isinstance(item, RouterTask):
            item.run()
        elif isinstance(item, (FrameBatch, SeriesEvent, FrameBarrier)):
            self.frames.handle(item)
        elif item.name == "event":
            batch = [item.doc]
            while len(batch) < self.config.max_page_size:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _WAKE:
                    self._wake_pending = False
                    continue
                if getattr(nxt, "name", None) == "event" and nxt.doc.get("descriptor") == item.doc.get("descriptor"):
                    batch.append(nxt.doc)
                    self._item_n = len(batch)
                else:
                    self._pending = nxt
                    break
            self._event_page(pack_event_page(*batch), item.source)
        else:
            getattr(self, "_" + item.name, self._ignore)(item.doc, item.source)

    def _shutdown_runs(self) -> None:
        """At stop: let finishing runs complete (bounded), then checkpoint open runs
        (``suspended``) or, without checkpoints, finish them as ``incomplete``."""
        t = self.table
        t.guard("shutdown", t.settle, self.config.finish_timeout_s)
        if self.checkpointer is not None:
            t.guard("shutdown", self.supervisor.suspend_open_runs)
        for run in list(t.runs.values()):
            t.guard("shutdown", t.finish, run, "incomplete", synthetic_stop(run, "incomplete", "daemon shutting down"))
        t.guard("shutdown", t.settle, self.config.finish_timeout_s)
        t.shutdown()

    def _ignore(self, doc: dict[str, Any], source: str) -> None:
        """Resource, Datum, StreamResource, StreamDatum: not used by the analysis path."""

    # -- documents ---------------------------------------------------------------------------
    def _start(self, doc: dict[str, Any], source: str) -> RunState | None:
        return self.table.open(doc, source, received=self._item_received)

    def _start_midway(self, doc: dict[str, Any], source: str) -> RunState | None:
        self.metrics.runs_joined_midway.inc()
        return self.table.open(doc, source, joined_midway=True, received=self._item_received)

    def _descriptor(self, doc: dict[str, Any], source: str) -> None:
        t = self.table
        data_keys = doc.get("data_keys")
        if isinstance(data_keys, dict) and len(data_keys) > self.limits.max_data_keys:
            self.metrics.limit_actions.labels("data_keys", "refused").inc()
            t.reject(source, "too_many_data_keys", f"descriptor {str(doc.get('uid'))[:64]} has {len(data_keys)} "
                     f"data keys (limits.max_data_keys {self.limits.max_data_keys})")
            return
        run = t.runs.get(doc["run_start"])
        if run is None:
            if doc["run_start"] in t.finishing:
                t.reject(source, "descriptor_after_stop", f"descriptor {str(doc.get('uid'))[:64]} of a stopped run")
                return
            self.metrics.runs_joined_midway.inc()
            log.warning("descriptor %s for run %s whose RunStart was not seen: joining mid-run", doc["uid"], doc["run_start"])
            run = t.open(self.midway.start_for(doc["run_start"], source, doc["time"])[0], source, joined_midway=True,
                         received=self._item_received)
            if run is None:
                return
        t.descriptor_run[doc["uid"]] = run.uid
        if not isinstance(data_keys, dict):
            t.reject(source, "bad_descriptor", f"descriptor {str(doc.get('uid'))[:64]} has no data_keys map")
            return
        run.descriptor_shapes[doc["uid"]] = {k: v.get("shape") if isinstance(v, dict) else None for k, v in data_keys.items()}
        run.descriptor_streams[doc["uid"]] = doc.get("name", PRIMARY)
        run.last_activity = time.time()
        if doc.get("name", PRIMARY) != PRIMARY:
            self._stream_descriptor(run, doc)
            return
        run.primary_descriptors.add(doc["uid"])
        t.call_all(run, "descriptor", doc)
        if not run.buffers_allocated:
            primary = {s.name: s for s in event_signals(doc)}
            run.signals = {**primary, **{k: v for k, v in run.signals.items() if k not in primary}}  # + other streams
            t.offer(run, primary.values())
            run.buffers_allocated = True
        t.notify("descriptor", run, doc)
        self.midway.descriptor_arrived(doc["uid"])

    def _stream_descriptor(self, run: RunState, doc: dict[str, Any]) -> None:
        """The first descriptor of another named stream (``baseline``, a monitor) offers its numeric
        scalar data keys as ``"<stream>/<key>"`` signals to the consumers that opt in to it
        (:attr:`Consumer.streams`); a stream name that is not a short identifier is not offered."""
        stream = doc.get("name")
        if not isinstance(stream, str) or not STREAM_NAME.fullmatch(stream):
            return
        if any(i.stream == stream for i in run.signals.values()) \
                or not any(s.offerable and wants_stream(s.consumer, stream) for s in run.slots):
            return
        new = [i for i in event_signals(doc, stream) if i.name not in run.signals]
        if new:
            run.signals.update((i.name, i) for i in new)
            self.table.offer(run, new)

    def _event_page(self, page: dict[str, Any], source: str) -> None:
        t = self.table
        descriptor = page.get("descriptor")
        run_uid = t.descriptor_run.get(descriptor) if isinstance(descriptor, str) else None
        n = len(page["seq_num"])
        if run_uid is None and self.midway.hold(page, source):
            return
        run_uid = t.descriptor_run.get(page["descriptor"])  # hold() may have built it
        if run_uid is None or run_uid not in t.runs:
            t.reject(source, "event_before_descriptor", f"{n} event(s) for unknown descriptor {str(descriptor)[:64]} skipped", n)
            return
        run = t.runs[run_uid]
        page, n = self._checked_page(run, page, source)
        if not n:
            return
        now = time.time()
        run.last_event = run.last_activity = now
        self.metrics.last_event_time.set(now)
        run.count_events(descriptor, page["seq_num"])
        if descriptor not in run.primary_descriptors:
            self._stream_page(run, page, descriptor)
            return
        seq = np.asarray(page["seq_num"], dtype=np.int64)
        positions = flat_positions(seq, run.nav_shape, run.snaking)
        if (positions < 0).any():
            self.metrics.bad_messages.labels(source, "seq_num_outside_scan").inc(int((positions < 0).sum()))
        positions = t.place(run, positions)
        self._page_to_consumers(run, page, positions, seq)
        run.events_done += n
        self.metrics.events_processed.inc(n)
        t.update_gauges(run)
        t.notify("event_page", run, page)

    def _page_to_consumers(self, run: RunState, page: dict[str, Any], positions: np.ndarray, seq: np.ndarray) -> None:
        """Stack each accepted signal's column of the page once and hand the batch to the consumers
        that took it; an event whose value has the wrong shape costs only itself."""
        inside = positions >= 0
        if not inside.any():
            return
        nav, seq = positions[inside], seq[inside]
        times = page.get("time")
        times = [times[i] for i in np.flatnonzero(inside)] if isinstance(times, list) and len(times) == len(positions) else None
        data = page.get("data") if isinstance(page.get("data"), dict) else {}
        self._columns(run, [i for i in run.signals.values() if i.stream == PRIMARY], data, inside, nav, seq, times)

    def _stream_page(self, run: RunState, page: dict[str, Any], descriptor: str) -> None:
        """Events of another stream to the consumers that took its signals, ``nav_index`` the
        event's index in its stream (``seq_num - 1``, seq_num already checked)."""
        stream = run.descriptor_streams.get(descriptor)
        signals = [i for i in run.signals.values() if i.stream == stream and i.stream != PRIMARY]
        if not signals:
            return
        seq = np.asarray(page["seq_num"], dtype=np.int64)
        times = page.get("time")
        data = page.get("data") if isinstance(page.get("data"), dict) else {}
        self._columns(run, signals, data, np.ones(len(seq), dtype=bool), seq - 1, seq,
                      times if isinstance(times, list) and len(times) == len(seq) else None)

    def _columns(self, run: RunState, signals: list[SignalInfo], data: dict[str, Any], inside: np.ndarray,
                 nav: np.ndarray, seq: np.ndarray, times: list[Any] | None) -> None:
        for info in signals:
            name = info.name
            slots = self.table.takers(run, name)
            if not slots:
                continue
            values = data.get(info.key)
            if isinstance(values, list) and len(values) == len(inside) and not inside.all():
                values = [values[i] for i in np.flatnonzero(inside)]
            batch, bad = event_batch(info, values, nav, seq, times)
            if bad:
                for slot in slots:
                    self.table.dispatcher.skipped(slot, "wrong_shape", bad)
                self._rlog.log(logging.WARNING, f"wrong_shape:{name}", "run %s: %d event(s) of %s with a value not of the "
                               "declared shape %s skipped", run.uid, bad, name, info.sig_shape)
            if batch is not None:
                self.table.deliver(run, batch, slots)

    def _stop(self, doc: dict[str, Any], source: str) -> None:
        t = self.table
        run = t.runs.get(doc.get("run_start")) if isinstance(doc.get("run_start"), str) else None
        run = run or self.midway.adopt_stop(doc, source, t.runs)
        if run is None:
            t.reject(source, "stop_for_unknown_run", f"RunStop for run {str(doc.get('run_start'))[:64]} that is not open")
            return
        run.stop_source = source
        if self.frames.park_stop(run, doc):
            return
        t.finish(run, doc.get("exit_status", "success"), doc, source)

    def _checked_page(self, run: RunState, page: dict[str, Any], source: str) -> tuple[dict[str, Any], int]:
        """The page without events whose seq_num is not an integer in ``[1, bound]`` (bound: the
        run's length, or the descriptor's highest seq_num so far, plus ``limits.max_gap``); those
        are rejected as ``bad_seq_num``."""
        seq = page["seq_num"]
        known = run.expected_points if run.nav_shape != (0,) and not run.limited else None
        bound = min(MAX_WIRE_INDEX, (known or run.max_seq_num.get(page["descriptor"], 0)) + self.limits.max_gap)
        keep, values = checked_seq_nums(seq, bound)
        if len(keep) == len(seq):
            if values != list(seq):
                page = {**page, "seq_num": values}
            return page, len(values)
        self.table.reject(source, "bad_seq_num", f"{len(seq) - len(keep)} event(s) of run {run.uid[:64]} with seq_num not "
                          f"an integer in [1, {bound}] (limits.max_gap) skipped", len(seq) - len(keep))
        if not keep:
            return page, 0
        page = _page_subset(page, keep)
        page["seq_num"] = values
        return page, len(keep)


def _page_subset(page: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    """The events at indices ``keep`` of an EventPage (columnar lists sliced)."""
    out = dict(page)
    for key in ("seq_num", "time", "uid"):
        if isinstance(page.get(key), list):
            out[key] = [page[key][i] for i in keep]
    for key in ("data", "timestamps", "filled"):
        cols = page.get(key)
        if isinstance(cols, dict):
            out[key] = {k: [v[i] for i in keep] if isinstance(v, list) and len(v) > max(keep) else v
                        for k, v in cols.items()}
    return out
