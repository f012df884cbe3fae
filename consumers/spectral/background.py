"""A background fit in a worker process that lives exactly as long as the fit.

Consumers hand long fits (mLLE refits) to the daemon's pool with ``run.submit(job, *args,
then=install)``; they start no thread or process of their own. A job may still want the fit's
pure-Python and numpy work out of the daemon's interpreter (it would otherwise hold the GIL while
events are processed): :func:`in_worker` runs ``fn(*args)`` in a worker process started for this
one call from a ``forkserver`` that has the fitting modules imported (a start costs a fork, not an
interpreter), and stops it before returning, whether the fit succeeded or raised. The worker is
therefore owned by the pool job: it ends when the job ends, so at the end of a run (or when the
daemon cancels the run's jobs) no worker outlives its fit, and a job cancelled before it started
never starts one. ``fn`` must be a module-level function; its arguments (numpy arrays) and result
travel over the worker's pipe (pickle between this process and its own child only, never data
from the network). A worker that dies raises ``BrokenProcessPool`` in the job, which the daemon
counts as a failure of the consumer's job.
"""
from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

PRELOAD = ["numpy", "scipy.spatial", "sklearn.manifold", "threadpoolctl", "beamlens.consumers.spectral.manifold"]
"""Modules the forkserver imports once, so that each worker starts ready to fit."""
_CONTEXT_LOCK = threading.Lock()
_CONTEXT: Any = None
T = TypeVar("T")


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
    """One BLAS thread in the worker: the other cores stay with the event path."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)


def in_worker(fn: Callable[..., T], *args: Any, meanwhile: Callable[[], object] | None = None) -> T:
    """``fn(*args)`` computed in a worker process started for this call and stopped before it
    returns (see the module docstring).

    Args:
        meanwhile: called on this thread once the worker has the call, while it computes (work
            the caller needs anyway, done in the wait).

    Raises:
        Exception: whatever ``fn`` or ``meanwhile`` raised; ``BrokenProcessPool`` when the worker died.
    """
    pool = ProcessPoolExecutor(1, mp_context=_context(), initializer=_worker_init)
    try:
        future = pool.submit(fn, *args)
        if meanwhile is not None:
            meanwhile()
        return future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
