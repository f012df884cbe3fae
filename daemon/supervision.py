"""Run supervision, ticking on time on the router thread (:class:`Supervisor`): runs silent for
``run_timeout_s`` are closed as incomplete; while the document queue is nearly full the consumer
that used the most time (on the router thread and on the pool) is quarantined, so intake never
stalls; open runs are checkpointed periodically and at shutdown (:mod:`beamlens.daemon.checkpoint`),
and restored from their checkpoints at start.
"""
from __future__ import annotations

import logging
import queue
import time
from pathlib import Path
from typing import Any

import numpy as np

from beamlens.consumers.base import RunInfo

from .checkpoint import Checkpointer, CheckpointError, consumer_record, jsonable, restore_consumer
from .metrics import Metrics
from .results import RunState
from .runtable import RunTable, synthetic_stop
from .signals import signal_from_json, signal_json

log = logging.getLogger("beamlens.daemon.router")

TICK_S = 1.0
"""How often the router looks at run timeouts, checkpoints and consumer lag, s."""
BUSY_DECAY = 0.5
"""Per tick, consumers' recent processing time is multiplied by this (for shedding the slowest)."""


class Supervisor:
    """Timeouts, slow-consumer shedding and checkpoints of the open runs (router thread).

    Args:
        table: the run table.
        work_queue: the router's document queue (its fill level triggers shedding).
        metrics: where to count.
        checkpointer: where checkpoints go; None without ``state.directory``.
    """

    def __init__(self, table: RunTable, work_queue: queue.Queue, metrics: Metrics, checkpointer: Checkpointer | None):
        self.table = table
        self.config = table.config
        self.queue = work_queue
        self.metrics = metrics
        self.checkpointer = checkpointer
        self.next_tick = time.monotonic() + TICK_S
        if checkpointer is not None:
            table.on_finished.append(lambda run: checkpointer.remove(run.uid))

    def due(self) -> bool:
        return time.monotonic() >= self.next_tick

    def tick(self) -> None:
        """Once per :data:`TICK_S`: close runs silent for ``run_timeout_s``, shed the slowest
        consumer while the queue is nearly full, checkpoint open runs when due."""
        self.next_tick = time.monotonic() + TICK_S
        now = time.time()
        for run in list(self.table.runs.values()):
            if now - run.last_activity > self.config.run_timeout_s:
                log.error("run %s: nothing received for %.0f s; closing it as incomplete", run.uid, now - run.last_activity)
                self.table.guard("supervision", self.table.finish, run, "incomplete",
                                 synthetic_stop(run, "incomplete", "run timed out: no RunStop"))
        if self.config.shed_slow_consumers and self.queue.qsize() > self.config.shed_queue_fraction * self.queue.maxsize:
            self.table.guard("supervision", self.shed_slowest)
        for run in (*self.table.runs.values(), *self.table.finishing.values()):
            for slot in run.slots:
                slot.busy_s *= BUSY_DECAY
        if self.checkpointer is not None and self.checkpointer.due():
            self.checkpoint_open_runs()

    def shed_slowest(self) -> None:
        """Quarantine the open runs' consumer with the most recent processing time."""
        slots = [(slot.busy_s, run, slot) for run in self.table.runs.values() for slot in run.slots if slot.active]
        if not slots:
            return
        busy, run, slot = max(slots, key=lambda t: t[0])
        self.table.dispatcher.quarantine(run, slot, "too_slow")
        log.error("consumer %s too slow (%.2f s of recent processing, %d items queued); intake goes on without it",
                  slot.name, busy, self.queue.qsize())

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_open_runs(self, changed_only: bool = True) -> None:
        """Checkpoint open runs; with ``changed_only``, only those with activity since their last
        checkpoint (so thousands of idle runs cost nothing per tick)."""
        assert self.checkpointer is not None
        for run in self.table.runs.values():
            if changed_only and run.checkpointed_activity == run.last_activity:
                continue
            self.checkpoint_run(run)
        self.checkpointer.mark_saved()

    def checkpoint_run(self, run: RunState) -> bool:
        """Save one open run's checkpoint; False (logged, counted) when that fails."""
        assert self.checkpointer is not None
        try:
            state, arrays = self.run_record(run)
            self.checkpointer.save(state, arrays)
        except Exception:  # a checkpoint that fails must not stop the analysis
            self.metrics.checkpoints.labels("save", "failed").inc()
            self.table.rlog.log(logging.ERROR, "checkpoint_save", "checkpoint of run %s failed", run.uid[:64],
                                exc_info=True)
            return False
        run.checkpointed_activity = run.last_activity
        self.metrics.checkpoints.labels("save", "ok").inc()
        return True

    def run_record(self, run: RunState) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The JSON state and the arrays of one open run's checkpoint."""
        descriptors = [d for d, r in self.table.descriptor_run.items() if r == run.uid]
        slots, arrays = [], {}
        for i, s in enumerate(run.slots):
            record, a = consumer_record(s.consumer, s.signals, f"s{i}")
            arrays.update(a)
            slots.append({"name": s.name, "failures": s.failures, "quarantined": s.quarantined,
                          "inactive_reason": s.inactive_reason, "refused_only": s.refused_only, **record})
        state = {
            "uid": run.uid, "start_doc": run.start_doc, "nav_shape": list(run.nav_shape), "snaking": list(run.snaking),
            "joined_midway": run.joined_midway, "opened": run.opened, "last_event": run.last_event,
            "events_done": run.events_done, "frames_done": run.frames_done, "max_position": run.max_position,
            "primary_descriptors": sorted(run.primary_descriptors), "descriptor_shapes": run.descriptor_shapes,
            "descriptors": descriptors, "buffers_allocated": run.buffers_allocated,
            "descriptor_streams": run.descriptor_streams, "events_received": run.events_received,
            "max_seq_num": run.max_seq_num, "nav_capacity": run.nav_capacity, "nav_offset": run.nav_offset,
            "limited": run.limited, "signals": [signal_json(s) for s in run.signals.values()], "slots": slots,
        }
        return jsonable(state), arrays

    def suspend_open_runs(self) -> None:
        """Shutdown with checkpoints: save open runs, let sinks write what they have (status
        ``suspended``), and leave them to be resumed by the next daemon."""
        self.checkpoint_open_runs(changed_only=False)
        for run in list(self.table.runs.values()):
            self.table.suspend(run)

    def hand_over(self, uids: list[str]) -> list[str]:
        """Router thread: checkpoint the open runs among ``uids`` and suspend them, for another
        daemon to resume (a Kafka partition moved to another group member). Without a state
        directory the runs are only suspended (the new owner analyses them from their RunStart).
        A run whose checkpoint fails keeps its previous one (or none), which is consistent with what
        the new owner re-reads: it redoes more, never less.

        Returns:
            the uids that were open (and are now suspended).
        """
        runs = [self.table.runs[u] for u in uids if u in self.table.runs]
        for run in runs:
            if self.checkpointer is not None:
                self.checkpoint_run(run)  # a failure leaves the previous checkpoint: the new owner redoes the rest
            self.table.suspend(run, "and handed over",
                               "partition handed to another beamlens instance; analysis resumes there")
        return [r.uid for r in runs]

    def resume(self, uid: str) -> RunState | None:
        """Router thread: reopen run ``uid`` from its checkpoint if one exists and the run is not
        open or finishing (None otherwise, also when the checkpoint is refused). The checkpoint
        stays until the run ends."""
        if self.checkpointer is None or self.table.live(uid) is not None:
            return None
        loaded = self.checkpointer.load(uid, refused=self._refused)
        return self._resume(*loaded) if loaded is not None else None

    def restore_checkpoints(self) -> None:
        """Resume the runs checkpointed in the state directory (the newest ``limits.max_open_runs``)."""
        assert self.checkpointer is not None
        for path, state, arrays in self.checkpointer.load_all(newest=self.table.limits.max_open_runs,
                                                              refused=self._refused):
            self._resume(path, state, arrays)

    def _refused(self, path: Path, reason: str) -> None:
        self.metrics.checkpoints.labels("restore", "failed").inc()

    def _resume(self, path: Path, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> RunState | None:
        """:meth:`restore` one loaded checkpoint, counted; a checkpoint that does not fit is refused."""
        assert self.checkpointer is not None
        try:
            run = self.restore(state, arrays)
        except CheckpointError as exc:
            self.metrics.checkpoints.labels("restore", "failed").inc()
            self.checkpointer.refuse(path, str(exc))
            return None
        except Exception as exc:
            self.metrics.checkpoints.labels("restore", "failed").inc()
            log.exception("run %s could not be resumed from its checkpoint", str(state.get("uid"))[:64])
            self.checkpointer.refuse(Path(path), f"{type(exc).__name__}: {exc}")
            return None
        self.metrics.checkpoints.labels("restore", "ok").inc()
        self.metrics.runs_resumed.inc()
        log.info("run %s resumed from its checkpoint (%d events done)", run.uid, run.events_done)
        return run

    def restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> RunState:
        """Rebuild one run from its checkpoint and add it to the open runs; nothing is added unless
        every consumer's buffers restore (a fresh instance each, see
        :func:`~beamlens.daemon.checkpoint.restore_consumer`).

        Raises:
            CheckpointError: the checkpoint does not fit (missing fields, layouts, arrays).
        """
        try:
            uid, start = str(state["uid"]), dict(state["start_doc"])
            nav_shape = tuple(int(n) for n in state["nav_shape"])
            run = RunState(uid=uid, start_doc=start, nav_shape=nav_shape, snaking=tuple(bool(s) for s in state["snaking"]),
                           info=RunInfo(uid=uid, nav_shape=nav_shape, start_doc=start),
                           joined_midway=bool(state["joined_midway"]), opened=float(state["opened"]),
                           last_event=state["last_event"], events_done=int(state["events_done"]),
                           frames_done=int(state.get("frames_done", 0)), max_position=int(state["max_position"]),
                           primary_descriptors=set(state["primary_descriptors"]),
                           descriptor_shapes=dict(state["descriptor_shapes"]),
                           buffers_allocated=bool(state["buffers_allocated"]))
            run.restore_counts(state)
            run.nav_capacity = int(state["nav_capacity"])
            run.nav_offset = int(state["nav_offset"])
            run.limited = state.get("limited")
            run.signals = {s.name: s for s in (signal_from_json(d) for d in state["signals"])}
            saved_slots = list(state["slots"])
            descriptors = list(state["descriptors"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"malformed run state ({type(exc).__name__}: {exc})") from None
        if uid in self.table.runs or uid in self.table.finishing:
            raise CheckpointError(f"run {uid[:64]} is open already")
        for s in saved_slots:
            configured = self.table.consumer_class(str(s.get("name")))
            if configured is None:
                log.warning("run %s: consumer %s of its checkpoint is not configured now; left out", uid, s.get("name"))
                continue
            cls, params = configured
            slot = self.table.new_slot(run, s["name"], cls, params)
            if slot is None:
                raise CheckpointError(f"consumer {s['name']} cannot be created")
            for entry in dict(s.get("buffers") or {}).values():
                arr = arrays.get(str(entry.get("member")))
                if arr is not None and entry.get("kind") == "nav" and len(arr) != run.nav_capacity:
                    raise CheckpointError(f"buffer {entry.get('member')}: {len(arr)} points, the run holds {run.nav_capacity}")
            try:
                slot.signals = restore_consumer(slot.consumer, start, s, arrays)
            except CheckpointError as exc:
                raise CheckpointError(f"consumer {s['name']}: {exc}") from None
            slot.failures, slot.quarantined = int(s.get("failures", 0)), bool(s.get("quarantined", False))
            slot.inactive_reason, slot.refused_only = s.get("inactive_reason"), bool(s.get("refused_only", False))
            run.slots.append(slot)
        run.last_activity = time.time()
        self.table.adopt(run, descriptors)
        return run
