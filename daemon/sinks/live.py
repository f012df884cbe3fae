"""What the live web page is told, and when: a router listener plus a throttled state for
server-sent events (``GET /api/stream``).

The router thread only marks runs as touched (a set insert under a lock, nothing else). Every
``push_interval_s`` the HTTP server calls :meth:`LiveFeed.refresh` (in a worker thread), which takes
the run summaries, a health status read from the Prometheus registry, and a 64-bit BLAKE2 digest of
every buffer of every touched run. Each browser connection remembers the digests it was last sent
and is told only which buffers changed since (``changed`` event); it then fetches those buffers'
JSON.

A run counts as touched when the router notified anything of it since the last refresh (``"results"``
included: buffers changed by background work), and, while it is open, for :data:`SETTLE_S` after
its last document or frame: consumers may write a batch's results after the notification (the
defects consumer post-processes in a worker), and the last batch of a movie must still reach the
page when no further frame comes to announce it. Unchanged buffers cost only their digest. So a 150 x 150 run streaming at kHz costs the page at most one small message per interval and
one fetch per changed buffer, however fast events arrive.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from ..results import RunState, RunStore
from .axes import MotorReadings, motor_names, scan_axes
from .jsonsafe import json_safe

log = logging.getLogger(__name__)

#: Health sections of the page and ``/api/status``: section -> sample names read from the registry.
#: Names not (yet) registered are simply absent (frame metrics come with the frame sources).
HEALTH_SAMPLES: dict[str, tuple[str, ...]] = {
    "sources": ("beamlens_source_connected", "beamlens_documents_received_total", "beamlens_frames_received_total"),
    "queues": ("beamlens_queue_depth",),
    "drops": ("beamlens_frames_dropped_total", "beamlens_bad_messages_total", "beamlens_points_skipped_total"),
    "errors": ("beamlens_consumer_failures_total", "beamlens_consumers_quarantined_total"),
    "runs": ("beamlens_runs_open", "beamlens_events_processed_total", "beamlens_last_event_timestamp_seconds",
             "beamlens_run_progress_ratio"),
}


def health_status(registry: CollectorRegistry) -> dict[str, list[dict[str, Any]]]:
    """Current values of the :data:`HEALTH_SAMPLES`, by section.

    Returns:
        ``{section: [{"name": sample name, "labels": {...}, "value": float}, ...]}``, samples in
        registry order; ``_created`` samples are left out.
    """
    wanted = {name: section for section, names in HEALTH_SAMPLES.items() for name in names}
    out: dict[str, list[dict[str, Any]]] = {section: [] for section in HEALTH_SAMPLES}
    for family in registry.collect():
        for sample in family.samples:
            section = wanted.get(sample.name)
            if section is not None:
                out[section].append({"name": sample.name, "labels": dict(sample.labels), "value": float(sample.value)})
    return out


#: Samples of history kept per ``single`` buffer (one per change, at most one per push interval).
HISTORY_SAMPLES = 600
#: ``single`` buffers with more elements than this get no history (matrices, patches).
HISTORY_MAX_ELEMENTS = 16
#: Axis values are listed in a summary up to this many points per axis (start/stop always).
AXIS_VALUES_MAX = 4096


def axes_json(start_doc: dict[str, Any], nav_shape: tuple[int, ...], units: dict[str, str],
              readings: MotorReadings | None = None) -> list[dict[str, Any]]:
    """The scan axes of a run for the page, in motor units (:func:`~beamlens.daemon.sinks.axes.scan_axes`:
    the motors' readings when the run has them, which relative plans need, else the plan pattern).

    Returns:
        one dict per axis: ``name``, ``units``, ``dim`` (the map dimension it runs along, slowest
        first), ``motor`` (False for point indices ``scan_dim_<i>``), ``num``, ``start`` and
        ``stop`` (first and last value, motor units) and ``values`` (all of them, None beyond
        :data:`AXIS_VALUES_MAX` points). Never raises.
    """
    try:
        axes = scan_axes(start_doc, nav_shape, units, readings)
    except Exception:  # hostile RunStart content: fall back to indices
        log.warning("scan axes of run %s could not be derived", start_doc.get("uid"), exc_info=True)
        axes = scan_axes({}, nav_shape, {})
    out = []
    for a in axes:
        v = np.asarray(a.values, dtype=np.float64)
        out.append({"name": a.name, "units": a.units, "dim": a.dim, "motor": not a.name.startswith("scan_dim_"),
                    "num": int(len(v)), "start": float(v[0]) if len(v) else None,
                    "stop": float(v[-1]) if len(v) else None,
                    "values": v.tolist() if len(v) <= AXIS_VALUES_MAX else None})
    return json_safe(out)


#: Open runs are re-examined for this long after their last document or frame (s), for results
#: their consumers write after the router's notification.
SETTLE_S = 10.0

#: Buffers whose published part is larger are not hashed on each push: they count as changed
#: whenever their run was touched (see :meth:`~beamlens.daemon.results.RunStore.digest`).
DIGEST_MAX_BYTES = 8 * 2**20


def settling(store: RunStore, settle_s: float = SETTLE_S) -> set[str]:
    """Uids of open runs that had a document or frame within ``settle_s`` (their consumers may
    still be writing results of it)."""
    since = time.time() - settle_s
    return {run.uid for run in store.open_runs() if run.last_activity >= since}


def buffer_digest(data: np.ndarray) -> str:
    """A 64-bit BLAKE2b digest of an array's bytes (hex), hashed without a copy when the array is
    C-contiguous: equal digests mean equal contents."""
    return hashlib.blake2b(np.ascontiguousarray(data), digest_size=8).hexdigest()


@dataclass(frozen=True)
class LiveState:
    """One published state; replaced whole, never mutated, so readers need no lock.

    ``digests`` maps ``(run uid, consumer, buffer)`` to the buffer's digest.
    """

    version: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    digests: dict[tuple[str, str, str], str] = field(default_factory=dict)


class LiveFeed:
    """Router listener (``router.listeners.append(feed)``) and the state the page is sent.

    Args:
        store: the runs to publish.
        registry: the Prometheus registry health is read from.
    """

    def __init__(self, store: RunStore, registry: CollectorRegistry):
        self.store = store
        self.registry = registry
        self.state = LiveState()
        self._touched: set[str] = set()
        self._lock = threading.Lock()
        self._units: dict[str, dict[str, str]] = {}
        """run uid -> motor units from its primary descriptor."""
        self._readings: dict[str, MotorReadings] = {}
        """run uid -> motor readings gathered from its primary event pages (router thread writes)."""
        self._axes: dict[str, tuple[tuple[Any, ...], list[dict[str, Any]]]] = {}
        self.history: dict[tuple[str, str, str], deque[tuple[float, list[Any]]]] = {}
        """(run, consumer, buffer) -> (unix time, values) of each ``single`` buffer, newest last."""

    def __call__(self, name: str, run: RunState, doc: dict[str, Any]) -> None:
        """Router hook (router thread): remember that ``run`` changed, its motors' units and readings."""
        if name == "start" and motor_names(run.start_doc):
            with self._lock:
                self._readings[run.uid] = MotorReadings(run.start_doc, run.nav_shape, run.snaking)
        elif name == "event_page" and run.uid in self._readings:
            try:
                self._readings[run.uid].event_page(doc)
            except Exception:  # a hostile page must not stop the page's bookkeeping
                log.warning("motor readings of run %s could not be read", run.uid, exc_info=True)
        if name == "descriptor":
            motors = set(motor_names(run.start_doc))
            units = {k: str(v["units"]) for k, v in (doc.get("data_keys") or {}).items()
                     if k in motors and isinstance(v, dict) and isinstance(v.get("units"), str)}
            with self._lock:
                self._units[run.uid] = {**units, **self._units.get(run.uid, {})}
        with self._lock:
            self._touched.add(run.uid)

    def summary(self, run: RunState) -> dict[str, Any]:
        """A run's summary as published: JSON-safe, with its scan ``axes`` (:func:`axes_json`)."""
        shape = run.published_nav_shape
        version = (shape, run.status, run.events_done)
        cached = self._axes.get(run.uid)
        if cached is not None and cached[0] == version:
            axes = cached[1]
        else:
            with self._lock:
                units = dict(self._units.get(run.uid, {}))
                readings = self._readings.get(run.uid)
            axes = axes_json(dict(run.start_doc), shape, units, readings)
            self._axes[run.uid] = (version, axes)
        return json_safe({**run.summary(), "axes": axes})

    def summaries(self) -> list[dict[str, Any]]:
        """Every run in the store, newest first, as :meth:`summary` publishes it."""
        return [self.summary(run) for run in self.store.runs()]

    def refresh(self) -> bool:
        """Recompute the state from the store (any thread but the router's; one at a time).

        Returns:
            True if anything a page shows changed, and :attr:`state` has a new ``version``.
        """
        with self._lock:
            touched, self._touched = self._touched, set()
        touched |= settling(self.store)
        old = self.state
        runs = self.summaries()  # RunStart values are the wire's: ExtType, numpy, NaN -> JSON-safe
        live_uids = {r["uid"] for r in runs}
        digests = {k: v for k, v in old.digests.items() if k[0] in live_uids and k[0] not in touched}
        now = time.time()
        for summary in runs:
            uid = summary["uid"]
            if uid not in touched:
                continue
            for consumer, c in summary["consumers"].items():
                for buffer, spec in c["buffers"].items():
                    key = (uid, consumer, buffer)
                    try:  # hashed in place: a frame run's nav buffers can hold hundreds of MiB
                        digest = self.store.digest(uid, consumer, buffer, DIGEST_MAX_BYTES)
                    except KeyError:  # buffers not allocated yet
                        continue
                    digests[key] = digest if digest is not None else f"touched:{old.version + 1}"
                    if spec["kind"] == "single" and digests[key] != old.digests.get(key):
                        snap = self.store.snapshot(uid, consumer, buffer)
                        if np.size(snap.data) <= HISTORY_MAX_ELEMENTS:
                            values = json_safe(np.asarray(snap.data, dtype=np.float64).reshape(-1))
                            self.history.setdefault(key, deque(maxlen=HISTORY_SAMPLES)).append((now, values))
        with self._lock:
            self._units = {u: v for u, v in self._units.items() if u in live_uids or u in touched}
            self._readings = {u: v for u, v in self._readings.items() if u in live_uids or u in touched}
        self.history = {k: v for k, v in self.history.items() if k[0] in live_uids}
        self._axes = {k: v for k, v in self._axes.items() if k in live_uids}
        status = json_safe(health_status(self.registry))
        if runs == old.runs and status == old.status and digests == old.digests:
            return False
        self.state = LiveState(old.version + 1, runs, status, digests)
        return True


def changed_buffers(state: LiveState, sent: dict[tuple[str, str, str], str]) -> list[dict[str, str]]:
    """Buffers whose digest in ``state`` differs from what a client was ``sent`` (or is new to it)."""
    return [{"run": uid, "consumer": consumer, "buffer": buffer}
            for (uid, consumer, buffer), digest in state.digests.items() if sent.get((uid, consumer, buffer)) != digest]
