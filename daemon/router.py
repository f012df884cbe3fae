"""Per-run routing of Bluesky documents to consumer instances (event_model ``RunRouter`` semantics).

One thread takes documents from a bounded queue (documents are never dropped: a full queue blocks
the source) and, per run:

- ``start``: creates the run's state and one instance of every enabled consumer;
- ``descriptor``: remembers shapes; after the first descriptor of the ``primary`` stream, asks every
  consumer for its result buffers and allocates them;
- ``event`` / ``event_page``: coalesces consecutive events of one descriptor into pages of at most
  ``max_page_size`` (so batch algorithms get batches), places each event in the map from its seq_num,
  and hands the page to every active consumer;
- ``stop``: lets consumers finalise, marks the run finished.

A descriptor whose RunStart was never seen (the daemon joined mid-run) opens the run with an unknown
length. An event before its descriptor, a stop of an unknown run and a second start with the same uid
are rejected and counted. A consumer's exception is logged with the run and document, counted, and
after ``max_failures_per_run`` the consumer is quarantined for the rest of the run; the other
consumers never notice (bluesky's ``make_callback_safe``, with a strict mode for tests).

Detector frames (:class:`~beamlens.daemon.frames.SeriesEvent` and ``FrameBatch`` items from the frame
sources) travel through the same queue and thread, so consumer methods are never called
concurrently and a run's start, frames and stop stay ordered; their routing is in
:mod:`beamlens.daemon.frame_router`. Run timeouts, slow-consumer shedding and checkpoints are in
:mod:`beamlens.daemon.supervision`. Documents go to ``inputs = "events"`` consumers, frames to
``inputs = "frames"`` consumers; ``start`` and ``stop`` to both.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from event_model import pack_event_page
from threadpoolctl import threadpool_limits

from beamlens.consumers.base import BadData, NotApplicable, RunInfo

from .checkpoint import Checkpointer
from .config import Config
from .documents import Document
from .frame_router import FrameRouter
from .frames import FrameBarrier, FrameBatch, SeriesEvent
from .metrics import SCIENCE_GAUGES, Metrics
from .midway import MidwayJoiner, lookups_from_config
from .placement import flat_positions, nav_shape_from_start, snaking_from_start
from .results import ConsumerSlot, RunState, RunStore
from .supervision import TICK_S, RunSupervision

log = logging.getLogger(__name__)

_STOP = object()
PRIMARY = "primary"
INITIAL_CAPACITY = 1024


class Router(RunSupervision):
    """Routes documents from a bounded queue to per-run consumer instances.

    Args:
        config: the validated daemon config (consumers and router sections are used).
        metrics: where to count.
        store: where runs live for the sinks.
    """

    def __init__(self, config: Config, metrics: Metrics, store: RunStore):
        self.config = config.router
        # Consumers do linear algebra on small matrices from several threads: multithreaded BLAS
        # only adds contention (IncrementalPCA's SVD: 62 ms with 2 threads vs 2 ms with 1 on a loaded
        # 2-core machine). BLAS has one setting per process, so this is process-wide.
        threadpool_limits(config.router.blas_threads, user_api="blas")
        self.metrics = metrics
        self.store = store
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=config.router.document_queue_size)
        self._consumers = []
        self._frame_filter: dict[str, frozenset[str] | None] = {}
        """consumer name -> the frame sources it analyses (None: all)."""
        for c in config.consumers:
            if c.enabled:
                cls = c.resolve()
                self._consumers.append((c.name, cls, cls.Params.model_validate(c.params)))
                self._frame_filter[c.name] = frozenset(c.frame_sources) if c.frame_sources is not None else None
        self._runs: dict[str, RunState] = {}
        self._descriptor_run: dict[str, str] = {}
        self._pending: Document | None = None
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._in_flight = 0
        self.listeners: list[Callable[[str, RunState, dict[str, Any]], None]] = []
        self.initial_capacity = INITIAL_CAPACITY
        self.frames = FrameRouter(self)
        self.midway = MidwayJoiner(config.router.midway_hold_s, config.router.midway_max_descriptors,
                                   config.router.midway_max_events, self._descriptor, self._event_page,
                                   start=self._start_midway, lookups=lookups_from_config(config),
                                   open_runs=lambda: self._runs)
        self.checkpointer = (Checkpointer(config.state.directory, config.state.checkpoint_interval_s)
                             if config.state.directory is not None else None)
        self._next_tick = time.monotonic() + TICK_S
        self.heartbeat = time.monotonic()
        """Monotonic time the loop last came round (idle or not); a stale value means a consumer hangs."""

    @property
    def open_runs(self) -> dict[str, RunState]:
        """Open runs by uid, oldest first (router thread only)."""
        return self._runs

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.checkpointer is not None:
            self._restore_checkpoints()
        self._thread = threading.Thread(target=self._loop, name="beamlens-router", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Process everything queued, then checkpoint open runs (``suspended``, resumed after a
        restart) or, without checkpoints, close them as ``incomplete``; join the thread."""
        if self._thread is None:
            return
        self.queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def submit(self, document: Document | FrameBatch | SeriesEvent | FrameBarrier) -> None:
        """Queue a document (or a frame source's series event, frame batch or barrier), blocking while the
        queue is full (documents are never dropped; frame sources bound what they queue)."""
        with self._idle:
            self._in_flight += 1
        self.queue.put(document)
        self.metrics.queue_depth.labels("documents").set(self.queue.qsize())

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
            if self.frames.waiting:
                self.frames.expire()
            if self.midway.waiting:
                self.midway.expire()
            if time.monotonic() >= self._next_tick:
                self._tick()
            if self._pending is not None:
                item, self._pending = self._pending, None
            else:
                try:
                    item = self.queue.get(timeout=0.05 if self.frames.waiting or self.midway.waiting else TICK_S)
                except queue.Empty:
                    continue
            if item is _STOP:
                if self.checkpointer is not None:
                    self._suspend_open_runs()
                else:
                    self._close_open_runs("incomplete", "daemon shutting down")
                return
            n = 1
            try:
                if isinstance(item, (FrameBatch, SeriesEvent, FrameBarrier)):
                    self.frames.handle(item)
                elif item.name == "event":
                    batch = [item.doc]
                    while len(batch) < self.config.max_page_size:
                        try:
                            nxt = self.queue.get_nowait()
                        except queue.Empty:
                            break
                        if getattr(nxt, "name", None) == "event" and nxt.doc["descriptor"] == item.doc["descriptor"]:
                            batch.append(nxt.doc)
                        else:
                            self._pending = nxt
                            break
                    n = len(batch)
                    self._event_page(pack_event_page(*batch), item.source)
                else:
                    getattr(self, "_" + item.name, self._ignore)(item.doc, item.source)
            except Exception:  # the router must outlive any document
                log.exception("router failed on a %s document", item.name)
                self.metrics.bad_messages.labels(item.source, "router_error").inc(n)
            finally:
                self.metrics.queue_depth.labels("documents").set(self.queue.qsize())
                with self._idle:
                    self._in_flight -= n
                    self._idle.notify_all()

    def _ignore(self, doc: dict[str, Any], source: str) -> None:
        """Resource, Datum, StreamResource, StreamDatum: not used by the spectral path."""

    def _reject(self, source: str, reason: str, message: str) -> None:
        log.warning("%s: %s", reason, message)
        self.metrics.bad_messages.labels(source, reason).inc()

    # -- documents ---------------------------------------------------------------------------
    def _start(self, doc: dict[str, Any], source: str, *, joined_midway: bool = False) -> RunState | None:
        uid = doc["uid"]
        if uid in self._runs:
            self._reject(source, "duplicate_start", f"second RunStart with uid {uid}")
            return None
        nav_shape = nav_shape_from_start(doc)
        info = RunInfo(uid=uid, nav_shape=nav_shape, start_doc=doc)
        run = RunState(uid=uid, start_doc=doc, nav_shape=nav_shape,
                       snaking=snaking_from_start(doc, len(nav_shape)), info=info, joined_midway=joined_midway)
        for name, cls, params in self._consumers:
            slot_info = RunInfo(uid=uid, nav_shape=nav_shape, start_doc=doc, skipped=self._skip_counter(name))
            try:
                consumer = cls(params.model_copy(), slot_info)
            except Exception:
                log.exception("consumer %s could not be created for run %s", name, uid)
                self.metrics.consumer_failures.labels(name).inc()
                continue
            consumer.name = name
            run.slots.append(ConsumerSlot(name=name, consumer=consumer))
        self._runs[uid] = run
        self.store.add(run)
        self.metrics.runs_open.set(len(self._runs))
        log.info("run %s opened (plan %s, nav shape %s%s)", uid, doc.get("plan_name"), nav_shape,
                 ", joined mid-run" if joined_midway else "")
        self._call_all(run, "start", doc)
        self._notify("start", run, doc)
        return run

    def _start_midway(self, doc: dict[str, Any], source: str) -> RunState | None:
        self.metrics.runs_joined_midway.inc()
        return self._start(doc, source, joined_midway=True)

    def _descriptor(self, doc: dict[str, Any], source: str) -> None:
        run = self._runs.get(doc["run_start"])
        if run is None:
            self.metrics.runs_joined_midway.inc()
            log.warning("descriptor %s for run %s whose RunStart was not seen: joining mid-run", doc["uid"], doc["run_start"])
            run = self._start(self.midway.start_for(doc["run_start"], source, doc["time"])[0], source, joined_midway=True)
            if run is None:
                return
        self._descriptor_run[doc["uid"]] = run.uid
        run.descriptor_shapes[doc["uid"]] = {k: v.get("shape") for k, v in doc["data_keys"].items()}
        run.descriptor_streams[doc["uid"]] = doc.get("name", PRIMARY)
        run.last_activity = time.time()
        if doc.get("name", PRIMARY) != PRIMARY:
            return
        run.primary_descriptors.add(doc["uid"])
        self._call_all(run, "descriptor", doc, inputs="events")
        if not run.buffers_allocated:
            self._allocate(run)
        self._notify("descriptor", run, doc)
        self.midway.descriptor_arrived(doc["uid"])

    def _allocate(self, run: RunState) -> None:
        capacity = run.expected_points or INITIAL_CAPACITY
        for slot in run.slots:
            if not slot.active or slot.consumer.inputs != "events":
                continue  # frame consumers declare their buffers after a series starts
            specs = self._call(run, slot, "result_buffers")
            if specs is None:
                continue
            for spec in specs:
                if spec.metric is not None and spec.metric not in SCIENCE_GAUGES:
                    raise ValueError(f"consumer {slot.name} binds unknown metric {spec.metric!r}")
            slot.specs = {s.name: s for s in specs}
            slot.allocate(capacity)
        run.buffers_allocated = True

    def _event_page(self, page: dict[str, Any], source: str) -> None:
        run_uid = self._descriptor_run.get(page["descriptor"])
        n = len(page["seq_num"])
        if run_uid is None and self.midway.hold(page, source):
            return
        run_uid = self._descriptor_run.get(page["descriptor"])  # hold() may have built it
        if run_uid is None or run_uid not in self._runs:
            self.metrics.bad_messages.labels(source, "event_before_descriptor").inc(n)
            log.warning("%d event(s) for unknown descriptor %s skipped", n, page["descriptor"])
            return
        run = self._runs[run_uid]
        now = time.time()
        run.last_event = run.last_activity = now
        self.metrics.last_event_time.set(now)
        run.count_events(page["descriptor"], page["seq_num"])
        if page["descriptor"] not in run.primary_descriptors:
            return
        positions = flat_positions(np.asarray(page["seq_num"]), run.nav_shape, run.snaking)
        if (positions < 0).any():
            self.metrics.bad_messages.labels(source, "seq_num_outside_scan").inc(int((positions < 0).sum()))
        if len(positions):
            run.max_position = max(run.max_position, int(positions.max()))
        if run.nav_shape == (0,):
            self._ensure_capacity(run, run.max_position + 1)
        self._call_all(run, "event_page", page, positions, inputs="events")
        run.events_done += n
        self.metrics.events_processed.inc(n)
        self._update_gauges(run)
        self._notify("event_page", run, page)

    def _stop(self, doc: dict[str, Any], source: str) -> None:
        run = self._runs.get(doc["run_start"]) or self.midway.adopt_stop(doc, source, self._runs)
        if run is None:
            self._reject(source, "stop_for_unknown_run", f"RunStop for run {doc['run_start']} that is not open")
            return
        if self.frames.park_stop(run, doc):
            return
        self._finish(run, doc.get("exit_status", "success"), doc)

    # -- helpers -----------------------------------------------------------------------------
    def _finish(self, run: RunState, status: str, doc: dict[str, Any]) -> None:
        self._call_all(run, "stop", doc)
        missing = run.missing_events(doc.get("num_events") or {})
        if missing:
            run.events_missing = missing
            self.metrics.events_missing.inc(missing)
            log.warning("run %s: %d event(s) announced but never received (lost before beamlens)", run.uid, missing)
        if self.checkpointer is not None:
            self.checkpointer.remove(run.uid)
        run.status = status
        run.closed = time.time()
        del self._runs[run.uid]
        self.frames.run_finished(run)
        self._descriptor_run = {d: r for d, r in self._descriptor_run.items() if r != run.uid}
        self.store.add(run)  # re-add prunes old finished runs
        self.metrics.runs_open.set(len(self._runs))
        self.metrics.runs.labels(status).inc()
        self._update_gauges(run)
        log.info("run %s %s after %d events, %d frames", run.uid, status, run.events_done, run.frames_done)
        self._notify("stop", run, doc)

    def _close_open_runs(self, status: str, reason: str) -> None:
        for run in list(self._runs.values()):
            self._finish(run, status, self._synthetic_stop(run, status, reason))

    def _ensure_capacity(self, run: RunState, needed: int) -> None:
        for slot in run.slots:
            nav = [a for n, a in slot.arrays.items() if slot.specs[n].kind == "nav"]
            if nav and len(nav[0]) < needed:
                slot.grow_nav(max(needed, 2 * len(nav[0])))

    def _call_all(self, run: RunState, method: str, *args: Any, inputs: str | None = None,
                  frame_source: str | None = None) -> None:
        """Call ``method`` on every active consumer of ``run`` (only those with ``inputs`` if given,
        and only those that analyse ``frame_source`` if given)."""
        for slot in run.slots:
            if slot.active and (inputs is None or slot.consumer.inputs == inputs) and (
                    frame_source is None or self.takes_frames_from(slot.name, frame_source)):
                self._call(run, slot, method, *args)

    def takes_frames_from(self, consumer: str, source: str) -> bool:
        """Whether consumer ``consumer`` analyses series of frame source ``source`` (config
        ``frame_sources``)."""
        allowed = self._frame_filter.get(consumer)
        return allowed is None or source in allowed

    def _call(self, run: RunState, slot: ConsumerSlot, method: str, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return getattr(slot.consumer, method)(*args)
        except NotApplicable as exc:
            slot.inactive_reason = str(exc)
            log.info("consumer %s sits out run %s: %s", slot.name, run.uid, exc)
        except BadData as exc:
            n = len(args[1]) if method in ("event_page", "frames") else 1
            self.metrics.points_skipped.labels(slot.name, exc.reason).inc(n)
            log.warning("consumer %s skipped %d point(s) of run %s: %s", slot.name, n, run.uid, exc)
        except Exception:
            slot.failures += 1
            self.metrics.consumer_failures.labels(slot.name).inc()
            log.exception("consumer %s failed in %s of run %s (failure %d)", slot.name, method, run.uid, slot.failures)
            if self.config.strict:
                raise
            if slot.failures >= self.config.max_failures_per_run:
                slot.quarantined = True
                self.metrics.consumers_quarantined.labels(slot.name, "failures").inc()
                log.error("consumer %s quarantined for the rest of run %s", slot.name, run.uid)
        finally:
            elapsed = time.perf_counter() - t0
            slot.busy_s += elapsed
            self.metrics.processing_seconds.labels(slot.name, method).observe(elapsed)
        return None

    def _skip_counter(self, consumer: str) -> Callable[[str, int], None]:
        counter = self.metrics.points_skipped

        def skipped(reason: str, n: int) -> None:
            if n:
                counter.labels(consumer, reason).inc(n)
        return skipped

    def _update_gauges(self, run: RunState) -> None:
        open_runs = list(self._runs.values())
        newest = open_runs[-1] if open_runs else run
        self.metrics.run_progress.set(newest.progress)
        for slot in run.slots:
            for name, spec in slot.specs.items():
                if spec.metric is None:
                    continue
                gauge = self.metrics.science[spec.metric]
                for i, value in enumerate(np.ravel(slot.arrays[name])):
                    if np.isfinite(value):
                        gauge.labels(slot.name, str(i)).set(float(value))

    def _notify(self, name: str, run: RunState, doc: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(name, run, doc)
            except Exception:
                log.exception("router listener failed on %s", name)

