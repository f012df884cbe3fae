"""One refit at a time on a worker thread (or in a worker process), off the event path.

A consumer hands :meth:`Refitter.request` a snapshot of its state and a function to fit it; the
function runs on a daemon thread while events keep flowing. The consumer collects the result with
:meth:`Refitter.poll` (non-blocking) from its own thread and installs it there, so no consumer state
is shared between threads. A request made while a fit is running replaces any waiting request
(only the newest snapshot is worth fitting). An exception in the fit is re-raised by ``poll``/``wait``
on the consumer's thread, where the daemon logs and counts it like any consumer failure.

With ``process=True`` the fit runs in a worker process of the refitter's own (one per refitter,
started at the first request from a ``forkserver`` that has the fitting modules imported, so a
start costs a fork, not an interpreter): pure-Python and numpy work in a fit then no longer holds
the event path's interpreter lock. The fit function must then be a module-level function; its
snapshot (numpy arrays) and result travel over the worker's pipe (pickle between this process and
its own child only, never data from the network). The thread that waits on the worker releases the
GIL. :meth:`close` (called at run end; also on garbage collection and at interpreter exit) stops the
worker; a worker that dies makes the next ``poll``/``wait`` raise ``BrokenProcessPool``.
"""
from __future__ import annotations

import multiprocessing
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

PRELOAD = ["numpy", "scipy.spatial", "sklearn.manifold", "threadpoolctl", "beamlens.consumers.spectral.manifold"]
"""Modules the forkserver imports once, so that each worker starts ready to fit."""
_CONTEXT_LOCK = threading.Lock()
_CONTEXT: Any = None


def _context() -> Any:
    """The forkserver multiprocessing context (fork alone is unsafe in a threaded daemon)."""
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _CONTEXT = ctx
        return _CONTEXT


def _worker_init() -> None:
    """One BLAS thread in the worker: the other core stays with the event path."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)


class Refitter:
    """Runs ``fit(snapshot)`` jobs one at a time on a background thread.

    Args:
        name: thread name (shows up in stack dumps and logs).
        process: run each fit in a worker process of this refitter's own (``fit`` must then be
            picklable: a module-level function).
    """

    def __init__(self, name: str, process: bool = False):
        self.name = name
        self.process = process
        self._pool: ProcessPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None
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

    def _in_worker(self, fit: Callable[[Any], Any], snapshot: Any) -> Any:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(1, mp_context=_context(), initializer=_worker_init)
                self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
            pool = self._pool
        return pool.submit(fit, snapshot).result()

    def close(self) -> None:
        """Stop the worker process (if any) once the running fit ends; idempotent. Call
        :meth:`wait` first to keep the running fit's result."""
        with self._lock:
            pool, self._pool = self._pool, None
            finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer.detach()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    @property
    def worker_pid(self) -> int | None:
        """Process id of the worker process while it runs (tests)."""
        with self._lock:
            pool = self._pool
        procs = list(getattr(pool, "_processes", None) or {}) if pool is not None else []
        return procs[0] if procs else None

    def _run(self, fit: Callable[[Any], Any], snapshot: Any) -> None:
        while True:
            t0 = time.perf_counter()
            try:
                result, error = (self._in_worker(fit, snapshot) if self.process else fit(snapshot)), None
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
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_lock", "_thread", "_waiting", "_pool", "_finalizer")}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("process", False)
        self._lock = threading.Lock()
        self._thread = None
        self._waiting = None
        self._pool = None
        self._finalizer = None

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
