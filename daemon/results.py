"""Per-run state and the store the sinks read from.

The router (one thread) mutates :class:`RunState`; sinks (the HTTP thread, file writers) only read,
through :meth:`RunStore.snapshot` and :meth:`RunStore.summaries`, which copy what they return.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from beamlens.consumers.base import Buffers, BufferSpec, Consumer, RunInfo, SignalInfo


__all__ = ["LIVE_STATUSES", "BufferSnapshot", "BufferSpec", "ConsumerSlot", "RunState", "RunStore"]

LIVE_STATUSES = ("open", "finishing")
"""Statuses of runs not closed yet: ``finishing`` runs have all their data and wait for their
consumers' final background jobs."""


@dataclass
class ConsumerSlot:
    """One consumer instance inside one run: the signals it took, its buffers (the consumer's
    :class:`~beamlens.consumers.base.Buffers`, private ones included) and its failure count.

    :attr:`specs` and :attr:`arrays` are the *published* buffers (sinks read these); the private
    state buffers are in :attr:`buffers` only.
    """

    name: str
    consumer: Consumer
    signals: list[SignalInfo] = field(default_factory=list)
    """Signals the consumer accepted, in the order they were offered (checkpoints replay them)."""
    failures: int = 0
    quarantined: bool = False
    inactive_reason: str | None = None
    refused_only: bool = False
    """``inactive_reason`` says only that no signal was taken so far: a later signal (a frame
    series) is still offered."""
    busy_s: float = 0.0
    """Recent processing time (router thread and pool jobs), decayed by the supervisor (to find
    the slowest consumer)."""
    staged: deque = field(default_factory=deque)
    """Batches whose ``stage`` runs on the pool, in batch order: ``[batch, job, nav_offset]``."""
    jobs: int = 0
    """Pool jobs of this slot in flight (stages and ``run.submit`` jobs)."""
    finished: bool = False
    """``finish()`` has been called."""

    @property
    def active(self) -> bool:
        return not self.quarantined and self.inactive_reason is None

    @property
    def offerable(self) -> bool:
        """Whether new signals are offered to it."""
        return not self.quarantined and (self.inactive_reason is None or self.refused_only)

    @property
    def buffers(self) -> Buffers:
        return self.consumer.buffers

    @property
    def specs(self) -> dict[str, BufferSpec]:
        """Published (non-private) buffer specs by name (a copy: sinks read it from other threads
        while the router may bind new buffers)."""
        return {n: s for n, s in dict(self.consumer.buffers.specs).items() if not s.private}

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Published (non-private) buffers by name (``Buffers.bind`` adds the array before its
        spec, so every spec copied here has its array)."""
        b = self.consumer.buffers
        return {n: b[n] for n, s in dict(b.specs).items() if not s.private}

    def takes(self, signal: str) -> bool:
        return any(s.name == signal for s in self.signals)

    def allocate(self, specs: list[BufferSpec], nav_capacity: int) -> None:
        """Bind fresh arrays for ``specs`` (``nav_capacity`` points for nav buffers)."""
        for spec in specs:
            self.consumer.buffers.bind(spec.name, spec.allocate(nav_capacity), spec)

    def grow_nav(self, nav_capacity: int) -> None:
        """Enlarge ``nav`` buffers of a run of unknown length to ``nav_capacity`` points (router
        thread; background results are installed there too, so no write is lost)."""
        b = self.consumer.buffers
        for name, spec in list(b.specs.items()):
            if spec.kind == "nav" and len(b[name]) < nav_capacity:
                new = spec.allocate(nav_capacity)
                old = b[name]
                new[: len(old)] = old
                b.bind(name, new, spec)

    def roll_nav(self, shift: int) -> None:
        """Move the window of ``nav`` buffers ``shift`` points on (a run of unknown length at its
        point limit): the oldest ``shift`` points are forgotten, the newest slots refilled (NaN/0)."""
        b = self.consumer.buffers
        for name, spec in b.specs.items():
            if spec.kind != "nav":
                continue
            arr = b[name]
            fill = np.nan if arr.dtype.kind == "f" else 0
            if shift >= len(arr):
                arr[...] = fill
            else:
                _shift_down(arr, shift)
                arr[-shift:] = fill

    @property
    def nbytes(self) -> int:
        b = self.consumer.buffers
        return sum(int(b[n].nbytes) for n in dict(b.specs))


def _shift_down(arr: np.ndarray, shift: int, chunk_bytes: int = 4 * 2**20) -> None:
    """``arr[:-shift] = arr[shift:]`` in place, in chunks of at most ``shift`` points and about
    ``chunk_bytes``: numpy copies an overlapping source whole into a temporary first, which for a
    rolling window of hundreds of MiB is a transient as large as the window itself. Each chunk's
    source lies past its destination and past every chunk written before it, so none is read after
    it was overwritten."""
    n = len(arr) - shift
    step = max(1, min(shift, chunk_bytes // max(1, arr[:1].nbytes)))
    for i in range(0, n, step):
        j = min(i + step, n)
        arr[i:j] = arr[i + shift:j + shift]


@dataclass
class RunState:
    """What the daemon knows of one raw run."""

    uid: str
    start_doc: dict[str, Any]
    nav_shape: tuple[int, ...]
    snaking: tuple[bool, ...]
    info: RunInfo
    joined_midway: bool = False
    status: str = "open"  # open | finishing | success | abort | fail | incomplete | suspended
    opened: float = field(default_factory=time.time)
    closed: float | None = None
    last_event: float | None = None
    events_done: int = 0
    frames_done: int = 0
    max_position: int = -1
    primary_descriptors: set[str] = field(default_factory=set)
    descriptor_shapes: dict[str, dict[str, Any]] = field(default_factory=dict)
    slots: list[ConsumerSlot] = field(default_factory=list)
    signals: dict[str, SignalInfo] = field(default_factory=dict)
    """Event signals of the run's primary stream (from its first primary descriptor), by data key."""
    buffers_allocated: bool = False
    """The primary descriptor's event signals have been offered (and buffers allocated)."""
    finishing: dict[str, Any] | None = None
    """While ``status == "finishing"``: ``{"status", "doc", "source", "deadline"}`` of the close."""
    last_activity: float = field(default_factory=time.time)
    """Unix time of the last document or frame of this run (for the run timeout)."""
    descriptor_streams: dict[str, str] = field(default_factory=dict)
    """descriptor uid -> stream name."""
    events_received: dict[str, int] = field(default_factory=dict)
    """descriptor uid -> events received."""
    max_seq_num: dict[str, int] = field(default_factory=dict)
    """descriptor uid -> highest seq_num received."""
    events_missing: int = 0
    nav_capacity: int = 0
    """Points the nav buffers hold (0 until allocated)."""
    nav_offset: int = 0
    """For a run of unknown length kept as a rolling window: the flat index of the window's first point."""
    limited: str | None = None
    """Why the run's results are limited (``rolling_window``: over the memory budget or its point
    limit, only the newest points are kept; ``refused``: no buffers at all), else None."""
    stop_source: str = "router"
    """The source whose RunStop closed the run (its rejections are counted under that source)."""
    checkpointed_activity: float = -1.0
    """``last_activity`` when the run was last checkpointed (unchanged runs are not checkpointed again)."""

    def count_events(self, descriptor: str, seq_nums: list[int]) -> None:
        """Count received events; ``seq_nums`` must already be validated (ints within bounds)."""
        self.events_received[descriptor] = self.events_received.get(descriptor, 0) + len(seq_nums)
        if seq_nums:
            self.max_seq_num[descriptor] = max(self.max_seq_num.get(descriptor, 0), int(max(seq_nums)))

    def missing_events(self, num_events: Any, max_gap: int) -> tuple[int, list[str]]:
        """Events that were announced but not received: per stream, ``num_events`` from the RunStop
        when it gives one, else the highest seq_num seen (gaps before it).

        Returns:
            ``(missing, streams whose announced count was rejected)``: an announcement that is not
            an integer within ``[0, received + max_gap]`` is ignored (the seq_nums are used) and
            reported, so one hostile RunStop cannot add an absurd number to a counter.
        """
        from .limits import wire_index

        num_events = num_events if isinstance(num_events, dict) else {}
        missing, rejected = 0, []
        streams = set(self.descriptor_streams.values())
        for stream in streams:
            descs = [d for d, s in self.descriptor_streams.items() if s == stream]
            received = sum(self.events_received.get(d, 0) for d in descs)
            announced = num_events.get(stream)
            if announced is not None:
                announced = wire_index(announced, 0, received + max_gap)
                if announced is None:
                    rejected.append(stream)
            if announced is None:
                announced = sum(self.max_seq_num.get(d, 0) for d in descs)
            missing += max(0, int(announced) - received)
        return missing, rejected

    def restore_counts(self, state: dict[str, Any]) -> None:
        """Set the event bookkeeping from a checkpoint."""
        self.descriptor_streams = dict(state.get("descriptor_streams", {}))
        self.events_received = dict(state.get("events_received", {}))
        self.max_seq_num = dict(state.get("max_seq_num", {}))

    @property
    def expected_points(self) -> int | None:
        n = int(np.prod(self.nav_shape))
        return n if n > 0 else None

    @property
    def progress(self) -> float:
        if self.status != "open":
            return 1.0
        expected = self.expected_points
        if not expected:
            return 0.0
        return min(1.0, max(self.events_done, self.frames_done) / expected)

    @property
    def published_nav_shape(self) -> tuple[int, ...]:
        """The map shape sinks see; for runs of unknown length, the points seen so far."""
        if self.nav_shape != (0,):
            return self.nav_shape
        return (max(0, min(self.max_position + 1 - self.nav_offset, self.nav_capacity or self.max_position + 1)),)

    @property
    def nbytes(self) -> int:
        """Bytes held by this run's result buffers."""
        return sum(slot.nbytes for slot in self.slots)

    def summary(self) -> dict[str, Any]:
        start = self.start_doc
        return {
            "uid": self.uid,
            "scan_id": start.get("scan_id"),
            "plan_name": start.get("plan_name"),
            "status": self.status,
            "joined_midway": self.joined_midway,
            "nav_shape": list(self.published_nav_shape),
            "expected_points": self.expected_points,
            "events_done": self.events_done,
            "frames_done": self.frames_done,
            "events_missing": self.events_missing,
            "nav_offset": self.nav_offset,
            "limited": self.limited,
            "progress": self.progress,
            "opened": self.opened,
            "closed": self.closed,
            "last_event": self.last_event,
            "consumers": {
                slot.name: {
                    "active": slot.active,
                    "quarantined": slot.quarantined,
                    "inactive_reason": slot.inactive_reason,
                    "failures": slot.failures,
                    "buffers": {
                        name: {"kind": spec.kind, "units": spec.units, "description": spec.description,
                               "extra_shape": list(spec.extra_shape), "axis": spec.axis}
                        for name, spec in slot.specs.items()
                    },
                }
                for slot in self.slots
            },
        }


@dataclass
class BufferSnapshot:
    """A copy of one result buffer, ready to publish.

    ``data`` is ``(*nav_shape, *extra_shape)`` for ``nav`` buffers, ``extra_shape`` otherwise.
    ``axis`` is ``(values, units)`` of the signal axis of a ``sig`` buffer when the consumer set one.
    """

    run_uid: str
    consumer: str
    spec: BufferSpec
    data: np.ndarray
    axis: tuple[np.ndarray, str] | None = None


class RunStore:
    """Open runs plus the ``keep`` most recently finished ones, readable from any thread."""

    def __init__(self, keep: int = 10, keep_bytes: float = float("inf")):
        self.keep = keep
        self.keep_bytes = keep_bytes
        self._runs: OrderedDict[str, RunState] = OrderedDict()
        self._lock = threading.Condition()

    def add(self, run: RunState) -> None:
        """Add or re-add (after a status change) a run; prunes the oldest finished runs beyond
        ``keep`` runs or ``keep_bytes`` of result buffers."""
        with self._lock:
            self._runs[run.uid] = run
            finished = [uid for uid, r in self._runs.items() if r.status not in LIVE_STATUSES]
            for uid in finished[: max(0, len(finished) - self.keep)]:
                del self._runs[uid]
            finished = [r for r in self._runs.values() if r.status not in LIVE_STATUSES]
            held = sum(r.nbytes for r in finished)
            for r in finished:
                if held <= self.keep_bytes:
                    break
                held -= r.nbytes
                del self._runs[r.uid]
            self._lock.notify_all()

    def nbytes(self) -> int:
        """Bytes of result buffers held by every run in the store."""
        with self._lock:
            return sum(r.nbytes for r in self._runs.values())

    def make_room(self, needed: int, budget: float) -> bool:
        """Drop finished runs, oldest first, until ``needed`` more bytes fit in ``budget``; False
        if they do not fit even then (open runs are never dropped here)."""
        with self._lock:
            used = sum(r.nbytes for r in self._runs.values())
            for r in [r for r in self._runs.values() if r.status not in LIVE_STATUSES]:
                if used + needed <= budget:
                    break
                used -= r.nbytes
                del self._runs[r.uid]
            return used + needed <= budget

    def wait_finished(self, uid: str, timeout: float) -> bool:
        """Block until run ``uid`` is known and closed (neither open nor finishing); False on timeout."""
        def finished() -> bool:
            run = self._runs.get(uid)
            return run is not None and run.status not in LIVE_STATUSES
        with self._lock:
            return self._lock.wait_for(finished, timeout)

    def get(self, uid: str) -> RunState | None:
        with self._lock:
            if uid == "latest":
                return next(reversed(self._runs.values()), None)
            return self._runs.get(uid)

    def open_runs(self) -> list[RunState]:
        with self._lock:
            return [r for r in self._runs.values() if r.status in LIVE_STATUSES]

    def runs(self) -> list[RunState]:
        """Every run held, newest first."""
        with self._lock:
            return list(reversed(self._runs.values()))

    def summaries(self) -> list[dict[str, Any]]:
        """Newest first."""
        with self._lock:
            runs = list(self._runs.values())
        return [r.summary() for r in reversed(runs)]

    def _slot(self, uid: str, consumer: str, buffer: str) -> tuple[RunState, ConsumerSlot]:
        """The run and consumer slot holding ``buffer``; KeyError when any of them is unknown."""
        run = self.get(uid)
        if run is None:
            raise KeyError(f"no run {uid!r}")
        slot = next((s for s in run.slots if s.name == consumer), None)
        if slot is None or buffer not in slot.arrays:
            raise KeyError(f"no buffer {consumer}/{buffer} in run {run.uid}")
        return run, slot

    def digest(self, uid: str, consumer: str, buffer: str, max_bytes: int) -> str | None:
        """A 64-bit BLAKE2b digest (hex) of one buffer's published part, hashed in place (no copy),
        or None when that part is larger than ``max_bytes`` (hashing it on every live-page push
        would cost more than it saves). Equal digests mean equal contents; a digest taken while a
        worker writes may already be stale, which the next notification of the run corrects.

        Raises:
            KeyError: unknown run, consumer or buffer.
        """
        run, slot = self._slot(uid, consumer, buffer)
        arr = slot.arrays[buffer]
        if slot.specs[buffer].kind == "nav":
            arr = arr[:int(np.prod(run.published_nav_shape))]
        if arr.nbytes > max_bytes:
            return None
        return hashlib.blake2b(np.ascontiguousarray(arr), digest_size=8).hexdigest()

    def snapshot(self, uid: str, consumer: str, buffer: str) -> BufferSnapshot:
        """Copy one buffer of one run (``uid`` may be ``"latest"``).

        Raises:
            KeyError: unknown run, consumer or buffer.
        """
        run, slot = self._slot(uid, consumer, buffer)
        spec = slot.specs[buffer]
        arr = slot.arrays[buffer]
        if spec.kind == "nav":
            shape = run.published_nav_shape
            n = int(np.prod(shape))
            data = arr[:n].copy().reshape(*shape, *spec.extra_shape)
        else:
            data = arr.copy()
        axis = slot.consumer.run.axes.get(spec.axis) if spec.axis else None
        return BufferSnapshot(run.uid, consumer, spec, data, axis)
