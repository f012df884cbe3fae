"""Run correlation and dispatch of detector frames, inside the router's thread.

Frames and Bluesky documents share the router's one thread and queue, so a consumer is never
called concurrently and a run's start, frames and stop reach it in order. This module holds the
frame-specific part of the routing:

- **Series -> run.** A series start attaches the series to the Bluesky run named in its header
  (``bluesky_run_uid`` in the DECTRIS header appendix / stream v2 ``user_data``) if that run is open,
  else to the newest open Bluesky run. With no open run the series becomes a *frame-only run* of
  its own (uid ``<source>-<series id>-<8 hex>``, ``plan_name: frame_series``, nav shape
  ``(n_frames,)`` when announced, else growing), started and stopped like any run so sinks see it.
  It stops when its series ends, when its announced frame count has arrived, or, for a format
  without end messages (array-1.0), after ``router.series_quiet_s`` without a frame (later frames
  of that series are ``stale_series``; raise it above the longest pause of a slow series).
- **Frame -> map pixel.** Frame number ``k`` (0-based) is placed like event ``seq_num = k + 1``,
  with the run's RunStart ``shape`` and ``snaking`` (:func:`beamlens.daemon.placement.flat_positions`).
- **Stale frames.** Frames of a series that is not the source's current one (superseded, ended) are
  dropped as ``stale_series``; frames whose run has stopped as ``run_closed``.
- **Stop ordering.** Frames travel by another path than documents and may lag them. A RunStop is
  therefore held until every frame source has handed over what it had received when the stop
  arrived (a :class:`~beamlens.daemon.frames.FrameBarrier` per source), and until an attached series
  that announces its end has ended, for at most ``router.series_end_grace_s``. A series that starts
  in that window, from a source whose barrier has not come back, still belongs to the held run.

Router listeners (sinks) are told of each batch as ``("frames", run, {"seq_num": [k + 1, ...],
"source": name})`` after the consumers have seen it, so derived documents and Tiled follow frame
runs point by point as they follow event pages.

Frame consumers (``inputs = "frames"``) get ``series(info)``, then ``result_buffers()`` (once per
run; nav buffers sized by the run), then ``frames(frames, positions, info)`` batches, and ``stop``.
Calls go through the router's ``_call`` (error counting, quarantine, strict mode).
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from beamlens.consumers.base import SeriesInfo

from .frames import FrameBarrier, FrameBatch, SeriesEnd, SeriesEvent, SeriesStart
from .placement import flat_positions
from .results import RunState

if TYPE_CHECKING:
    from .router import Router

log = logging.getLogger(__name__)

FRAME_SERIES_PLAN = "frame_series"


@dataclass
class SeriesState:
    source: str
    info: SeriesInfo
    run: RunState
    frame_only: bool
    has_end: bool = True
    frames_done: int = 0
    last_frame: float = field(default_factory=time.monotonic)
    """Monotonic time of the series' start or newest frame (end-less formats settle on quiet)."""


@dataclass
class HeldStop:
    """A RunStop waiting for the frame path: its deadline, the document, and the frame sources whose
    barrier has not come back yet."""

    deadline: float
    doc: dict[str, Any]
    waiting_for: set[str]
    series_start_deadline: float = 0.0
    """Until then a run that has had no series yet waits for one to start (its detector's first
    message may still be on its way when the RunStop arrives by the other transport)."""


class FrameRouter:
    """The frame half of :class:`~beamlens.daemon.router.Router` (called from its thread only)."""

    def __init__(self, router: Router):
        self.router = router
        self.metrics = router.metrics
        self._current: dict[str, SeriesState] = {}
        self._frame_only: set[str] = set()
        self._parked: dict[str, HeldStop] = {}
        self._runs_with_series: set[str] = set()
        self.sources: list[Any] = []
        """Frame sources (``name``, ``request_barrier(token)``); set by the daemon."""

    @property
    def waiting(self) -> bool:
        """True while a RunStop waits for a series end, or a frame-only series without end messages
        is open (the router then polls :meth:`expire`)."""
        return bool(self._parked) or any(st.frame_only and not st.has_end for st in self._current.values())

    def handle(self, item: FrameBatch | SeriesEvent | FrameBarrier) -> None:
        if isinstance(item, FrameBatch):
            try:
                self._frames(item)
            finally:
                item.release()
        elif isinstance(item, FrameBarrier):
            held = self._parked.get(item.token)
            if held is not None:
                held.waiting_for.discard(item.source)
                self._finish_if_settled(item.token)
        elif isinstance(item.item, SeriesStart):
            self._series_start(item.source, item.item)
        elif isinstance(item.item, SeriesEnd):
            self._series_end(item.source, item.item)

    # -- series ------------------------------------------------------------------------------
    def _series_start(self, source: str, s: SeriesStart) -> None:
        previous = self._current.pop(source, None)
        if previous is not None:
            log.warning("series %s of %s superseded by series %s before its end", previous.info.series_id, source, s.series_id)
            self._series_done(previous, "incomplete")
        info = SeriesInfo(source=source, series_id=s.series_id, sig_shape=tuple(s.sig_shape or ()),
                          dtype=s.dtype or "", n_frames=s.n_frames, meta=dict(s.meta))
        run = self._pick_run(source, s)
        frame_only = run is None
        if run is None:
            run = self.router._start(self._frame_only_start(source, s), source, rate_limited=False)
            if run is None:
                return
            self._frame_only.add(run.uid)
        state = SeriesState(source, info, run, frame_only, s.has_end)
        self._current[source] = state
        self._runs_with_series.add(run.uid)
        self.metrics.frame_series.labels(source, "no" if frame_only else "yes").inc()
        log.info("frame series %s of %s (%s, %s, %s frames) -> %s run %s", s.series_id, source, info.sig_shape,
                 info.dtype, s.n_frames or "?", "frame-only" if frame_only else "Bluesky", run.uid)
        new_slots = []
        for slot in self._frame_slots(run, source):
            self.router._call(run, slot, "series", info)
            if slot.active and not slot.specs and self.router.declare_buffers(run, slot):
                new_slots.append(slot)
        self.router.allocate_slots(run, new_slots)

    def _pick_run(self, source: str, s: SeriesStart) -> RunState | None:
        runs = self.router.open_runs
        if s.run_uid is not None and s.run_uid in runs:
            return runs[s.run_uid]
        now = time.monotonic()
        bluesky = [r for uid, r in runs.items() if uid not in self._frame_only
                   and (uid not in self._parked or source in self._parked[uid].waiting_for
                        or (uid not in self._runs_with_series and now < self._parked[uid].series_start_deadline))]
        return bluesky[-1] if bluesky else None

    @staticmethod
    def _frame_only_start(source: str, s: SeriesStart) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "uid": f"{source}-{s.series_id}-{uuid.uuid4().hex[:8]}", "time": time.time(),
            "plan_name": FRAME_SERIES_PLAN,
            "frame_series": {"source": source, "series_id": s.series_id, "format": s.meta.get("format")},
        }
        if s.n_frames:
            doc["num_points"] = s.n_frames
        return doc

    def _series_end(self, source: str, end: SeriesEnd) -> None:
        state = self._current.get(source)
        if state is None or state.info.series_id != end.series_id:
            log.info("end of series %s of %s, which is not its current series", end.series_id, source)
            return
        del self._current[source]
        self._series_done(state, "success")

    def _series_done(self, state: SeriesState, status: str) -> None:
        run = state.run
        log.info("frame series %s of %s done: %d frames analysed", state.info.series_id, state.source, state.frames_done)
        if run.uid not in self.router.open_runs:
            return
        if state.frame_only:
            self._frame_only.discard(run.uid)
            self.router._finish(run, status, self._stop_doc(run, status, "frame series ended"))
        else:
            self._finish_if_settled(run.uid)

    # -- frames ------------------------------------------------------------------------------
    def _frames(self, batch: FrameBatch) -> None:
        n = len(batch.numbers)
        state = self._current.get(batch.source)
        if state is None or state.info.series_id != batch.series_id:
            self.metrics.frames_dropped.labels(batch.source, "stale_series").inc(n)
            return
        run = state.run
        if run.uid not in self.router.open_runs:
            self.metrics.frames_dropped.labels(batch.source, "run_closed").inc(n)
            return
        positions = flat_positions(batch.numbers + 1, run.nav_shape, run.snaking)
        outside = int((positions < 0).sum())
        if outside:
            self.metrics.bad_messages.labels(batch.source, "frame_outside_scan").inc(outside)
        positions = self.router.place(run, positions)
        self.router._call_all(run, "frames", batch.data, positions, state.info, inputs="frames",
                              frame_source=batch.source)
        self.router._notify("frames", run, {"seq_num": (batch.numbers + 1).tolist(), "source": batch.source})
        now = time.time()
        run.frames_done += n
        state.frames_done += n
        state.last_frame = time.monotonic()
        run.last_event = run.last_activity = now
        self.metrics.last_event_time.set(now)
        self.metrics.frames_processed.labels(batch.source).inc(n)
        self.metrics.frame_age_seconds.labels(batch.source).observe(now - batch.received)
        self.router._update_gauges(run)
        if state.frame_only and state.info.n_frames and state.frames_done >= state.info.n_frames:
            self._current.pop(batch.source, None)  # its announced frame count has arrived
            self._series_done(state, "success")

    # -- run stop ordering -------------------------------------------------------------------
    def park_stop(self, run: RunState, doc: dict[str, Any]) -> bool:
        """Hold a RunStop until the frame path has caught up with it (see module docstring); True if
        held, False if the run can finish now."""
        grace = self.router.config.series_end_grace_s
        if grace <= 0 or not (self.sources or self._has_open_series(run)):
            return False
        now = time.monotonic()
        start_grace = min(grace, self.router.config.series_start_grace_s) if self.sources else 0.0
        self._parked[run.uid] = HeldStop(now + grace, doc, {s.name for s in self.sources}, now + start_grace)
        for source in self.sources:
            source.request_barrier(run.uid)
        log.debug("RunStop of %s held for the frame path (at most %.1f s)", run.uid, grace)
        return True

    def _finish_if_settled(self, uid: str) -> None:
        held = self._parked.get(uid)
        run = self.router.open_runs.get(uid)
        if held is None or run is None or held.waiting_for or self._has_open_series(run):
            return
        if uid not in self._runs_with_series and time.monotonic() < held.series_start_deadline:
            return
        del self._parked[uid]
        self.router._finish(run, held.doc.get("exit_status", "success"), held.doc)

    def expire(self) -> None:
        """Close frame-only runs of end-less series (array-1.0) quiet for ``router.series_quiet_s``;
        finish held runs whose grace period is over (their series' later frames: ``run_closed``)."""
        now = time.monotonic()
        quiet_since = now - self.router.config.series_quiet_s
        for source, st in list(self._current.items()):
            if st.frame_only and not st.has_end and st.last_frame <= quiet_since:
                del self._current[source]  # an end-less series (array-1.0) that went quiet
                self._series_done(st, "success")
        for uid, held in list(self._parked.items()):
            self._finish_if_settled(uid)
            if uid in self._parked and now >= held.deadline:
                del self._parked[uid]
                run = self.router.open_runs.get(uid)
                if run is not None:
                    log.warning("frame path of run %s did not settle within the grace period (series open: %s, "
                                "sources behind: %s); closing the run", uid, self._has_open_series(run),
                                sorted(held.waiting_for))
                    self.router._finish(run, held.doc.get("exit_status", "success"), held.doc)

    def run_finished(self, run: RunState) -> None:
        self._parked.pop(run.uid, None)
        self._runs_with_series.discard(run.uid)
        self._frame_only.discard(run.uid)

    def _has_open_series(self, run: RunState) -> bool:
        """An attached series is still open: one whose end will be announced, or an end-less one
        (array-1.0) that had a frame within ``series_quiet_s`` (frames may still be in transit)."""
        quiet_since = time.monotonic() - self.router.config.series_quiet_s
        return any(st.run is run and (st.has_end or st.last_frame > quiet_since) for st in self._current.values())

    def _frame_slots(self, run: RunState, source: str) -> list:
        return [slot for slot in run.slots if slot.active and slot.consumer.inputs == "frames"
                and self.router.takes_frames_from(slot.name, source)]

    @staticmethod
    def _stop_doc(run: RunState, status: str, reason: str) -> dict[str, Any]:
        return {"run_start": run.uid, "exit_status": status, "reason": reason, "time": time.time(),
                "uid": uuid.uuid4().hex, "num_events": {}}
