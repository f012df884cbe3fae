"""Run correlation and dispatch of detector frames, inside the router's thread.

Frames and Bluesky documents share the router's one thread and queue, so a consumer is never
called concurrently and a run's start, frames and stop reach it in order. This module holds the
frame-specific part of the routing:

- **Series -> run.** A series start attaches the series to the Bluesky run named in its header
  (``bluesky_run_uid`` in the DECTRIS header appendix / stream v2 ``user_data``) if that run is open,
  else to the newest open Bluesky run. With no open run the series becomes a *frame-only run* of
  its own (uid ``<source>-<series id>-<8 hex>``, ``plan_name: frame_series``, nav shape
  ``(n_frames,)`` when announced, else growing), started and stopped like any run so sinks see it.
- **Frame -> map pixel.** Frame number ``k`` (0-based) is placed like event ``seq_num = k + 1``,
  with the run's RunStart ``shape`` and ``snaking`` (:func:`beamlens.daemon.placement.flat_positions`).
- **Stale frames.** Frames of a series that is not the source's current one (superseded, ended) are
  dropped as ``stale_series``; frames whose run has stopped as ``run_closed``.
- **Stop ordering.** Frames travel by another path than documents and may lag them. A RunStop is
  therefore held until every frame source has handed over what it had received when the stop
  arrived (a :class:`~beamlens.daemon.frames.FrameBarrier` per source), and until an attached series
  that announces its end has ended, for at most ``router.series_end_grace_s``. A series that starts
  in that window, from a source whose barrier has not come back, still belongs to the held run.

- **Frame-only series end.** A frame-only run closes when its series ends (DECTRIS end message),
  when the announced frame count has arrived, or, for a format without end messages (array-1.0),
  after ``router.series_quiet_s`` without a frame. Silence is confirmed with the source (a
  barrier: everything it had received is handed over), so frames still being decoded never count
  as silence; frames of that series after a longer pause open a new frame-only run (with a
  warning to raise ``series_quiet_s``), they are not dropped. A series that announces its end
  (DECTRIS) waits for it longer: at least ``router.series_end_grace_s`` and two frame times of its
  header, so a slow exposure is not silence; if it never comes (a lost end message, an aborted
  acquisition) the run closes ``incomplete``.

Router listeners (sinks) are told of each batch as ``("frames", run, {"seq_num": [k + 1, ...],
"source": name})`` after the consumers have seen it, so derived documents and Tiled follow frame
runs point by point as they follow event pages.

Each series is a signal (:func:`beamlens.daemon.signals.frame_signal`, named after its source),
offered to the run's consumers that analyse that source (config ``frame_sources``); frames reach
those that took it as :class:`~beamlens.consumers.base.Batch` es (out-of-scan frames dropped and
counted once, ``frame_outside_scan``). Everything goes through the public API of the
:class:`~beamlens.daemon.runtable.RunTable`; the document router sees this module only through its
stop gate (:meth:`FrameRouter.park_stop`, :attr:`FrameRouter.waiting`, :meth:`FrameRouter.expire`).
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from beamlens.consumers.base import SeriesInfo, SignalInfo

from .config import RouterConfig
from .frames import FrameBarrier, FrameBatch, SeriesEnd, SeriesEvent, SeriesStart
from .placement import flat_positions
from .results import RunState
from .runtable import RunTable, synthetic_stop
from .signals import frame_batch, frame_signal

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
    signal: SignalInfo | None = None
    """The series' signal (None until its frame shape is known)."""
    last_frame: float = field(default_factory=time.monotonic)
    """Monotonic time of the series' start or newest frame (end-less formats settle on quiet)."""
    quiet_token: str | None = None
    """Barrier token asked of the source once the series looked quiet: the run closes when the
    barrier comes back with no frame in between (nothing of the series was still being decoded)."""


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
    """Routes frame-source items to runs (router thread only).

    Args:
        table: the run table (runs, signals, delivery, finishing).
        config: the router section of the config (grace and quiet periods).
    """

    def __init__(self, table: RunTable, config: RouterConfig):
        self.table = table
        self.config = config
        self.metrics = table.metrics
        table.on_closed.append(self.run_finished)
        self._current: dict[str, SeriesState] = {}
        self._frame_only: set[str] = set()
        self._parked: dict[str, HeldStop] = {}
        self._runs_with_series: set[str] = set()
        self._quiet_closed: dict[str, tuple[str, SeriesStart]] = {}
        """source -> (series id, its start) of the end-less series whose run closed on silence, so
        that later frames of it (a pause longer than ``series_quiet_s``) open a new run."""
        self.sources: list[Any] = []
        """Frame sources (``name``, ``request_barrier(token)``); set by the daemon."""

    @property
    def waiting(self) -> bool:
        """True while a RunStop waits for the frame path or a frame-only series is open (the
        router then polls :meth:`expire`)."""
        return bool(self._parked) or bool(self._frame_only)

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
            st = self._current.get(item.source)
            if st is not None and st.quiet_token is not None and st.quiet_token == item.token:
                self._close_quiet(st)
        elif isinstance(item.item, SeriesStart):
            self._series_start(item.source, item.item)
        elif isinstance(item.item, SeriesEnd):
            self._series_end(item.source, item.item)

    # -- series ------------------------------------------------------------------------------
    def _reopen(self, source: str) -> SeriesState | None:
        series_id, start = self._quiet_closed.pop(source)
        log.warning("frames of series %s of %s after its run closed on %.2f s of silence: a new frame-only run "
                    "takes them (raise router.series_quiet_s above the longest pause of this sender)", series_id,
                    source, self.config.series_quiet_s)
        self._series_start(source, start)
        return self._current.get(source)

    def _series_start(self, source: str, s: SeriesStart) -> None:
        self._quiet_closed.pop(source, None)
        previous = self._current.pop(source, None)
        if previous is not None:
            log.warning("series %s of %s superseded by series %s before its end", previous.info.series_id, source, s.series_id)
            self._series_done(previous, "incomplete")
        info = SeriesInfo(source=source, series_id=s.series_id, sig_shape=tuple(s.sig_shape or ()),
                          dtype=s.dtype or "", n_frames=s.n_frames, meta=dict(s.meta))
        run = self._pick_run(source, s)
        frame_only = run is None
        if run is None:
            run = self.table.open(self._frame_only_start(source, s), source, rate_limited=False)
            if run is None:
                return
            self._frame_only.add(run.uid)
        state = SeriesState(source, info, run, frame_only, s.has_end)
        self._current[source] = state
        self._runs_with_series.add(run.uid)
        self.metrics.frame_series.labels(source, "no" if frame_only else "yes").inc()
        log.info("frame series %s of %s (%s, %s, %s frames) -> %s run %s", s.series_id, source, info.sig_shape,
                 info.dtype, s.n_frames or "?", "frame-only" if frame_only else "Bluesky", run.uid)
        if info.sig_shape and info.dtype:
            self._offer(state)

    def _offer(self, state: SeriesState) -> None:
        state.signal = frame_signal(state.info)
        self.table.offer(state.run, [state.signal], frame_source=state.source)

    def _pick_run(self, source: str, s: SeriesStart) -> RunState | None:
        runs = self.table.runs
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

    def _series_done(self, state: SeriesState, status: str, reason: str = "frame series ended") -> None:
        run = state.run
        log.info("frame series %s of %s done: %d frames analysed", state.info.series_id, state.source, state.frames_done)
        if run.uid not in self.table.runs:
            return
        if state.frame_only:
            self._frame_only.discard(run.uid)
            self.table.finish(run, status, synthetic_stop(run, status, reason))
        else:
            self._finish_if_settled(run.uid)

    # -- frames ------------------------------------------------------------------------------
    def _frames(self, batch: FrameBatch) -> None:
        n = len(batch.numbers)
        state = self._current.get(batch.source)
        if state is None and self._quiet_closed.get(batch.source, (None,))[0] == batch.series_id:
            state = self._reopen(batch.source)  # it was only a pause: its frames are not thrown away
        if state is None or state.info.series_id != batch.series_id:
            self.metrics.frames_dropped.labels(batch.source, "stale_series").inc(n)
            return
        run = state.run
        if run.uid not in self.table.runs:
            self.metrics.frames_dropped.labels(batch.source, "run_closed").inc(n)
            return
        if state.signal is None:  # the series header did not tell the frame shape; the frames do
            state.info = SeriesInfo(source=state.info.source, series_id=state.info.series_id,
                                    sig_shape=tuple(batch.data.shape[1:]), dtype=batch.data.dtype.name,
                                    n_frames=state.info.n_frames, meta=state.info.meta)
            self._offer(state)
        positions = flat_positions(batch.numbers + 1, run.nav_shape, run.snaking)
        outside = int((positions < 0).sum())
        if outside:
            self.metrics.bad_messages.labels(batch.source, "frame_outside_scan").inc(outside)
        positions = self.table.place(run, positions)
        inside = positions >= 0
        slots = self.table.takers(run, batch.source)
        if slots and inside.any():
            if tuple(batch.data.shape[1:]) != state.signal.sig_shape:
                for slot in slots:
                    self.table.dispatcher.skipped(slot, "wrong_shape", int(inside.sum()))
            else:
                data, nav, numbers = batch.data, positions, batch.numbers
                if not inside.all():
                    data, nav, numbers = data[inside], nav[inside], numbers[inside]
                self.table.deliver(run, frame_batch(state.signal, data, nav, numbers, batch.received), slots)
        self.table.notify("frames", run, {"seq_num": (batch.numbers + 1).tolist(), "source": batch.source})
        now = time.time()
        run.frames_done += n
        state.frames_done += n
        state.last_frame = time.monotonic()
        state.quiet_token = None  # not quiet after all
        run.last_event = run.last_activity = now
        self.metrics.last_event_time.set(now)
        self.metrics.frames_processed.labels(batch.source).inc(n)
        self.metrics.frame_age_seconds.labels(batch.source).observe(now - batch.received)
        self.table.update_gauges(run)
        if state.frame_only and state.info.n_frames and state.frames_done >= state.info.n_frames:
            self._current.pop(state.source, None)
            self._series_done(state, "success", "announced frame count arrived")

    # -- run stop ordering -------------------------------------------------------------------
    def park_stop(self, run: RunState, doc: dict[str, Any]) -> bool:
        """Hold a RunStop until the frame path has caught up with it (see module docstring); True if
        held, False if the run can finish now."""
        grace = self.config.series_end_grace_s
        if grace <= 0 or not (self.sources or self._has_open_series(run)):
            return False
        now = time.monotonic()
        start_grace = min(grace, self.config.series_start_grace_s) if self.sources else 0.0
        self._parked[run.uid] = HeldStop(now + grace, doc, {s.name for s in self.sources}, now + start_grace)
        for source in self.sources:
            source.request_barrier(run.uid)
        log.debug("RunStop of %s held for the frame path (at most %.1f s)", run.uid, grace)
        return True

    def _finish_if_settled(self, uid: str) -> None:
        held = self._parked.get(uid)
        run = self.table.runs.get(uid)
        if held is None or run is None or held.waiting_for or self._has_open_series(run):
            return
        if uid not in self._runs_with_series and time.monotonic() < held.series_start_deadline:
            return
        del self._parked[uid]
        self.table.finish(run, held.doc.get("exit_status", "success"), held.doc, run.stop_source)

    def expire(self) -> None:
        """Finish held runs whose grace period is over (their series' later frames: ``run_closed``),
        and frame-only runs whose series has gone quiet (see module docstring)."""
        now = time.monotonic()
        for source, st in list(self._current.items()):
            if not st.frame_only:
                continue
            if st.quiet_token is None and now - st.last_frame >= self._quiet_after(st):
                sender = next((s for s in self.sources if s.name == source), None)
                if sender is None:  # no source to ask (routers driven directly): silence is enough
                    self._close_quiet(st)
                else:  # quiet here; make sure nothing of it is still being received or decoded
                    st.quiet_token = f"quiet:{uuid.uuid4().hex}"
                    sender.request_barrier(st.quiet_token)
        for uid, held in list(self._parked.items()):
            self._finish_if_settled(uid)
            if uid in self._parked and now >= held.deadline:
                del self._parked[uid]
                run = self.table.runs.get(uid)
                if run is not None:
                    log.warning("frame path of run %s did not settle within the grace period (series open: %s, "
                                "sources behind: %s); closing the run", uid, self._has_open_series(run),
                                sorted(held.waiting_for))
                    self.table.finish(run, held.doc.get("exit_status", "success"), held.doc, run.stop_source)

    def _quiet_after(self, st: SeriesState) -> float:
        """Silence after which a frame-only series is over, s: ``series_quiet_s`` for formats
        without end messages; for those that announce their end (DECTRIS), whose end message may
        be lost (a detector restart, an aborted acquisition), at least ``series_end_grace_s`` and
        two frame times (a slow exposure is not silence)."""
        if not st.has_end:
            return self.config.series_quiet_s
        frame_time = _frame_time(st.info.meta)
        return max(self.config.series_quiet_s, self.config.series_end_grace_s, 2.0 * frame_time)

    def _close_quiet(self, st: SeriesState) -> None:
        """Close the frame-only run of a series that has gone quiet (see module docstring)."""
        if self._current.get(st.source) is not st:
            return
        del self._current[st.source]
        log.info("frame series %s of %s: no frame for %.2f s; closing its run", st.info.series_id, st.source,
                 time.monotonic() - st.last_frame)
        i = st.info
        self._quiet_closed[st.source] = (i.series_id, SeriesStart(i.series_id, i.sig_shape, i.dtype, None, i.meta,
                                                                 None, st.has_end))
        status = "incomplete" if st.has_end else "success"  # an announced end that never came
        self._series_done(st, status, "frame series quiet (router.series_quiet_s)")

    def run_finished(self, run: RunState) -> None:
        self._parked.pop(run.uid, None)
        self._runs_with_series.discard(run.uid)
        self._frame_only.discard(run.uid)

    def _has_open_series(self, run: RunState) -> bool:
        """An attached series is still open: one whose end will be announced, or an end-less one
        (array-1.0) that had a frame within ``series_quiet_s`` (frames may still be in transit)."""
        quiet_since = time.monotonic() - self.config.series_quiet_s
        return any(st.run is run and (st.has_end or st.last_frame > quiet_since) for st in self._current.values())


def _frame_time(meta: Mapping[str, Any]) -> float:
    """The series header's frame time (DECTRIS ``frame_time``, s), 0 when absent or not a finite
    number in [0, 1 day] (a hostile header must not keep a run open for ever)."""
    value = meta.get("frame_time") if isinstance(meta, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 86400:
        return 0.0
    return float(value)
