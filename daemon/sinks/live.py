"""What the live web page is told, and when: a router listener plus a throttled state for
server-sent events (``GET /api/stream``).

The router thread only marks runs as touched (a set insert under a lock, nothing else). Every
``push_interval_s`` the HTTP server calls :meth:`LiveFeed.refresh` (in a worker thread), which takes
the run summaries, a health status read from the Prometheus registry, and a 64-bit BLAKE2 digest of
every buffer of every touched run. Each browser connection remembers the digests it was last sent
and is told only which buffers changed since (``changed`` event); it then fetches those buffers'
JSON. So a 150 x 150 run streaming at kHz costs the page at most one small message per interval and
one fetch per changed buffer, however fast events arrive.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from ..results import RunState, RunStore
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


def buffer_digest(data: np.ndarray) -> str:
    """A 64-bit BLAKE2b digest of an array's bytes (hex): equal digests mean equal contents."""
    return hashlib.blake2b(np.ascontiguousarray(data).tobytes(), digest_size=8).hexdigest()


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

    def __call__(self, name: str, run: RunState, doc: dict[str, Any]) -> None:
        """Router hook (router thread): remember that ``run`` changed."""
        with self._lock:
            self._touched.add(run.uid)

    def refresh(self) -> bool:
        """Recompute the state from the store (any thread but the router's; one at a time).

        Returns:
            True if anything a page shows changed, and :attr:`state` has a new ``version``.
        """
        with self._lock:
            touched, self._touched = self._touched, set()
        old = self.state
        runs = json_safe(self.store.summaries())  # RunStart values are the wire's: ExtType, numpy, NaN
        live_uids = {r["uid"] for r in runs}
        digests = {k: v for k, v in old.digests.items() if k[0] in live_uids and k[0] not in touched}
        for summary in runs:
            uid = summary["uid"]
            if uid not in touched:
                continue
            for consumer, c in summary["consumers"].items():
                for buffer in c["buffers"]:
                    try:
                        digests[(uid, consumer, buffer)] = buffer_digest(self.store.snapshot(uid, consumer, buffer).data)
                    except KeyError:  # buffers not allocated yet
                        continue
        status = json_safe(health_status(self.registry))
        if runs == old.runs and status == old.status and digests == old.digests:
            return False
        self.state = LiveState(old.version + 1, runs, status, digests)
        return True


def changed_buffers(state: LiveState, sent: dict[tuple[str, str, str], str]) -> list[dict[str, str]]:
    """Buffers whose digest in ``state`` differs from what a client was ``sent`` (or is new to it)."""
    return [{"run": uid, "consumer": consumer, "buffer": buffer}
            for (uid, consumer, buffer), digest in state.digests.items() if sent.get((uid, consumer, buffer)) != digest]
