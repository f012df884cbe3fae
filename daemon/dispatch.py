"""Calling consumers: one call under isolation, with timing, quarantine and a strict mode.

Every consumer method the daemon calls (``signal``, ``process``, ``merge``, ``results``,
``finish``, the document hooks, ``then`` callbacks of background jobs) goes through
:meth:`Dispatcher.call`, on the router thread. The consumer's exceptions never reach the daemon
(bluesky's ``make_callback_safe``):

- :class:`~beamlens.consumers.base.NotApplicable` from a document hook sets the consumer aside for
  the run (logged at INFO, not a failure); from ``signal`` it only means "not this signal" and is
  returned to the caller (see :data:`REFUSED`).
- :class:`~beamlens.consumers.base.BadData` counts the batch's points in
  ``beamlens_points_skipped_total{consumer, reason}``; not a failure.
- anything else is logged with the run and method, counted in
  ``beamlens_consumer_failures_total``, and after ``router.max_failures_per_run`` the consumer is
  quarantined for the rest of the run; with ``router.strict`` (tests) it is re-raised.

Each call is timed in ``beamlens_consumer_processing_seconds{consumer, method}`` and charged to the
slot's ``busy_s`` (slow-consumer shedding); pool jobs are charged through :meth:`Dispatcher.charge`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from beamlens.consumers.base import BadData, NotApplicable

from .isolation import RateLimitedLog
from .metrics import Metrics
from .results import ConsumerSlot, RunState

log = logging.getLogger("beamlens.daemon.router")


class Refused:
    """Returned by :meth:`Dispatcher.call` when ``signal`` raised NotApplicable (``reason``)."""

    def __init__(self, reason: str):
        self.reason = reason


class Dispatcher:
    """Calls consumer methods under isolation.

    Args:
        metrics: where to count and time.
        max_failures: failures per run before quarantine (``router.max_failures_per_run``).
        strict: re-raise consumer exceptions (``router.strict``, tests).
    """

    def __init__(self, metrics: Metrics, max_failures: int, strict: bool):
        self.metrics = metrics
        self.max_failures = max_failures
        self.strict = strict
        self.rlog = RateLimitedLog(log)

    def call(self, run: RunState, slot: ConsumerSlot, method: str, *args: Any, points: int = 1) -> Any:
        """Call ``slot.consumer.<method>(*args)``.

        Args:
            points: points the call concerns (counted under BadData's reason).

        Returns:
            what the method returned; a :class:`Refused` when ``signal`` raised NotApplicable; None
            after any other exception.

        Raises:
            Exception: the consumer's, in strict mode only.
        """
        return self.run_guarded(run, slot, method, getattr(slot.consumer, method), *args, points=points)

    def run_guarded(self, run: RunState, slot: ConsumerSlot, method: str, fn: Callable[..., Any], *args: Any,
                    points: int = 1) -> Any:
        """Like :meth:`call` for any callable of the consumer's (a ``then`` callback)."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        except NotApplicable as exc:
            if method == "signal":
                return Refused(str(exc))
            slot.inactive_reason = str(exc)
            slot.refused_only = False
            log.info("consumer %s sits out run %s: %s", slot.name, run.uid, exc)
        except BadData as exc:
            self.skipped(slot, exc.reason, points)
            self.rlog.log(logging.WARNING, f"bad:{slot.name}:{exc.reason}", "consumer %s skipped %d point(s) of run %s: %s",
                          slot.name, points, run.uid, exc)
        except Exception:
            self.failed(run, slot, method)
            if self.strict:
                raise
        finally:
            self.charge(slot, method, time.perf_counter() - t0)
        return None

    def failed(self, run: RunState, slot: ConsumerSlot, method: str, exc: BaseException | None = None) -> None:
        """Count one failure of ``slot`` (logged with the traceback of the exception being handled,
        or of ``exc``); quarantine at the limit."""
        slot.failures += 1
        self.metrics.consumer_failures.labels(slot.name).inc()
        log.error("consumer %s failed in %s of run %s (failure %d)", slot.name, method, run.uid, slot.failures,
                  exc_info=exc if exc is not None else True)
        if slot.failures >= self.max_failures and not slot.quarantined:
            self.quarantine(run, slot, "failures")

    def quarantine(self, run: RunState, slot: ConsumerSlot, reason: str) -> None:
        slot.quarantined = True
        self.metrics.consumers_quarantined.labels(slot.name, reason).inc()
        log.error("consumer %s quarantined for the rest of run %s (%s)", slot.name, run.uid, reason)

    def charge(self, slot: ConsumerSlot, method: str, elapsed: float) -> None:
        """Time ``elapsed`` s of ``slot``'s work (a call, or a pool job) under ``method``."""
        slot.busy_s += elapsed
        self.metrics.processing_seconds.labels(slot.name, method).observe(elapsed)

    def skipped(self, slot: ConsumerSlot, reason: str, n: int) -> None:
        if n:
            self.metrics.points_skipped.labels(slot.name, reason).inc(n)
