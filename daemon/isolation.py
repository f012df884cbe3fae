"""Failure isolation for the daemon's threads: no item kills a thread, and a thread that dies anyway
makes the daemon unhealthy and, after a grace period, exits it.

- :class:`RateLimitedLog`: logs the 1st, 2nd, 4th, 8th, ... occurrence of each key (and at most one
  line per key per ``min_interval_s``), so a flood of one bad message writes a few lines, not one per
  message, while the counters keep the exact numbers.
- :func:`guarded`: runs one unit of work (a document, a frame batch, a supervision tick, a run's
  finishing); an exception is logged (rate-limited, with its traceback), counted in
  ``beamlens_internal_errors_total{component}`` and swallowed, so the caller's loop goes on with the
  next item. This is bluesky's ``make_callback_safe`` applied to the daemon's own code; there is no
  global switch, and the strict mode (``router.strict``) re-raises for tests.
- :class:`ThreadWatch`: the threads the daemon cannot work without; :meth:`ThreadWatch.dead` names
  those no longer alive, which ``/health/live`` reports (503) and the main loop turns into a
  non-zero exit after ``router.dead_thread_exit_s`` so systemd or Kubernetes restart the daemon
  (which resumes open runs from their checkpoints).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class RateLimitedLog:
    """Per-key rate limiting of log lines.

    Args:
        logger: where to log.
        min_interval_s: at most one line per key in this interval, except for the 1st, 2nd, 4th, ...
            occurrences, which always log (so the growth of a problem stays visible).
        max_keys: keys remembered at most (oldest forgotten), so hostile keys cannot grow it.
    """

    def __init__(self, logger: logging.Logger, min_interval_s: float = 10.0, max_keys: int = 1024):
        self.logger = logger
        self.min_interval_s = min_interval_s
        self.max_keys = max_keys
        self._counts: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def should_log(self, key: str) -> int:
        """The occurrence number of ``key`` if this one should be logged, else 0."""
        now = time.monotonic()
        with self._lock:
            entry = self._counts.get(key)
            if entry is None:
                if len(self._counts) >= self.max_keys:
                    self._counts.pop(next(iter(self._counts)))
                entry = self._counts[key] = [0, -float("inf")]
            entry[0] += 1
            n = int(entry[0])
            if n & (n - 1) == 0 or now - entry[1] >= self.min_interval_s:
                entry[1] = now
                return n
        return 0

    def log(self, level: int, key: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        """Log ``msg % args`` at ``level`` if ``key`` is not rate-limited now (the count so far is
        appended)."""
        n = self.should_log(key)
        if n:
            self.logger.log(level, msg + " (%d so far)", *args, n, exc_info=exc_info)


def guarded(component: str, count: Callable[[str], None], rlog: RateLimitedLog, fn: Callable[..., T],
            *args: Any, strict: bool = False) -> T | None:
    """Run ``fn(*args)``; on an exception log it (rate-limited, with traceback), call
    ``count(component)`` and return None.

    Args:
        component: the metric label (``router``, ``supervision``, ``frames_decode_<source>``, ...).
        count: increments ``beamlens_internal_errors_total{component}``.
        rlog: the rate-limited log.
        fn: the unit of work.
        strict: re-raise after counting (tests).

    Raises:
        Exception: only in strict mode.
    """
    try:
        return fn(*args)
    except Exception as exc:
        count(component)
        rlog.log(logging.ERROR, f"{component}:{type(exc).__name__}", "internal error in %s (%s: %s); item dropped, "
                 "the thread goes on", component, type(exc).__name__, str(exc)[:300], exc_info=True)
        if strict:
            raise
        return None


class ThreadWatch:
    """The daemon's vital threads, checked by the health endpoint and the main loop.

    Args:
        threads: returns the ``threading.Thread`` objects that must stay alive while the daemon runs
            (called each time, since sources create theirs at start).
    """

    def __init__(self, threads: Callable[[], Iterable[threading.Thread | None]]):
        self._threads = threads
        self._dead_since: float | None = None

    def dead(self) -> list[str]:
        """Names of watched threads that have died (sorted)."""
        dead = sorted(t.name for t in self._threads() if t is not None and not t.is_alive())
        if dead and self._dead_since is None:
            self._dead_since = time.monotonic()
        elif not dead:
            self._dead_since = None
        return dead

    def dead_for(self) -> float:
        """Seconds since a watched thread was first seen dead (0 while all are alive)."""
        return 0.0 if not self.dead() or self._dead_since is None else time.monotonic() - self._dead_since
