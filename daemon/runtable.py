"""The run table: every run the daemon analyses, from open to closed, behind one public API.

- :meth:`RunTable.open` makes a run's state and one instance of every enabled consumer (a
  :class:`~beamlens.daemon.results.ConsumerSlot` each), and calls their ``start``.
- :meth:`RunTable.offer` offers signals (a primary descriptor's data keys, a frame series) to the
  run's consumers (``Consumer.signal``) and allocates the buffers they declare, private ones
  included, within the memory budget (:meth:`RunTable.allocate`); :meth:`RunTable.place` grows
  the nav buffers of runs of unknown length, then rolls them on.
- :meth:`RunTable.deliver` hands a :class:`~beamlens.consumers.base.Batch` to every consumer that
  took its signal: ``process`` at once, or, for consumers with a ``stage``, after the stage ran on
  the pool (:mod:`beamlens.daemon.pool`), in batch order.
- :meth:`RunTable.finish` closes a run in two steps: ``finish()`` on each consumer, the run
  ``finishing`` (visible in the store and ``/api``) while its background jobs run, then, once they
  are installed or after ``router.finish_timeout_s`` (late jobs cancelled), ``results()``,
  ``stop(doc)``, the final status and the sinks' ``stop`` notification. :meth:`RunTable.poll`
  (the router loop, every turn) installs finished jobs and completes runs whose work is done, so
  the router keeps routing (and ``/health/live`` stays green) during a long final fit.
- :meth:`RunTable.notify` tells the sinks (router listeners) of ``start``, ``descriptor``,
  ``event_page``, ``frames``, ``results`` and ``stop``. ``results`` follows work installed from the
  pool after the data's own notification: ``{"consumer": name, "seq_num": [...]}`` with the points
  a staged ``process`` wrote (empty for a ``then`` callback, which may have written anything).

Everything here runs on the router thread; sinks read runs through the
:class:`~beamlens.daemon.results.RunStore`.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import wait as wait_futures
from typing import Any

import numpy as np

from beamlens.consumers.base import Batch, BufferSpec, RunInfo, SignalInfo

from .config import Config, consumer_params
from .dispatch import Dispatcher, Refused
from .executors import Partial, merge_partial, stage_executor
from .isolation import RateLimitedLog, guarded
from .limits import MAX_WIRE_INDEX, MIB, Buckets, fixed_bytes, nav_bytes_per_point
from .metrics import SCIENCE_GAUGES, Metrics
from .placement import nav_shape_from_start, snaking_from_start
from .pool import Job, JobPool, default_workers
from .results import ConsumerSlot, RunState, RunStore

log = logging.getLogger("beamlens.daemon.router")

INITIAL_CAPACITY = 1024
STAGED_PER_WORKER = 2
"""Batches a consumer may have in its stage at once, per pool worker (then delivery waits)."""

Listener = Callable[[str, RunState, dict[str, Any]], None]


def wants_stream(consumer: Any, stream: str) -> bool:
    """Whether ``consumer`` is offered event signals of ``stream``: always ``primary``; another
    named stream only when its class opts in (``Consumer.streams`` names it, or ``"*"``)."""
    if stream == "primary":
        return True
    wanted = getattr(type(consumer), "streams", ())
    return isinstance(wanted, tuple) and (stream in wanted or "*" in wanted)


def result_budget_bytes(config: Config) -> float:
    """The memory budget for result buffers: ``limits.memory_budget_mib`` less, per frame source,
    its queue (``frame_queue_mib``) and the batches it may have in flight (``frames_in_flight + 1``
    batches of ``batch_max_mib``), bytes."""
    lim = config.limits
    frames = len(config.sources.frames) * (lim.frame_queue_mib + (config.router.frames_in_flight + 1) * lim.batch_max_mib)
    return max(0.0, lim.memory_budget_mib - frames) * MIB


def synthetic_stop(run: RunState, status: str, reason: str) -> dict[str, Any]:
    """A RunStop-like document for a run beamlens closes itself (series end, timeout, shutdown):
    ``run_start``, ``exit_status``, ``reason``, ``time``, a fresh ``uid`` and empty ``num_events``."""
    return {"run_start": run.uid, "exit_status": status, "reason": reason, "time": time.time(),
            "uid": uuid.uuid4().hex, "num_events": {}}


class RunTable:
    """Open and finishing runs, their consumers, buffers and background jobs (router thread).

    Args:
        config: the validated daemon config.
        metrics: where to count.
        store: where runs live for the sinks.
        wake: called from a pool worker when a job finished (wakes the router loop).
    """

    def __init__(self, config: Config, metrics: Metrics, store: RunStore, wake: Callable[[], None] = lambda: None):
        self.config = config.router
        self.limits = config.limits
        self.metrics = metrics
        self.store = store
        self.budget_bytes = result_budget_bytes(config)
        """Bytes the buffers of open and kept runs may hold (the memory budget less what the frame
        sources' queues and batches may hold)."""
        self.dispatcher = Dispatcher(metrics, config.router.max_failures_per_run, config.router.strict)
        self.pool = JobPool(config.router.pool_workers or default_workers(), wake)
        self.pool.stage_executor = stage_executor(config.executor)
        self.rlog = RateLimitedLog(log)
        self.initial_capacity = INITIAL_CAPACITY
        self.runs: dict[str, RunState] = {}
        """Open runs by uid, oldest first."""
        self.finishing: dict[str, RunState] = {}
        """Runs whose data is complete, waiting for their consumers' background jobs."""
        self.descriptor_run: dict[str, str] = {}
        """Descriptor uid -> uid of its (open) run."""
        self.listeners: list[Listener] = []
        self.on_closed: list[Callable[[RunState], None]] = []
        """Called when a run leaves the open runs (finishing or suspended): the frame router's
        stop gate."""
        self.on_finished: list[Callable[[RunState], None]] = []
        """Called when a run starts finishing (its data is complete): the checkpointer removes
        its checkpoint."""
        self._jobs: dict[str, set[Job]] = {}
        self._offered: dict[int, list[SignalInfo]] = {}
        """During :meth:`offer`: the signals each slot took in this round (undone if refused)."""
        self._run_starts = Buckets(config.limits.run_starts_per_s, config.limits.run_start_burst)
        self._consumers = []
        self._frame_filter: dict[str, frozenset[str] | None] = {}
        for c in config.consumers:
            if c.enabled:
                cls = c.resolve()
                self._consumers.append((c.name, cls, consumer_params(cls, c.params, config)))
                self._frame_filter[c.name] = frozenset(c.frame_sources) if c.frame_sources is not None else None

    # -- small helpers -----------------------------------------------------------------------
    def guard(self, component: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one unit of the daemon's own work under isolation (:func:`~beamlens.daemon.isolation.guarded`)."""
        return guarded(component, self.count_internal, self.rlog, fn, *args)

    def count_internal(self, component: str) -> None:
        self.metrics.internal_errors.labels(component).inc()

    def reject(self, source: str, reason: str, message: str, n: int = 1) -> None:
        """Count ``n`` rejected messages under ``beamlens_bad_messages_total{source, reason}`` and
        log (rate-limited per reason)."""
        self.rlog.log(logging.WARNING, f"reject:{source}:{reason}", "%s: %s", reason, message[:300])
        self.metrics.bad_messages.labels(source, reason).inc(n)

    def takes_frames_from(self, consumer: str, source: str) -> bool:
        """Whether consumer ``consumer`` analyses series of frame source ``source`` (config
        ``frame_sources``)."""
        allowed = self._frame_filter.get(consumer)
        return allowed is None or source in allowed

    def live(self, uid: str) -> RunState | None:
        """The open or finishing run ``uid``, else None."""
        return self.runs.get(uid) or self.finishing.get(uid)

    def set_open_gauge(self) -> None:
        self.metrics.runs_open.set(len(self.runs) + len(self.finishing))

    # -- open --------------------------------------------------------------------------------
    def open(self, doc: dict[str, Any], source: str, *, joined_midway: bool = False, rate_limited: bool = True,
             received: float | None = None) -> RunState | None:
        """Open a run from its RunStart (or a synthetic one): state, consumers, ``start`` hooks,
        sinks told. Refused (None, counted) for a bad or duplicate uid, or over
        ``limits.run_starts_per_s``; at ``limits.max_open_runs`` the oldest open run is closed."""
        uid = doc.get("uid")
        if not isinstance(uid, str) or not 0 < len(uid) <= 512:
            self.reject(source, "bad_uid", f"RunStart uid {str(uid)[:64]!r} is not a string of 1 to 512 characters")
            return None
        if uid in self.runs or uid in self.finishing:
            self.reject(source, "duplicate_start", f"second RunStart with uid {uid[:64]!r}")
            return None
        if rate_limited and not self._run_starts.take(source, received if received is not None else time.time()):
            self.metrics.limit_actions.labels("run_start_rate", "refused").inc()
            self.reject(source, "run_start_rate", f"RunStart {uid[:64]!r} over limits.run_starts_per_s")
            return None
        while len(self.runs) >= self.limits.max_open_runs:
            oldest = next(iter(self.runs.values()))
            self.metrics.limit_actions.labels("open_runs", "closed_oldest").inc()
            self.rlog.log(logging.WARNING, "open_runs", "%d runs open (limits.max_open_runs): closing the oldest, %s, "
                          "as incomplete", len(self.runs), oldest.uid[:64])
            self.finish(oldest, "incomplete", synthetic_stop(oldest, "incomplete", "too many open runs"))
        nav_shape = nav_shape_from_start(doc)
        if math.prod(nav_shape) > MAX_WIRE_INDEX:
            self.reject(source, "bad_shape", f"RunStart shape {nav_shape} of run {uid[:64]!r}: too many points; "
                        "treated as a run of unknown length")
            nav_shape = (0,)
        run = RunState(uid=uid, start_doc=doc, nav_shape=nav_shape, snaking=snaking_from_start(doc, len(nav_shape)),
                       info=RunInfo(uid=uid, nav_shape=nav_shape, start_doc=doc), joined_midway=joined_midway)
        for name, cls, params in self._consumers:
            slot = self.new_slot(run, name, cls, params.model_copy())
            if slot is not None:
                run.slots.append(slot)
        self.runs[uid] = run
        self.store.add(run)
        self.set_open_gauge()
        log.info("run %s opened (plan %s, nav shape %s%s)", uid, doc.get("plan_name"), nav_shape,
                 ", joined mid-run" if joined_midway else "")
        self.call_all(run, "start", doc)
        self.notify("start", run, doc)
        return run

    def new_slot(self, run: RunState, name: str, cls: type, params: Any) -> ConsumerSlot | None:
        """A fresh consumer instance for ``run`` with its own :class:`RunInfo` (skip counter, pool
        submission); None (counted as a failure) when its constructor raises."""
        holder: list[ConsumerSlot] = []
        info = RunInfo(uid=run.uid, nav_shape=run.nav_shape, start_doc=run.start_doc,
                       skipped=self._skip_counter(name), submit=self._submitter(run.uid, holder))
        try:
            consumer = cls(params, info)
        except Exception:
            log.exception("consumer %s could not be created for run %s", name, run.uid)
            self.metrics.consumer_failures.labels(name).inc()
            return None
        consumer.name = name
        slot = ConsumerSlot(name=name, consumer=consumer)
        holder.append(slot)
        return slot

    def consumer_class(self, name: str) -> tuple[type, Any] | None:
        """The configured class and params of consumer ``name`` (None if not configured now)."""
        for n, cls, params in self._consumers:
            if n == name:
                return cls, params.model_copy()
        return None

    def _skip_counter(self, consumer: str) -> Callable[[str, int], None]:
        counter = self.metrics.points_skipped

        def skipped(reason: str, n: int) -> None:
            if n:
                counter.labels(consumer, reason).inc(n)
        return skipped

    def _submitter(self, uid: str, holder: list[ConsumerSlot]) -> Callable[..., None]:
        def submit(fn: Callable[..., Any], *args: Any, then: Callable[[Any], None] | None = None) -> None:
            run = self.live(uid)
            if run is None or not holder:
                log.warning("run %s is closed: background job %s not started", uid, getattr(fn, "__name__", fn))
                return
            self._start_job(run, Job(uid, holder[0], "submit", fn, args, then))
        return submit

    def _start_job(self, run: RunState, job: Job) -> Job:
        job.slot.jobs += 1
        self._jobs.setdefault(run.uid, set()).add(job)
        return self.pool.submit(job)

    # -- consumers ---------------------------------------------------------------------------
    def call_all(self, run: RunState, method: str, *args: Any) -> None:
        """Call ``method`` on every active consumer of ``run``."""
        for slot in run.slots:
            if slot.active:
                self.dispatcher.call(run, slot, method, *args)

    def call_takers(self, run: RunState, method: str) -> None:
        """Call ``method`` on every active consumer of ``run`` that took at least one signal
        (``finish`` and ``results`` concern data: a consumer that took none has no buffers)."""
        for slot in run.slots:
            if slot.active and slot.signals:
                self.dispatcher.call(run, slot, method)

    def offer(self, run: RunState, signals: Iterable[SignalInfo], frame_source: str | None = None) -> None:
        """Offer ``signals`` to every consumer of ``run`` that takes new signals (for a frame
        series only those that analyse ``frame_source``), then allocate what they declared. A
        consumer that took no event signal sits out with its refusals as the reason (still offered
        later frame series); one binding an unknown metric is set aside (a consumer bug)."""
        signals = list(signals)
        other_stream = any(i.stream != "primary" for i in signals)
        declared: list[tuple[ConsumerSlot, list[BufferSpec]]] = []
        for slot in run.slots:
            if not slot.offerable or (frame_source is not None and not self.takes_frames_from(slot.name, frame_source)):
                continue
            specs: list[BufferSpec] = []
            refusals: list[str] = []
            taken: list[SignalInfo] = []
            for info in signals:
                if info.kind == "event" and not wants_stream(slot.consumer, info.stream):
                    continue  # other streams only to consumers that opt in (Consumer.streams)
                got = self.dispatcher.call(run, slot, "signal", info)
                if isinstance(got, Refused):
                    refusals.append(got.reason)
                    log.info("consumer %s leaves signal %s of run %s: %s", slot.name, info.name, run.uid, got.reason)
                    continue
                if got is None or not slot.offerable:
                    continue
                bad = self._bad_specs(slot, got)
                if bad:
                    slot.inactive_reason, slot.refused_only = bad, False
                    self.metrics.consumer_failures.labels(slot.name).inc()
                    log.error("consumer %s %s; it sits out run %s", slot.name, bad, run.uid)
                    specs = []
                    break
                slot.signals.append(info)
                taken.append(info)
                specs += [s for s in got if s.name not in slot.buffers]
                if slot.refused_only:
                    slot.inactive_reason, slot.refused_only = None, False
            if specs:
                declared.append((slot, specs))
                self._offered[id(slot)] = taken
            if not slot.signals and slot.inactive_reason is None and refusals and frame_source is None \
                    and not other_stream:
                slot.inactive_reason, slot.refused_only = "; ".join(dict.fromkeys(refusals)), True
        try:
            self.allocate(run, declared)
        finally:
            self._offered.clear()

    @staticmethod
    def _bad_specs(slot: ConsumerSlot, specs: Any) -> str | None:
        if not isinstance(specs, list) or not all(isinstance(s, BufferSpec) for s in specs):
            return "declared buffers that are not a list of BufferSpec"
        unknown = [s.metric for s in specs if s.metric is not None and s.metric not in SCIENCE_GAUGES]
        if unknown:
            return f"binds unknown metric(s) {unknown}"
        clash = [s.name for s in specs if s.name in slot.buffers and slot.buffers.specs[s.name] != s]
        if clash:
            return f"declares buffer(s) {clash} twice with different specs"
        return None

    def allocate(self, run: RunState, declared: list[tuple[ConsumerSlot, list[BufferSpec]]]) -> None:
        """Allocate the declared buffers within the memory budget (``limits``).

        A run of known length whose buffers do not fit (after dropping kept finished runs) is
        downgraded to a rolling window of unknown length (``limited = "rolling_window"``); if even
        that does not fit, the slots sit the run out (``refused``). Both are counted in
        ``beamlens_limit_actions_total{limit="memory_budget"}``. Slots joining a run whose buffers
        exist already get the same capacity.
        """
        if not declared:
            return
        per_point = sum(nav_bytes_per_point({s.name: s for s in specs}) for _, specs in declared)
        fixed = sum(fixed_bytes({s.name: s for s in specs}) for _, specs in declared)
        if run.nav_capacity:
            points = run.nav_capacity
        elif run.nav_shape == (0,):
            points = min(self.initial_capacity, self.limits.open_ended_max_points)
        else:
            points = run.expected_points or self.initial_capacity
        if not self.store.make_room(per_point * points + fixed, self.budget_bytes) \
                and not run.nav_capacity and run.nav_shape != (0,):
            self.metrics.limit_actions.labels("memory_budget", "rolling_window").inc()
            log.error("run %s: buffers for its %d points (%.0f MiB) exceed the memory budget; keeping a rolling "
                      "window of the newest points instead", run.uid, points, (per_point * points + fixed) / MIB)
            self._to_rolling(run)
            points = min(self.initial_capacity, self.limits.open_ended_max_points)
        if not self.store.make_room(per_point * points + fixed, self.budget_bytes):
            self.metrics.limit_actions.labels("memory_budget", "refused").inc()
            log.error("run %s: no room in the memory budget for the buffers of %s (%.0f MiB); they sit the run out",
                      run.uid, [s.name for s, _ in declared], (per_point * points + fixed) / MIB)
            run.limited = "refused"
            for slot, _ in declared:
                slot.inactive_reason, slot.refused_only = "memory budget exceeded", False
                for info in self._offered.get(id(slot), ()):  # taken without buffers: not taken at all
                    slot.signals.remove(info)
            return
        for slot, specs in declared:
            slot.allocate(specs, points)
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
            per_point = sum(nav_bytes_per_point(s.buffers.specs) for s in run.slots if s.buffers)
            if new > cap and not self.store.make_room((new - cap) * per_point, self.budget_bytes):
                new = cap
                if run.limited is None:
                    self.metrics.limit_actions.labels("memory_budget", "rolling_window").inc()
                    log.error("run %s: the memory budget is reached; its map keeps a rolling window of the newest "
                              "%d points", run.uid, cap)
            if new > cap:
                for slot in run.slots:
                    if slot.buffers:
                        slot.grow_nav(new)
                run.nav_capacity = cap = new
                self.metrics.result_buffer_bytes.set(self.store.nbytes())
            if need > cap:
                shift = need - cap + cap // 4
                for slot in run.slots:
                    if slot.buffers:
                        slot.roll_nav(shift)
                run.nav_offset += shift
                if run.limited is None:
                    run.limited = "rolling_window"
                    self.metrics.limit_actions.labels("open_ended_max_points", "rolling_window").inc()
        rel = positions - run.nav_offset
        return np.where(valid & (rel >= 0), rel, -1)

    def takers(self, run: RunState, signal: str) -> list[ConsumerSlot]:
        """Active consumers of ``run`` that took ``signal``."""
        return [s for s in run.slots if s.active and s.takes(signal)]

    def deliver(self, run: RunState, batch: Batch, slots: list[ConsumerSlot] | None = None) -> None:
        """Hand ``batch`` to the consumers that took its signal (``process``, or the stage first)."""
        for slot in (slots if slots is not None else self.takers(run, batch.signal.name)):
            if not slot.active:
                continue
            if slot.consumer.has_stage or self._partitioned(slot):
                self._stage(run, slot, batch)
            else:
                self._process(run, slot, batch, None)

    def _process(self, run: RunState, slot: ConsumerSlot, batch: Batch, staged: Any) -> None:
        if self.dispatcher.call(run, slot, "process", batch, staged, points=len(batch)) is True and slot.active:
            self.dispatcher.call(run, slot, "results")

    def _partitioned(self, slot: ConsumerSlot) -> bool:
        """Whether ``slot``'s batches are processed as partitions on the stage executor (a
        mergeable consumer named in ``executor.partitions``)."""
        remote = self.pool.stage_executor
        return remote is not None and slot.name in remote.partitions and slot.consumer.mergeable

    def _stage(self, run: RunState, slot: ConsumerSlot, batch: Batch) -> None:
        remote = self.pool.stage_executor
        limit = remote.limit if remote is not None else STAGED_PER_WORKER * self.pool.workers
        while len(slot.staged) >= limit:
            head = slot.staged[0][1]
            if head.future is not None:
                wait_futures([head.future])
            self.poll()
        job = Job(run.uid, slot, "stage", slot.consumer.stage, (batch,), partial=not slot.consumer.has_stage)
        job = self._start_job(run, job)
        slot.staged.append([batch, job, run.nav_offset])

    # -- background jobs ---------------------------------------------------------------------
    def poll(self) -> None:
        """Install finished pool jobs (``then`` callbacks, staged batches' ``process``, in batch
        order), then complete finishing runs whose work is done or whose time is up."""
        touched: dict[tuple[str, str], list[int]] = {}
        for job in self.pool.done():
            if self._install(job):
                touched.setdefault((job.run_uid, job.slot.name), [])
        for uid in {uid for uid, _ in touched}:
            run = self.live(uid)
            if run is not None:
                for slot in run.slots:
                    written = self._deliver_staged(run, slot)
                    if written:
                        touched.setdefault((uid, slot.name), []).extend(written)
        for (uid, consumer), seq in touched.items():
            run = self.live(uid)
            if run is not None:
                self.guard("results", self.update_gauges, run)  # a refit's results reach /metrics now
                self.notify("results", run, {"consumer": consumer, "seq_num": seq})
        if self.finishing:
            for run in list(self.finishing.values()):
                self.guard("finish", self._advance, run)

    @property
    def busy(self) -> bool:
        """Pool jobs are in flight or runs are finishing (the router loop then polls often)."""
        return bool(self.finishing) or self.pool.in_flight > 0

    def _install(self, job: Job) -> bool:
        """Take a finished job back; True when a ``then`` callback ran or a stage result is ready."""
        slot, run = job.slot, self.live(job.run_uid)
        slot.jobs -= 1
        jobs = self._jobs.get(job.run_uid)
        if jobs is not None:
            jobs.discard(job)
        self.dispatcher.charge(slot, job.method, job.elapsed)
        outcome = "cancelled" if job.cancelled or run is None else "failed" if job.error is not None else "ok"
        self.metrics.consumer_jobs.labels(slot.name, job.method, outcome).inc()
        job.installed = True
        if outcome == "cancelled":
            return False
        if job.error is not None:
            self.dispatcher.failed(run, slot, job.method, job.error)
            return job.method == "stage"
        if job.method == "submit" and job.then is not None and not slot.quarantined:
            self.dispatcher.run_guarded(run, slot, "then", job.then, job.result)
        return True

    def _deliver_staged(self, run: RunState, slot: ConsumerSlot) -> list[int]:
        """``process`` the staged batches whose stage is done, in batch order; their seq_nums."""
        written: list[int] = []
        while slot.staged and slot.staged[0][1].installed:
            batch, job, offset = slot.staged.popleft()
            if job.error is not None or job.cancelled or not slot.active:
                continue
            if job.partial:
                self._merge_partial(run, slot, job.result, run.nav_offset - offset)
                written += batch.seq_num.tolist()
                continue
            if run.nav_offset != offset:  # the window rolled on meanwhile
                idx = batch.nav_index - (run.nav_offset - offset)
                keep = idx >= 0
                batch = Batch(batch.signal, batch.data[keep], idx[keep], batch.seq_num[keep], batch.time[keep])
                if not len(batch):
                    continue
            self._process(run, slot, batch, job.result)
            written += batch.seq_num.tolist()
        return written

    def _merge_partial(self, run: RunState, slot: ConsumerSlot, partial: Partial, shift: int) -> None:
        """Fold a partition's partial buffers into the run's instance (``merge``, then ``results``
        when its ``process`` asked), on this thread, charged and isolated like ``process``."""
        rows = partial.rows - shift if shift else None
        if self.dispatcher.run_guarded(run, slot, "merge", merge_partial, slot.consumer, partial, rows) is True \
                and slot.active:
            self.dispatcher.call(run, slot, "results")

    # -- finish ------------------------------------------------------------------------------
    def finish(self, run: RunState, status: str, doc: dict[str, Any], source: str | None = None) -> None:
        """The run's data is complete: it leaves the open runs, its consumers' ``finish`` is called
        once their staged batches are in, and it is ``finishing`` until its jobs are installed
        (or ``router.finish_timeout_s``), then closed (:meth:`complete`)."""
        if run.uid not in self.runs:
            return
        try:
            del self.runs[run.uid]
            self.descriptor_run = {d: r for d, r in self.descriptor_run.items() if r != run.uid}
            run.status = "finishing"
            run.finishing = {"status": status, "doc": doc, "source": source,
                             "deadline": time.monotonic() + self.config.finish_timeout_s}
            self.finishing[run.uid] = run
            for hook in (*self.on_closed, *self.on_finished):
                self.guard("finish", hook, run)
            self.store.add(run)
        finally:
            if run.uid not in self.finishing:  # a bug above: close it all the same
                self.finishing[run.uid] = run
        self.guard("finish", self._advance, run)

    def _advance(self, run: RunState) -> None:
        state = run.finishing
        if state is None or run.uid not in self.finishing:
            return
        late = time.monotonic() >= state["deadline"]
        staged = any(slot.staged for slot in run.slots)
        if staged and not late:
            return
        for slot in run.slots:
            if not slot.finished:
                slot.finished = True
                if slot.active and slot.signals:
                    self.dispatcher.call(run, slot, "finish")
        jobs = self._jobs.get(run.uid)
        if jobs and not late:
            return
        if jobs or staged:
            n = self.pool.cancel(list(jobs or ()))
            for slot in run.slots:
                slot.staged.clear()
            self.metrics.limit_actions.labels("finish_timeout", "cancelled").inc()
            log.error("run %s: %d background job(s) not done within router.finish_timeout_s (%.0f s); cancelled, the "
                      "run closes with what is installed", run.uid, n, self.config.finish_timeout_s)
        self.complete(run)

    def complete(self, run: RunState) -> None:
        """Close a finishing run: ``results()`` and ``stop`` on each consumer, bookkeeping, sinks.
        Each step is isolated and the run always leaves the table."""
        state = run.finishing or {"status": "incomplete", "doc": synthetic_stop(run, "incomplete", "closed"),
                                  "source": None}
        status, doc, source = state["status"], state["doc"], state["source"]
        try:
            self.guard("finish", self.call_takers, run, "results")
            self.guard("finish", self.call_all, run, "stop", doc)
            missing, rejected = run.missing_events(doc.get("num_events"), self.limits.max_gap)
            if rejected:
                self.reject(source or run.stop_source, "bad_num_events",
                            f"RunStop of run {run.uid[:64]} announces num_events for {rejected[:4]} that are not "
                            f"integers within the events received + limits.max_gap; seq_nums used instead")
            if missing:
                run.events_missing = missing
                self.metrics.events_missing.inc(missing)
                log.warning("run %s: %d event(s) announced but never received (lost before beamlens)", run.uid, missing)
        finally:
            run.status = status
            run.closed = time.time()
            run.finishing = None
            self.finishing.pop(run.uid, None)
            self.pool.cancel(list(self._jobs.pop(run.uid, ())))
        self.store.add(run)  # re-add prunes old finished runs
        self.set_open_gauge()
        self.metrics.runs.labels(run.status if run.status not in ("open", "finishing") else "incomplete").inc()
        self.metrics.result_buffer_bytes.set(self.store.nbytes())
        self.guard("finish", self.update_gauges, run)
        log.info("run %s %s after %d events, %d frames", run.uid, status, run.events_done, run.frames_done)
        self.notify("stop", run, doc)

    def settle(self, timeout: float) -> bool:
        """Install jobs and complete finishing runs for at most ``timeout`` s (shutdown); True if
        none is left finishing."""
        deadline = time.monotonic() + timeout
        while self.finishing and time.monotonic() < deadline:
            self.pool.wait_any(min(0.05, max(0.0, deadline - time.monotonic())))
            self.poll()
        for run in list(self.finishing.values()):  # out of time: close with what is installed
            if run.finishing is not None:
                run.finishing["deadline"] = 0.0
            self.guard("finish", self._advance, run)
        return not self.finishing

    def suspend(self, run: RunState, when: str = "at shutdown",
                reason: str = "beamlens shut down; analysis resumes on restart") -> None:
        """Take an open run out of the table without closing it (checkpointed at shutdown, resumed
        by the next daemon, or handed over to another group member): status ``suspended``, its jobs
        cancelled, sinks told (a synthetic ``abort`` RunStop carrying ``reason``)."""
        self.runs.pop(run.uid, None)
        self.descriptor_run = {d: r for d, r in self.descriptor_run.items() if r != run.uid}
        self.pool.cancel(list(self._jobs.pop(run.uid, ())))
        run.status = "suspended"
        run.closed = time.time()
        for hook in self.on_closed:
            self.guard("finish", hook, run)
        self.store.add(run)
        self.set_open_gauge()
        log.info("run %s suspended %s after %d events; resumes from its checkpoint", run.uid, when, run.events_done)
        self.notify("stop", run, synthetic_stop(run, "abort", reason))

    def adopt(self, run: RunState, descriptors: Iterable[str]) -> None:
        """Add a run rebuilt from a checkpoint to the open runs."""
        self.runs[run.uid] = run
        for d in descriptors:
            self.descriptor_run[d] = run.uid
        self.store.add(run)
        self.set_open_gauge()

    # -- sinks and gauges --------------------------------------------------------------------
    def update_gauges(self, run: RunState) -> None:
        open_runs = list(self.runs.values())
        newest = open_runs[-1] if open_runs else run
        self.metrics.run_progress.set(newest.progress)
        for slot in run.slots:
            for name, spec in slot.specs.items():
                if spec.metric is None:
                    continue
                gauge = self.metrics.science[spec.metric]
                for i, value in enumerate(np.ravel(slot.buffers[name])):
                    if not np.isnan(value):  # +Inf is a value (a forecast beyond its horizon)
                        gauge.labels(slot.name, spec.labels[i] if i < len(spec.labels) else str(i)).set(float(value))

    def notify(self, name: str, run: RunState, doc: dict[str, Any]) -> None:
        """Tell every listener (sink) ``(name, run, doc)``, each under isolation."""
        for listener in self.listeners:
            self.guard(f"sink_{getattr(listener, 'sink_name', type(listener).__name__).lower()}", listener, name, run, doc)

    def shutdown(self) -> None:
        self.pool.shutdown()
