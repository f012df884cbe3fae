"""One refit at a time on a worker thread, off the event path.

A consumer hands :meth:`Refitter.request` a snapshot of its state and a function to fit it; the
function runs on a daemon thread while events keep flowing. The consumer collects the result with
:meth:`Refitter.poll` (non-blocking) from its own thread and installs it there, so no consumer state
is shared between threads. A request made while a fit is running replaces any waiting request
(only the newest snapshot is worth fitting). An exception in the fit is re-raised by ``poll``/``wait``
on the consumer's thread, where the daemon logs and counts it like any consumer failure.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class Refitter:
    """Runs ``fit(snapshot)`` jobs one at a time on a background thread.

    Args:
        name: thread name (shows up in stack dumps and logs).
    """

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._waiting: tuple[Callable[[Any], Any], Any] | None = None
        self._result: Any = None
        self._error: BaseException | None = None
        self._has_result = False
        self.fits_done = 0
        self.busy_seconds = 0.0
        """Wall time spent fitting (for benchmarks)."""

    @property
    def busy(self) -> bool:
        """True while a fit runs or waits."""
        with self._lock:
            return self._thread is not None

    def request(self, fit: Callable[[Any], Any], snapshot: Any) -> None:
        """Fit ``snapshot`` with ``fit`` now, or after the running fit (replacing any waiting one)."""
        with self._lock:
            if self._thread is not None:
                self._waiting = (fit, snapshot)
                return
            self._start(fit, snapshot)

    def _start(self, fit: Callable[[Any], Any], snapshot: Any) -> None:
        self._thread = threading.Thread(target=self._run, args=(fit, snapshot), name=self.name, daemon=True)
        self._thread.start()

    def _run(self, fit: Callable[[Any], Any], snapshot: Any) -> None:
        while True:
            t0 = time.perf_counter()
            try:
                result, error = fit(snapshot), None
            except BaseException as exc:  # handed to the consumer's thread by poll()
                result, error = None, exc
            with self._lock:
                self.busy_seconds += time.perf_counter() - t0
                self.fits_done += 1
                self._result, self._error, self._has_result = result, error, True
                if self._waiting is None:
                    self._thread = None
                    return
                fit, snapshot = self._waiting
                self._waiting = None

    def poll(self) -> Any:
        """The newest finished result (once), or None.

        Raises:
            Exception: whatever the fit raised.
        """
        with self._lock:
            if not self._has_result:
                return None
            result, error = self._result, self._error
            self._result, self._error, self._has_result = None, None, False
        if error is not None:
            raise error
        return result

    def __getstate__(self) -> dict[str, Any]:
        """Checkpointing: let the running and waiting fits finish, then keep their result (not the
        thread or the lock)."""
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                break
            thread.join()
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_thread", "_waiting")}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._thread = None
        self._waiting = None

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the running and waiting fits to finish, then :meth:`poll`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                return self.poll()
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name}: refit still running after {timeout} s")
