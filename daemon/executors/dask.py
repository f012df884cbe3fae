"""Consumers' per-batch stages on a Dask distributed cluster (``executor: {kind: dask}``).

What travels: for each batch, the consumer's *description* — class path (``module:Class``), its
params as JSON-like data, the run's uid, nav shape and RunStart, and the signals it accepted (plain
frozen dataclasses) — and the batch's numpy arrays (data, nav index, seq_num, time), which Dask
serialises as out-of-band buffers (pickle protocol 5, no copy of the frames into a pickle stream).
No consumer object is pickled. A worker rebuilds the consumer the first time it sees the
description (``Consumer(params, RunInfo)``, ``start(doc)``, ``signal(info)`` for each accepted
signal, the same sequence as a checkpoint restore) and keeps it in a small per-process cache, then
runs ``stage(batch)``; the staged result (numpy arrays and lists) comes back to the daemon, where
:class:`~beamlens.daemon.runtable.RunTable` hands it to ``process`` in batch order on the router
thread, exactly as with the local pool. Order-dependent work (``process``: defect classification,
tracking) therefore never leaves the daemon, and the results equal the local executor's.

Back-pressure: at most ``batches_in_flight`` batches are on the cluster; :meth:`DaskStageExecutor.submit`
(on the router thread) waits for room, up to ``submit_timeout_s``, then fails the batch (counted as
the consumer's failed stage). A worker that dies while it holds batches: the scheduler re-runs them
elsewhere (its ``allowed-failures`` reruns, tasks are pure), and a batch the scheduler gives up on
(``KilledWorker``) or loses with a closed connection is sent again up to ``resubmits`` times. A
batch that is not back after ``submit_timeout_s`` fails (so the router never waits forever on a
cluster that is gone).

Trust: a Dask cluster executes what its clients send and unpickles their arguments and results;
the scheduler address is a trust boundary. Keep scheduler and workers on the receiver node's
private network, or use ``tls://`` with Dask's security configuration.

Source followed: Dask distributed's Futures API (``Client.submit``, ``Future.add_done_callback``,
``Client.cancel``), https://distributed.dask.org/en/stable/api.html.
"""
from __future__ import annotations

import importlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from beamlens.consumers.base import Batch, Consumer, RunInfo, SignalInfo

from .partials import Partial

log = logging.getLogger(__name__)

WORKER_CACHE = 8
"""Consumer instances a worker process keeps (runs x consumers); the oldest is dropped."""


@dataclass(frozen=True)
class ConsumerSpec:
    """What a worker needs to rebuild a consumer instance: no object, only its description.

    Attributes:
        token: unique per (run, consumer slot, accepted signals): the worker cache key.
        class_path: ``"module:QualName"`` of the consumer class.
        name: the consumer's configured name.
        params: the params as JSON-like data (``model_dump(mode="json")``).
        uid, nav_shape, start_doc: the run (:class:`~beamlens.consumers.base.RunInfo`).
        signals: the signals the consumer accepted, in the order they were offered.
    """

    token: str
    class_path: str
    name: str
    params: Mapping[str, Any]
    uid: str
    nav_shape: tuple[int, ...]
    start_doc: Mapping[str, Any]
    signals: tuple[SignalInfo, ...]


def consumer_spec(slot: Any) -> ConsumerSpec:
    """The :class:`ConsumerSpec` of a :class:`~beamlens.daemon.results.ConsumerSlot`."""
    consumer = slot.consumer
    cls = type(consumer)
    run = consumer.run
    signals = tuple(slot.signals)
    return ConsumerSpec(token=f"{run.uid}/{slot.name}/{id(consumer):x}/{len(signals)}",
                        class_path=f"{cls.__module__}:{cls.__qualname__}", name=slot.name,
                        params=consumer.params.model_dump(mode="json"), uid=run.uid,
                        nav_shape=tuple(run.nav_shape), start_doc=dict(run.start_doc), signals=signals)


_cache: OrderedDict[str, Consumer] = OrderedDict()
_cache_lock = threading.Lock()


def rebuild(spec: ConsumerSpec, nav_size: int = 0, skipped: Callable[[str, int], None] | None = None) -> Consumer:
    """A consumer instance from its description, as a checkpoint restore builds one: the class,
    ``Params.model_validate``, ``start(doc)``, then ``signal(info)`` for each accepted signal, its
    buffers allocated with ``nav_size`` nav rows (0 for a stage, which reads only what ``signal``
    set up; a partition's rows for :func:`run_partial`). ``skipped`` receives its skip reports.

    Raises:
        ImportError, AttributeError: the class is not importable on this worker.
        TypeError: the path does not name a :class:`~beamlens.consumers.base.Consumer`.
    """
    module, _, qualname = spec.class_path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Consumer)):
        raise TypeError(f"{spec.class_path} is not a beamlens consumer")
    consumer = obj(obj.Params.model_validate(spec.params),
                   RunInfo(uid=spec.uid, nav_shape=tuple(spec.nav_shape), start_doc=spec.start_doc,
                           **({"skipped": skipped} if skipped is not None else {})))
    consumer.name = spec.name
    consumer.start(spec.start_doc)
    for info in spec.signals:
        for buf in consumer.signal(info):
            consumer.buffers.bind(buf.name, buf.allocate(nav_size), buf)
    return consumer


def worker_consumer(spec: ConsumerSpec) -> Consumer:
    """This worker process's instance for ``spec`` (rebuilt on first use, kept in a small LRU)."""
    with _cache_lock:
        consumer = _cache.get(spec.token)
        if consumer is not None:
            _cache.move_to_end(spec.token)
            return consumer
        consumer = rebuild(spec)
        _cache[spec.token] = consumer
        while len(_cache) > WORKER_CACHE:
            _cache.popitem(last=False)
        return consumer


def run_stage(spec: ConsumerSpec, signal: SignalInfo, data: np.ndarray, nav_index: np.ndarray,
              seq_num: np.ndarray, times: np.ndarray) -> tuple[Any, float]:
    """The task a worker runs: ``stage`` of one batch. Returns (staged result, seconds it took)."""
    t0 = time.perf_counter()
    staged = worker_consumer(spec).stage(Batch(signal, data, nav_index, seq_num, times))
    return staged, time.perf_counter() - t0


def run_partial(spec: ConsumerSpec, signal: SignalInfo, data: np.ndarray, nav_index: np.ndarray,
                seq_num: np.ndarray, times: np.ndarray) -> tuple[Partial, float]:
    """The task a worker runs for a partitioned (mergeable) consumer: ``process`` of one batch by a
    fresh instance whose nav buffers hold only the batch's distinct points. Returns (its
    :class:`~beamlens.daemon.executors.Partial`, seconds it took)."""
    t0 = time.perf_counter()
    rows, local = np.unique(nav_index, return_inverse=True)
    skipped: dict[str, int] = {}

    def skip(reason: str, n: int) -> None:
        skipped[reason] = skipped.get(reason, 0) + int(n)

    consumer = rebuild(spec, len(rows), skip)
    ask = consumer.process(Batch(signal, data, local.astype(np.int64).reshape(-1), seq_num, times))
    partial = Partial(rows.astype(np.int64), dict(consumer.buffers), skipped, ask is True)
    return partial, time.perf_counter() - t0


LOST = ("KilledWorker", "CommClosedError", "FutureCancelledError")
"""Error types of a batch lost with its worker (sent again), by name (distributed's module paths move)."""


class DaskStageExecutor:
    """Runs ``stage`` jobs (:class:`~beamlens.daemon.pool.Job`) on a Dask distributed cluster.

    Args:
        config: an :class:`~beamlens.daemon.config.ExecutorConfig` with ``kind: dask``.

    Raises:
        OSError: the scheduler is not reachable within ``config.submit_timeout_s`` s.
    """

    def __init__(self, config: Any):
        from distributed import Client

        self.config = config
        self.limit = int(config.batches_in_flight)
        self.partitions = frozenset(config.partitions)
        self.timeout = float(config.submit_timeout_s)
        self.client = Client(config.scheduler, timeout=self.timeout, set_as_default=False)
        self._cond = threading.Condition()
        self._flight: dict[int, tuple[Any, Any, Callable[[Any], None], float, int]] = {}
        """id(job) -> (job, dask future, complete, submitted at (monotonic), attempt)."""
        self.resubmitted = 0
        """Batches sent again after their worker was lost."""
        self.sent = 0
        self._closed = False
        self._reaper = threading.Thread(target=self._reap, name="beamlens-dask-reaper", daemon=True)
        self._reaper.start()
        log.info("stages run on the Dask cluster at %s (%d batches in flight at most)", config.scheduler, self.limit)

    # -- the seam (router thread) -------------------------------------------------------------
    def submit(self, job: Any, complete: Callable[[Any], None]) -> None:
        """Send ``job`` (a ``stage`` job: ``args == (batch,)``) to the cluster once fewer than
        ``limit`` batches are in flight; ``complete(job)`` is called when its result or error is set."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while len(self._flight) >= self.limit and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if len(self._flight) >= self.limit or self._closed:
                job.error = TimeoutError(f"no room on the Dask cluster for {self.timeout:g} s"
                                         if not self._closed else "the Dask executor is closed")
                complete(job)
                return
            self._send(job, complete, 0)

    def cancel(self, job: Any) -> None:
        """Drop ``job`` (its run ended): the cluster forgets the task; its result is discarded."""
        with self._cond:
            entry = self._flight.pop(id(job), None)
            self._cond.notify_all()
        if entry is not None:
            entry[1].release()

    def close(self) -> None:
        """Fail what is in flight and disconnect from the scheduler (the cluster keeps running)."""
        with self._cond:
            self._closed = True
            entries = list(self._flight.values())
            self._flight.clear()
            self._cond.notify_all()
        for job, future, complete, _, _ in entries:
            future.release()
            job.cancelled = True
            complete(job)
        self.client.close()

    # -- internals ----------------------------------------------------------------------------
    def _send(self, job: Any, complete: Callable[[Any], None], attempt: int) -> None:
        """(holding ``_cond``) Submit one batch's stage task."""
        batch: Batch = job.args[0]
        task = run_partial if getattr(job, "partial", False) else run_stage
        try:
            future = self.client.submit(task, consumer_spec(job.slot), batch.signal, batch.data, batch.nav_index,
                                        batch.seq_num, batch.time, pure=False,
                                        key=f"beamlens-stage-{job.slot.name}-{uuid.uuid4().hex}")
        except Exception as exc:  # the client is closed, an argument does not serialise: this batch fails
            log.error("stage batch of %s not sent to the Dask cluster: %s", job.slot.name, exc)
            job.error = exc
            self._cond.notify_all()
            complete(job)
            return
        self._flight[id(job)] = (job, future, complete, time.monotonic(), attempt)
        self.sent += 1
        future.add_done_callback(lambda f, job=job: self._done(job, f))

    def _done(self, job: Any, future: Any) -> None:
        """A task finished (a client thread): set the job's result or error, or send it again."""
        with self._cond:
            entry = self._flight.get(id(job))
            if entry is None or entry[1] is not future:  # cancelled, timed out or resent meanwhile
                return
            _, _, complete, _, attempt = entry
            if future.status == "finished":
                try:
                    job.result, job.elapsed = future.result()
                except Exception as exc:  # result lost in transfer
                    job.error = exc
            else:
                exc = future.exception() if future.status == "error" else None
                lost = exc is None or type(exc).__name__ in LOST
                if lost and attempt < self.config.resubmits and not self._closed:
                    log.warning("stage batch of %s lost with its worker (%s); sending it again",
                                job.slot.name, type(exc).__name__ if exc else future.status)
                    self.resubmitted += 1
                    del self._flight[id(job)]
                    self._send(job, complete, attempt + 1)
                    future.release()
                    return
                job.error = exc if exc is not None else RuntimeError(f"stage task {future.status}")
            del self._flight[id(job)]
            self._cond.notify_all()
        future.release()
        complete(job)

    def _reap(self) -> None:
        """Fail batches that are not back after ``submit_timeout_s`` (the cluster is gone or stuck)."""
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                late = [e for e in self._flight.values() if now - e[3] > self.timeout]
                for job, *_ in late:
                    del self._flight[id(job)]
                if late:
                    self._cond.notify_all()
                self._cond.wait(1.0)
            for job, future, complete, _, _ in late:
                log.error("stage batch of %s not back from the Dask cluster after %g s", job.slot.name, self.timeout)
                future.release()
                job.error = TimeoutError(f"stage batch not back from the Dask cluster after {self.timeout:g} s")
                complete(job)
