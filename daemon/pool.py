"""The daemon's one pool for consumers' background work: per-batch stages and ``run.submit`` jobs.

A consumer never starts threads of its own (:mod:`beamlens.consumers.base`); what it wants done off
the router thread goes here, as a :class:`Job`. The pool runs jobs on ``router.pool_workers``
threads (default: the CPUs this process may use, ``os.sched_getaffinity``), measures each job's
time on its worker, and hands finished jobs back to the router thread through :meth:`JobPool.done`
(the router then installs them: the ``then`` callback or the staged batch's ``process`` runs
there, so buffers are only ever written on the router thread and a buffer growth cannot lose a
background write). :meth:`JobPool.cancel` drops the jobs of a run that ends and have not started;
a job already running finishes, and its result is discarded.

Python threads suit the work here: numpy, scikit-learn and onnxruntime release the GIL in their
kernels (onnxruntime's ``InferenceSession.run``, LAPACK in the SVD). A job that needs a process of
its own owns it for its duration (it is stopped when the job returns).

Stages and ``run.submit`` jobs run in two lanes of ``workers`` threads each: a movie's queued
stages (bounded by the run table) would otherwise hold a spectral refit back for as long as the
movie lasts, and the maps it refits would go stale; with two lanes the operating system shares the
CPUs between them.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def default_workers() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(eq=False)
class Job:
    """One unit of background work.

    Attributes:
        run_uid: the run it belongs to.
        slot: the consumer slot it is charged to (a :class:`~beamlens.daemon.results.ConsumerSlot`).
        method: ``"stage"`` or ``"submit"`` (the ``method`` label of its timing).
        fn, args: the work, ``fn(*args)``.
        then: callback for the result (``submit`` jobs), called on the router thread.
        result, error: set when done.
        elapsed: seconds the job ran on its worker.
        cancelled: the run ended first; the result is not installed.
    """

    run_uid: str
    slot: Any
    method: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    then: Callable[[Any], None] | None = None
    result: Any = None
    error: BaseException | None = None
    elapsed: float = 0.0
    finished: bool = False
    cancelled: bool = False
    installed: bool = False
    """The router thread has taken the result (or discarded it)."""
    future: Future | None = field(default=None, repr=False)


class JobPool:
    """A bounded thread pool whose finished jobs are collected by the router thread.

    Args:
        workers: worker threads per lane (stages; other jobs).
        wake: called (from a worker) after a job finished, to wake the router loop.
    """

    def __init__(self, workers: int, wake: Callable[[], None] = lambda: None):
        self.workers = workers
        self._wake = wake
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._done: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.in_flight = 0

    def submit(self, job: Job) -> Job:
        """Start ``job`` (queued when every worker is busy)."""
        lane = "stage" if job.method == "stage" else "jobs"
        with self._lock:
            executor = self._executors.get(lane)
            if executor is None:
                executor = self._executors[lane] = ThreadPoolExecutor(self.workers, thread_name_prefix=f"beamlens-pool-{lane}")
            self.in_flight += 1
            job.future = executor.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        t0 = time.perf_counter()
        try:
            job.result = job.fn(*job.args)
        except BaseException as exc:  # delivered to the router thread, counted there
            job.error = exc
        finally:
            job.elapsed = time.perf_counter() - t0
            job.finished = True
            self._done.put(job)
            self._wake()

    def done(self) -> list[Job]:
        """Jobs finished since the last call (router thread), in completion order."""
        out = []
        while True:
            try:
                job = self._done.get_nowait()
            except queue.Empty:
                return out
            with self._lock:
                self.in_flight -= 1
            out.append(job)

    def wait_any(self, timeout: float) -> bool:
        """Block until a job finishes (or ``timeout`` s); True if one is ready for :meth:`done`."""
        try:
            job = self._done.get(timeout=timeout)
        except queue.Empty:
            return False
        self._done.put(job)
        return True

    def cancel(self, jobs: list[Job]) -> int:
        """Cancel ``jobs`` (those not started never run; running ones are discarded when they
        return). Returns how many had not finished."""
        n = 0
        for job in jobs:
            if job.finished:
                continue
            job.cancelled = True
            n += 1
            if job.future is not None and job.future.cancel():
                job.finished = True
                self._done.put(job)  # never ran: the router still takes it back (as cancelled)
        return n

    def shutdown(self, wait: bool = False) -> None:
        """Stop the workers (queued jobs are cancelled)."""
        with self._lock:
            executors, self._executors = list(self._executors.values()), {}
        for ex in executors:
            ex.shutdown(wait=wait, cancel_futures=True)
