"""Joining runs mid-way: events whose descriptor was never seen (the daemon (re)started during a
run; standard plans emit the descriptor with the first event, so after a restart it is usually
gone).

What happens (the README says the same):

- Events for an unknown descriptor are **held** (bounded: ``router.midway_max_descriptors``
  descriptors, ``router.midway_max_events`` events each; beyond that they are rejected and counted
  as ``event_before_descriptor``, as before).
- If the descriptor arrives within ``router.midway_hold_s`` (documents out of order), the held
  events are analysed after it, as if they had come in order.
- Otherwise a descriptor is **built from the events** (:func:`descriptor_from_pages`: data keys
  with event-model dtype, shape and numpy dtype of the first event's values; no configuration, so
  no signal axis beyond what consumers default to), a run is opened for it and the held events are
  analysed. The run is counted in ``beamlens_runs_joined_midway_total``; its uid is
  ``midway-<descriptor uid>`` (events do not name their RunStart), it has no RunStart, so its map
  is one-dimensional and grows with seq_num (labelled "joined mid-run" on the page).
- A RunStop for an unknown run first settles the events held from its source, then closes such a
  run when its ``num_events`` names the run's stream with at least the events seen (the newest matching run from the same source); otherwise it is
  rejected as ``stop_for_unknown_run``, and the run is closed by ``run_timeout_s``.

With a Tiled look-up configured for the source (``sources.bluesky[i].lookup``, see
:mod:`beamlens.daemon.lookup`), the RunStart of a run whose descriptor came without it, and the
RunStart and descriptor of events held for an unknown descriptor, are looked up by uid first: the
run then keeps its uid, grid shape and snaking, and its own RunStop closes it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MIDWAY_PREFIX = "midway-"


@dataclass
class _Held:
    source: str
    since: float
    pages: list[dict[str, Any]] = field(default_factory=list)
    n: int = 0


def _data_key(value: Any) -> dict[str, Any]:
    """event-model ``DataKey`` for one value (dtype, shape, dtype_numpy)."""
    arr = np.asarray(value)
    if arr.ndim:
        dtype = "array"
    elif arr.dtype.kind == "b":
        dtype = "boolean"
    elif arr.dtype.kind in "iu":
        dtype = "integer"
    elif arr.dtype.kind == "f":
        dtype = "number"
    else:
        dtype = "string"
    key = {"source": "beamlens:built-from-events", "dtype": dtype, "shape": list(arr.shape)}
    if arr.dtype.kind in "biuf":
        key["dtype_numpy"] = arr.dtype.str
    return key


def descriptor_from_pages(descriptor_uid: str, pages: list[dict[str, Any]]) -> dict[str, Any]:
    """An EventDescriptor built from EventPages of a descriptor that was never received.

    Data keys come from the first page's ``data`` (first event's value of each key); the stream is
    ``primary`` when any key is an array (spectra, images: what the consumers analyse), else
    ``unknown`` (baseline-like readings, counted but not analysed). ``run_start`` is
    ``midway-<descriptor uid>``.

    Args:
        pages: EventPages (``data``: key -> list of values) of that descriptor, at least one.
    """
    first = pages[0]
    data_keys = {k: _data_key(v[0]) for k, v in first["data"].items() if len(v)}
    stream = "primary" if any(k["dtype"] == "array" for k in data_keys.values()) else "unknown"
    return {"uid": descriptor_uid, "run_start": MIDWAY_PREFIX + descriptor_uid, "name": stream,
            "time": float(np.min(first.get("time") or [time.time()])), "data_keys": data_keys,
            "configuration": {}, "hints": {}, "object_keys": {}, "beamlens_built_from_events": True}


class MidwayJoiner:
    """Holds events of unknown descriptors and joins their runs (see the module docstring).

    Args:
        hold_s: how long to wait for the descriptor; max_descriptors, max_events: the bounds.
        descriptor: the router's descriptor handler ``(doc, source)``.
        event_page: the router's EventPage handler ``(page, source)``.
    """

    def __init__(self, hold_s: float, max_descriptors: int, max_events: int,
                 descriptor: Callable[[dict[str, Any], str], None], event_page: Callable[[dict[str, Any], str], None],
                 start: Callable[[dict[str, Any], str], Any] | None = None, lookups: dict[str, Any] | None = None,
                 open_runs: Callable[[], dict[str, Any]] | None = None):
        self.lookups = lookups or {}
        """source name -> :class:`~beamlens.daemon.lookup.TiledLookup`."""
        self._start = start
        self._open_runs = open_runs
        self.hold_s = hold_s
        self.max_descriptors = max_descriptors
        self.max_events = max_events
        self._descriptor = descriptor
        self._event_page = event_page
        self._held: dict[str, _Held] = {}
        self._built: dict[str, str] = {}
        """run uid -> source of the runs opened from built descriptors (until their stop)."""

    @property
    def waiting(self) -> bool:
        """True while events are held."""
        return bool(self._held)

    def hold(self, page: dict[str, Any], source: str) -> bool:
        """Keep ``page`` until its descriptor comes or is built; False when the bounds are reached
        (the caller rejects the events)."""
        uid = page["descriptor"]
        held = self._held.get(uid)
        if held is None:
            if len(self._held) >= self.max_descriptors:
                return False
            held = self._held[uid] = _Held(source, time.monotonic())
            log.warning("events for unknown descriptor %s: holding them up to %.1f s for it", uid, self.hold_s)
        n = len(page["seq_num"])
        if held.n + n > self.max_events:
            self._build(uid)  # analyse what is held now; later events go straight to the built descriptor
            return False
        held.pages.append(page)
        held.n += n
        return True

    def descriptor_arrived(self, uid: str) -> None:
        """The real descriptor came: analyse the held events after it."""
        held = self._held.pop(uid, None)
        if held is not None:
            log.info("descriptor %s arrived after %d held event(s)", uid, held.n)
            for page in held.pages:
                self._event_page(page, held.source)

    def expire(self) -> None:
        """Build descriptors for events held longer than ``hold_s``."""
        now = time.monotonic()
        for uid in [u for u, h in self._held.items() if now - h.since >= self.hold_s]:
            self._build(uid)

    def start_for(self, run_uid: str, source: str, time_s: float) -> tuple[dict[str, Any], bool]:
        """The RunStart to open a run joined at its descriptor with: looked up in the source's
        Tiled server, else a minimal one (uid and time only). Returns ``(doc, looked_up)``."""
        lookup = self.lookups.get(source)
        doc = lookup.start(run_uid) if lookup is not None and not run_uid.startswith(MIDWAY_PREFIX) else None
        if doc is not None:
            log.info("RunStart of run %s found in %s: plan %s, shape %s", run_uid, lookup.uri, doc.get("plan_name"),
                     doc.get("shape"))
            return doc, True
        return {"uid": run_uid, "time": time_s}, False

    def _build(self, uid: str) -> None:
        held = self._held.pop(uid)
        lookup = self.lookups.get(held.source)
        found = lookup.descriptor(uid) if lookup is not None and self._start is not None else None
        if found is not None:
            start, doc = found
            log.info("descriptor %s and RunStart %s found in %s", uid, start["uid"], lookup.uri)
            if self._open_runs is None or start["uid"] not in self._open_runs():
                self._start(start, held.source)
            self._descriptor(doc, held.source)
            for page in held.pages:
                self._event_page(page, held.source)
            return
        doc = descriptor_from_pages(uid, held.pages)
        log.warning("descriptor %s never arrived: built one from %d event(s) (keys %s); joining its run as %s",
                    uid, held.n, sorted(doc["data_keys"]), doc["run_start"])
        self._built[doc["run_start"]] = held.source
        self._descriptor(doc, held.source)
        for page in held.pages:
            self._event_page(page, held.source)

    def adopt_stop(self, doc: dict[str, Any], source: str, runs: dict[str, Any]) -> Any | None:
        """The open run built from events that a RunStop of an unknown run most plausibly ends:
        the newest one from ``source`` whose stream count in the stop's ``num_events`` is at least
        the events seen. None when there is none.

        Args:
            runs: the router's open runs by uid (oldest first).
        """
        for uid in [u for u, h in self._held.items() if h.source == source]:
            self._build(uid)  # a stop right after held events: their run first
        if isinstance(doc.get("run_start"), str) and doc["run_start"] in runs:  # found by a look-up just now
            return runs[doc["run_start"]]
        counts = doc.get("num_events") or {}
        self._built = {u: s for u, s in self._built.items() if u in runs}
        for uid in reversed([u for u in runs if self._built.get(u) == source]):
            run = runs[uid]
            if any(isinstance(counts.get(s), int) and counts[s] >= run.events_done for s in set(run.descriptor_streams.values())):
                log.info("RunStop for unknown run %s ends %s, built from events", doc.get("run_start"), uid)
                return run
        return None


def lookups_from_config(config: Any) -> dict[str, Any]:
    """source name -> :class:`~beamlens.daemon.lookup.TiledLookup` for every bluesky source with a
    ``lookup``. Raises RuntimeError when tiled is not installed."""
    from .lookup import TiledLookup
    return {s.name: TiledLookup(s.lookup) for s in config.sources.bluesky if s.lookup}
