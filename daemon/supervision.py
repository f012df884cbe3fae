"""Run supervision, mixed into :class:`~beamlens.daemon.router.Router` and run on its thread:
runs silent for ``run_timeout_s`` are closed as incomplete; while the document queue is nearly full
the consumer that used the most time is quarantined (so intake never stalls); open runs are
checkpointed periodically and at shutdown, and restored from their checkpoints at start.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from beamlens.consumers.base import Results, RunInfo

from .checkpoint import run_state
from .results import ConsumerSlot, RunState

if TYPE_CHECKING:
    from .router import Router

log = logging.getLogger("beamlens.daemon.router")

TICK_S = 1.0
"""How often the router looks at run timeouts, checkpoints and consumer lag, s."""
BUSY_DECAY = 0.5
"""Per tick, consumers' recent processing time is multiplied by this (for shedding the slowest)."""


class RunSupervision:
    """Timeouts, slow-consumer shedding and checkpoints of the router's open runs (router thread)."""

    def _tick(self: Router) -> None:
        """Once per :data:`TICK_S`: close runs silent for ``run_timeout_s``, shed the slowest
        consumer while the queue is nearly full, checkpoint open runs when due."""
        self._next_tick = time.monotonic() + TICK_S
        now = time.time()
        for run in list(self._runs.values()):
            if now - run.last_activity > self.config.run_timeout_s:
                log.error("run %s: nothing received for %.0f s; closing it as incomplete", run.uid, now - run.last_activity)
                self._guard("supervision", self._finish, run, "incomplete",
                            self._synthetic_stop(run, "incomplete", "run timed out: no RunStop"))
        if self.config.shed_slow_consumers and self.queue.qsize() > self.config.shed_queue_fraction * self.queue.maxsize:
            self._guard("supervision", self._shed_slowest)
        for run in self._runs.values():
            for slot in run.slots:
                slot.busy_s *= BUSY_DECAY
        if self.checkpointer is not None and self.checkpointer.due():
            self._checkpoint_open_runs()

    def _shed_slowest(self: Router) -> None:
        slots = [(slot.busy_s, run, slot) for run in self._runs.values() for slot in run.slots if slot.active]
        if not slots:
            return
        busy, run, slot = max(slots, key=lambda t: t[0])
        slot.quarantined = True
        self.metrics.consumers_quarantined.labels(slot.name, "too_slow").inc()
        log.error("consumer %s quarantined for the rest of run %s: too slow (%.2f s of recent processing, %d items "
                  "queued); intake goes on without it", slot.name, run.uid, busy, self.queue.qsize())

    def _checkpoint_open_runs(self: Router, changed_only: bool = True) -> None:
        """Checkpoint open runs; with ``changed_only``, only those with activity since their last
        checkpoint (so thousands of idle runs cost nothing per tick)."""
        for run in self._runs.values():
            if changed_only and run.checkpointed_activity == run.last_activity:
                continue
            self._checkpoint_run(run)
        self.checkpointer.mark_saved()

    def _checkpoint_run(self: Router, run: RunState) -> bool:
        """Save one open run's checkpoint; False (logged, counted) when that fails."""
        descriptors = [d for d, r in self._descriptor_run.items() if r == run.uid]
        try:
            self.checkpointer.save(run_state(run, descriptors))
            run.checkpointed_activity = run.last_activity
            self.metrics.checkpoints.labels("save", "ok").inc()
            return True
        except Exception:  # a checkpoint that fails must not stop the analysis
            self.metrics.checkpoints.labels("save", "failed").inc()
            self._rlog.log(logging.ERROR, "checkpoint_save", "checkpoint of run %s failed", run.uid[:64], exc_info=True)
            return False

    def _suspend_open_runs(self: Router) -> None:
        """Shutdown with checkpoints: save open runs, let sinks write what they have (status
        ``suspended``), and leave them to be resumed by the next daemon."""
        self._checkpoint_open_runs(changed_only=False)
        self._suspend(list(self._runs.values()), "at shutdown", "beamlens shut down; analysis resumes on restart")

    def _suspend(self: Router, runs: list[RunState], when: str, reason: str) -> None:
        """Take already-checkpointed ``runs`` out of the open runs as ``suspended`` (sinks get a
        synthetic ``abort`` RunStop carrying ``reason``)."""
        for run in runs:
            run.status = "suspended"
            run.closed = time.time()
            self._runs.pop(run.uid, None)
            self._descriptor_run = {d: r for d, r in self._descriptor_run.items() if r != run.uid}
            self.store.add(run)
            log.info("run %s suspended %s after %d events; resumes from its checkpoint", run.uid, when, run.events_done)
            self._notify("stop", run, self._synthetic_stop(run, "abort", reason))
        self.metrics.runs_open.set(len(self._runs))

    def hand_over(self: Router, uids: list[str]) -> list[str]:
        """Router thread: checkpoint the open runs among ``uids`` and suspend them, for another
        daemon to resume (a Kafka partition moved to another group member). Without a state
        directory the runs are only suspended (the new owner analyses them from their RunStart).
        A run whose checkpoint fails keeps its previous one (or none), which is consistent with what
        the new owner re-reads: it redoes more, never less.

        Returns:
            the uids that were open (and are now suspended).
        """
        runs = [self._runs[u] for u in uids if u in self._runs]
        for run in runs:
            if self.checkpointer is not None:
                self._checkpoint_run(run)  # a failure leaves the previous checkpoint: the new owner redoes the rest
        self._suspend(runs, "and handed over", "partition handed to another beamlens instance; analysis resumes there")
        return [r.uid for r in runs]

    def resume(self: Router, uid: str) -> RunState | None:
        """Router thread: reopen run ``uid`` from its checkpoint if one exists and the run is not
        open (None otherwise). The checkpoint stays until the run ends."""
        if self.checkpointer is None or uid in self._runs:
            return None
        state = self.checkpointer.load(uid)
        if state is None:
            return None
        try:
            run = self._restore(state)
        except Exception:
            self.metrics.checkpoints.labels("restore", "failed").inc()
            log.exception("run %s could not be resumed from its checkpoint", uid[:64])
            return None
        self.metrics.checkpoints.labels("restore", "ok").inc()
        self.metrics.runs_resumed.inc()
        log.info("run %s resumed from its checkpoint (%d events done)", uid, run.events_done)
        return run

    def _restore_checkpoints(self: Router) -> None:
        if not self.restore_at_start:
            return
        for state in self.checkpointer.load_all(newest=self.limits.max_open_runs):
            try:
                run = self._restore(state)
            except Exception:
                self.metrics.checkpoints.labels("restore", "failed").inc()
                log.exception("run %s could not be resumed from its checkpoint", state.get("uid"))
                continue
            self.metrics.checkpoints.labels("restore", "ok").inc()
            self.metrics.runs_resumed.inc()
            log.info("run %s resumed from its checkpoint (%d events done)", run.uid, run.events_done)

    def _restore(self: Router, state: dict[str, Any]) -> RunState:
        uid, start = state["uid"], state["start_doc"]
        nav_shape = tuple(state["nav_shape"])
        run = RunState(uid=uid, start_doc=start, nav_shape=nav_shape, snaking=tuple(state["snaking"]),
                       info=RunInfo(uid=uid, nav_shape=nav_shape, start_doc=start), joined_midway=state["joined_midway"],
                       opened=state["opened"], last_event=state["last_event"], events_done=state["events_done"],
                       max_position=state["max_position"], primary_descriptors=set(state["primary_descriptors"]),
                       descriptor_shapes=state["descriptor_shapes"], buffers_allocated=state["buffers_allocated"])
        run.restore_counts(state)
        run.nav_capacity = state.get("nav_capacity", 0)
        run.nav_offset = state.get("nav_offset", 0)
        run.limited = state.get("limited")
        if not run.nav_capacity:  # checkpoints written before nav_capacity was recorded
            run.nav_capacity = max((len(a) for s in state["slots"] for n, a in s["arrays"].items()
                                    if s["specs"][n].kind == "nav"), default=0)
        for s in state["slots"]:
            consumer = s["consumer"]
            info = RunInfo(uid=uid, nav_shape=nav_shape, start_doc=start, skipped=self._skip_counter(s["name"]),
                           axes=s["axes"])
            consumer.restored(info, Results(s["arrays"]))
            run.slots.append(ConsumerSlot(name=s["name"], consumer=consumer, specs=s["specs"], arrays=s["arrays"],
                                          failures=s["failures"], quarantined=s["quarantined"],
                                          inactive_reason=s["inactive_reason"]))
        run.last_activity = time.time()
        self._runs[uid] = run
        for d in state["descriptors"]:
            self._descriptor_run[d] = uid
        self.store.add(run)
        self.metrics.runs_open.set(len(self._runs))
        return run

    @staticmethod
    def _synthetic_stop(run: RunState, status: str, reason: str) -> dict[str, Any]:
        """A RunStop-like document for runs beamlens closes itself (not schema-valid: no uid of
        the raw run's own)."""
        return {"run_start": run.uid, "exit_status": status, "reason": reason, "time": time.time(),
                "uid": "", "num_events": {}}
