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
import math
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
from .isolation import RateLimitedLog, guarded
from .limits import MAX_WIRE_INDEX, MIB, Buckets, checked_seq_nums, fixed_bytes, nav_bytes_per_point
from .metrics import SCIENCE_GAUGES, Metrics
from .midway import MidwayJoiner, lookups_from_config
from .placement import flat_positions, nav_shape_from_start, snaking_from_start
from .results import ConsumerSlot, RunState, RunStore
from .supervision import TICK_S, RunSupervision

log = logging.getLogger(__name__)

_STOP = object()
_BAD = object()
PRIMARY = "primary"
INITIAL_CAPACITY = 1024


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


class Router(RunSupervision):
    """Routes documents from a bounded queue to per-run consumer instances.

    Args:
        config: the validated daemon config (consumers and router sections are used).
        metrics: where to count.
        store: where runs live for the sinks.
    """

    def __init__(self, config: Config, metrics: Metrics, store: RunStore):
        self.config = config.router
        self.limits = config.limits
        self.budget_bytes = result_budget_bytes(config)
        """Bytes the result buffers of open and kept runs may hold (the memory budget less what the
        frame sources' queues and batches may hold)."""
        self._rlog = RateLimitedLog(log)
        self._run_starts = Buckets(config.limits.run_starts_per_s, config.limits.run_start_burst)
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
        self.restore_at_start = True
        """Resume every checkpointed run at start (off for Kafka sources: a group's members may share
        the state directory, so each resumes a run only when it reads the run again: :meth:`resume`)."""
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
        self._thread.join(timeout)
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
    def _guard(self, component: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one unit of the router's own work under isolation (see :mod:`beamlens.daemon.isolation`)."""
        return guarded(component, self._count_internal, self._rlog, fn, *args)

    def _count_internal(self, component: str) -> None:
        self.metrics.internal_errors.labels(component).inc()

    def _loop(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            if self.frames.waiting:
                self._guard("frames_expire", self.frames.expire)
            if self.midway.waiting:
                self._guard("midway_expire", self.midway.expire)
            if time.monotonic() >= self._next_tick:
                self._next_tick = time.monotonic() + TICK_S  # a failing tick is not retried at once
                self._guard("supervision", self._tick)
            if self._pending is not None:
                item, self._pending = self._pending, None
            else:
                try:
                    item = self.queue.get(timeout=0.05 if self.frames.waiting or self.midway.waiting else TICK_S)
                except queue.Empty:
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
                self._count_internal("router")
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
        """At stop: checkpoint open runs (``suspended``) or, without checkpoints, close them as
        ``incomplete``. Each run under isolation."""
        if self.checkpointer is not None:
            self._guard("shutdown", self._suspend_open_runs)
        for run in list(self._runs.values()):
            self._finish(run, "incomplete", self._synthetic_stop(run, "incomplete", "daemon shutting down"))

    def _ignore(self, doc: dict[str, Any], source: str) -> None:
        """Resource, Datum, StreamResource, StreamDatum: not used by the spectral path."""

    def _reject(self, source: str, reason: str, message: str, n: int = 1) -> None:
        """Count ``n`` rejected messages and log (rate-limited per reason)."""
        self._rlog.log(logging.WARNING, f"reject:{source}:{reason}", "%s: %s", reason, message[:300])
        self.metrics.bad_messages.labels(source, reason).inc(n)

    # -- documents ---------------------------------------------------------------------------
    def _start(self, doc: dict[str, Any], source: str, *, joined_midway: bool = False,
               rate_limited: bool = True) -> RunState | None:
        uid = doc.get("uid")
        if not isinstance(uid, str) or not 0 < len(uid) <= 512:
            self._reject(source, "bad_uid", f"RunStart uid {str(uid)[:64]!r} is not a string of 1 to 512 characters")
            return None
        if uid in self._runs:
            self._reject(source, "duplicate_start", f"second RunStart with uid {uid[:64]!r}")
            return None

        if rate_limited and not self._run_starts.take(source, self._item_received):
            self.metrics.limit_actions.labels("run_start_rate", "refused").inc()
            self._reject(source, "run_start_rate", f"RunStart {uid[:64]!r} over limits.run_starts_per_s")
            return None
        while len(self._runs) >= self.limits.max_open_runs:
            oldest = next(iter(self._runs.values()))
            self.metrics.limit_actions.labels("open_runs", "closed_oldest").inc()
            self._rlog.log(logging.WARNING, "open_runs", "%d runs open (limits.max_open_runs): closing the oldest, %s, "
                           "as incomplete", len(self._runs), oldest.uid[:64])
            self._finish(oldest, "incomplete", self._synthetic_stop(oldest, "incomplete", "too many open runs"))
        nav_shape = nav_shape_from_start(doc)
        if math.prod(nav_shape) > MAX_WIRE_INDEX:
            self._reject(source, "bad_shape", f"RunStart shape {nav_shape} of run {uid[:64]!r}: too many points; "
                         "treated as a run of unknown length")
            nav_shape = (0,)
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
        data_keys = doc.get("data_keys")
        if isinstance(data_keys, dict) and len(data_keys) > self.limits.max_data_keys:
            self.metrics.limit_actions.labels("data_keys", "refused").inc()
            self._reject(source, "too_many_data_keys", f"descriptor {str(doc.get('uid'))[:64]} has {len(data_keys)} "
                         f"data keys (limits.max_data_keys {self.limits.max_data_keys})")
            return
        run = self._runs.get(doc["run_start"])
        if run is None:
            self.metrics.runs_joined_midway.inc()
            log.warning("descriptor %s for run %s whose RunStart was not seen: joining mid-run", doc["uid"], doc["run_start"])
            run = self._start(self.midway.start_for(doc["run_start"], source, doc["time"])[0], source, joined_midway=True)
            if run is None:
                return
        self._descriptor_run[doc["uid"]] = run.uid
        if not isinstance(data_keys, dict):
            self._reject(source, "bad_descriptor", f"descriptor {str(doc.get('uid'))[:64]} has no data_keys map")
            return
        run.descriptor_shapes[doc["uid"]] = {k: v.get("shape") if isinstance(v, dict) else None for k, v in data_keys.items()}
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
        slots = []
        for slot in run.slots:
            if not slot.active or slot.consumer.inputs != "events":
                continue  # frame consumers declare their buffers after a series starts
            if self.declare_buffers(run, slot):
                slots.append(slot)
        self.allocate_slots(run, slots)
        run.buffers_allocated = True

    def declare_buffers(self, run: RunState, slot: ConsumerSlot) -> bool:
        """Ask a consumer for its result buffers (not allocated yet); False if it declared none or
        failed. A buffer bound to an unknown metric is a consumer bug: the consumer is set aside."""
        specs = self._call(run, slot, "result_buffers")
        if specs is None:
            return False
        unknown = [sp.metric for sp in specs if sp.metric is not None and sp.metric not in SCIENCE_GAUGES]
        if unknown:
            slot.inactive_reason = f"binds unknown metric(s) {unknown}"
            self.metrics.consumer_failures.labels(slot.name).inc()
            log.error("consumer %s binds unknown metric(s) %s; it sits out run %s", slot.name, unknown, run.uid)
            return False
        slot.specs = {sp.name: sp for sp in specs}
        return True

    def allocate_slots(self, run: RunState, slots: list[ConsumerSlot]) -> None:
        """Allocate the declared buffers of ``slots`` within the memory budget (``limits``).

        A run of known length whose buffers do not fit (after dropping kept finished runs) is
        downgraded to a rolling window of unknown length (``limited = "rolling_window"``); if even
        that does not fit, the slots sit the run out (``refused``). Both are counted in
        ``beamlens_limit_actions_total{limit="memory_budget"}``. Slots joining a run whose buffers
        exist already get the same capacity.
        """
        if not slots:
            return
        per_point = sum(nav_bytes_per_point(s.specs) for s in slots)
        fixed = sum(fixed_bytes(s.specs) for s in slots)
        if run.nav_capacity:
            points = run.nav_capacity
        elif run.nav_shape == (0,):
            points = min(self.initial_capacity, self.limits.open_ended_max_points)
        else:
            points = run.expected_points or self.initial_capacity
        if not self.store.make_room(per_point * points + fixed, self.budget_bytes) and not run.nav_capacity \
                and run.nav_shape != (0,):
            self.metrics.limit_actions.labels("memory_budget", "rolling_window").inc()
            log.error("run %s: buffers for its %d points (%.0f MiB) exceed the memory budget; keeping a rolling "
                      "window of the newest points instead", run.uid, points, (per_point * points + fixed) / MIB)
            self._to_rolling(run)
            points = min(self.initial_capacity, self.limits.open_ended_max_points)
        if not self.store.make_room(per_point * points + fixed, self.budget_bytes):
            self.metrics.limit_actions.labels("memory_budget", "refused").inc()
            log.error("run %s: no room in the memory budget for the buffers of %s (%.0f MiB); they sit the run out",
                      run.uid, [s.name for s in slots], (per_point * points + fixed) / MIB)
            run.limited = "refused"
            for slot in slots:
                slot.inactive_reason = "memory budget exceeded"
                slot.specs = {}
            return
        for slot in slots:
            slot.allocate(points)
        run.nav_capacity = points
        self.metrics.result_buffer_bytes.set(self.store.nbytes())

    def _to_rolling(self, run: RunState) -> None:
        run.nav_shape = (0,)
        run.snaking = (False,)
        run.limited = "rolling_window"
        run.info.nav_shape = (0,)
        for slot in run.slots:
            slot.consumer.run.nav_shape = (0,)

    def place(self, run: RunState, positions: np.ndarray) -> np.ndarray:
        """Where points land in the run's nav buffers: for runs of known shape ``positions``
        themselves; for runs of unknown length the buffers grow (by at most
        ``limits.open_ended_chunk_points`` beyond what is needed, within the budget and
        ``open_ended_max_points``), then roll on, keeping the newest points. Returns positions
        relative to the window (``-1``: outside the scan or older than the window)."""
        valid = positions >= 0
        if not valid.any():
            return positions
        top = int(positions.max())
        run.max_position = max(run.max_position, top)
        if run.nav_shape != (0,) or not run.nav_capacity:
            return positions
        need = top + 1 - run.nav_offset
        cap = run.nav_capacity
        if need > cap:
            limit = self.limits.open_ended_max_points
            new = min(limit, max(need, cap + min(cap, self.limits.open_ended_chunk_points)))
            per_point = sum(nav_bytes_per_point(s.specs) for s in run.slots if s.arrays)
            if new > cap and not self.store.make_room((new - cap) * per_point, self.budget_bytes):
                new = cap
                if run.limited is None:
                    self.metrics.limit_actions.labels("memory_budget", "rolling_window").inc()
                    log.error("run %s: the memory budget is reached; its map keeps a rolling window of the newest "
                              "%d points", run.uid, cap)
            if new > cap:
                for slot in run.slots:
                    if slot.arrays:
                        slot.grow_nav(new)
                run.nav_capacity = cap = new
                self.metrics.result_buffer_bytes.set(self.store.nbytes())
            if need > cap:
                shift = need - cap + cap // 4
                for slot in run.slots:
                    if slot.arrays:
                        slot.roll_nav(shift)
                run.nav_offset += shift
                if run.limited is None:
                    run.limited = "rolling_window"
                    self.metrics.limit_actions.labels("open_ended_max_points", "rolling_window").inc()
        rel = positions - run.nav_offset
        return np.where(valid & (rel >= 0), rel, -1)

    def _event_page(self, page: dict[str, Any], source: str) -> None:
        descriptor = page.get("descriptor")
        run_uid = self._descriptor_run.get(descriptor) if isinstance(descriptor, str) else None
        n = len(page["seq_num"])
        if run_uid is None and self.midway.hold(page, source):
            return
        run_uid = self._descriptor_run.get(page["descriptor"])  # hold() may have built it
        if run_uid is None or run_uid not in self._runs:
            self._reject(source, "event_before_descriptor", f"{n} event(s) for unknown descriptor {str(descriptor)[:64]} skipped", n)
            return
        run = self._runs[run_uid]
        page, n = self._checked_page(run, page, source)
        if not n:
            return
        now = time.time()
        run.last_event = run.last_activity = now
        self.metrics.last_event_time.set(now)
        run.count_events(descriptor, page["seq_num"])
        if descriptor not in run.primary_descriptors:
            return
        positions = flat_positions(np.asarray(page["seq_num"], dtype=np.int64), run.nav_shape, run.snaking)
        if (positions < 0).any():
            self.metrics.bad_messages.labels(source, "seq_num_outside_scan").inc(int((positions < 0).sum()))
        positions = self.place(run, positions)
        self._page_to_consumers(run, page, positions)
        run.events_done += n
        self.metrics.events_processed.inc(n)
        self._update_gauges(run)
        self._notify("event_page", run, page)

    def _stop(self, doc: dict[str, Any], source: str) -> None:
        run = self._runs.get(doc.get("run_start")) if isinstance(doc.get("run_start"), str) else None
        run = run or self.midway.adopt_stop(doc, source, self._runs)
        if run is None:
            self._reject(source, "stop_for_unknown_run", f"RunStop for run {str(doc.get('run_start'))[:64]} that is not open")
            return
        run.stop_source = source
        if self.frames.park_stop(run, doc):
            return
        self._finish(run, doc.get("exit_status", "success"), doc, source)

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
        self._reject(source, "bad_seq_num", f"{len(seq) - len(keep)} event(s) of run {run.uid[:64]} with seq_num not an "
                     f"integer in [1, {bound}] (limits.max_gap) skipped", len(seq) - len(keep))
        if not keep:
            return page, 0
        page = _page_subset(page, keep)
        page["seq_num"] = values
        return page, len(keep)

    def _page_to_consumers(self, run: RunState, page: dict[str, Any], positions: np.ndarray) -> None:
        """Hand a page to the run's event consumers. A consumer that rejects a page of several
        events as bad data gets them again one by one, so one wrong-length event costs only itself."""
        n = len(positions)
        for slot in run.slots:
            if not (slot.active and slot.consumer.inputs == "events"):
                continue
            if n == 1:
                self._call(run, slot, "event_page", page, positions)
            elif self._call(run, slot, "event_page", page, positions, retry_bad=True) is _BAD:
                for i in range(n):
                    if slot.active:
                        self._call(run, slot, "event_page", _page_subset(page, [i]), positions[i:i + 1])

    # -- helpers -----------------------------------------------------------------------------
    def _finish(self, run: RunState, status: str, doc: dict[str, Any], source: str | None = None) -> None:
        """Close a run: consumers' ``stop``, bookkeeping, sinks. Each step is isolated and the run
        always leaves the open runs, so a failure here cannot make it fail again every tick."""
        try:
            self._guard("finish", self._call_all, run, "stop", doc)
            missing, rejected = run.missing_events(doc.get("num_events"), self.limits.max_gap)
            if rejected:
                self._reject(source or run.stop_source, "bad_num_events",
                             f"RunStop of run {run.uid[:64]} announces num_events for {rejected[:4]} that are not "
                             f"integers within the events received + limits.max_gap; seq_nums used instead")
            if missing:
                run.events_missing = missing
                self.metrics.events_missing.inc(missing)
                log.warning("run %s: %d event(s) announced but never received (lost before beamlens)", run.uid, missing)
            if self.checkpointer is not None:
                self._guard("checkpoint", self.checkpointer.remove, run.uid)
            run.status = status
            run.closed = time.time()
        finally:
            self._runs.pop(run.uid, None)
            self._descriptor_run = {d: r for d, r in self._descriptor_run.items() if r != run.uid}
            self._guard("finish", self.frames.run_finished, run)
        self.store.add(run)  # re-add prunes old finished runs
        self.metrics.runs_open.set(len(self._runs))
        self.metrics.runs.labels(run.status if run.status != "open" else "incomplete").inc()
        self.metrics.result_buffer_bytes.set(self.store.nbytes())
        self._guard("finish", self._update_gauges, run)
        log.info("run %s %s after %d events, %d frames", run.uid, status, run.events_done, run.frames_done)
        self._notify("stop", run, doc)

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

    def _call(self, run: RunState, slot: ConsumerSlot, method: str, *args: Any, retry_bad: bool = False) -> Any:
        """Call one consumer method under isolation. ``retry_bad``: return :data:`_BAD` on
        :class:`BadData` without counting (the caller retries smaller pieces)."""
        t0 = time.perf_counter()
        try:
            return getattr(slot.consumer, method)(*args)
        except NotApplicable as exc:
            slot.inactive_reason = str(exc)
            log.info("consumer %s sits out run %s: %s", slot.name, run.uid, exc)
        except BadData as exc:
            if retry_bad:
                return _BAD
            n = len(args[1]) if method in ("event_page", "frames") else 1
            self.metrics.points_skipped.labels(slot.name, exc.reason).inc(n)
            self._rlog.log(logging.WARNING, f"bad:{slot.name}:{exc.reason}", "consumer %s skipped %d point(s) of run %s: %s",
                           slot.name, n, run.uid, exc)
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
            self._guard(f"sink_{getattr(listener, 'sink_name', type(listener).__name__).lower()}", listener, name, run, doc)


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


def result_budget_bytes(config: Config) -> float:
    """The memory budget for result buffers: ``limits.memory_budget_mib`` less, per frame source,
    its queue (``frame_queue_mib``) and the batches it may have in flight (``frames_in_flight + 1``
    batches of ``batch_max_mib``), bytes."""
    lim = config.limits
    frames = len(config.sources.frames) * (lim.frame_queue_mib + (config.router.frames_in_flight + 1) * lim.batch_max_mib)
    return max(0.0, lim.memory_budget_mib - frames) * MIB

