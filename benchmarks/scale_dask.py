"""Benchmark: frames/s of the ``defects`` stage (network inference + blob finding + patches) on the
daemon's local pool against the Dask executor with 1 and 2 worker processes (a real
``distributed.LocalCluster`` over TCP on 127.0.0.1), measured side by side in one run, and the
per-batch overhead of the Dask path (one batch in flight at a time, Dask minus local, ms).

The stages go through the daemon's own seam (:class:`~beamlens.daemon.pool.JobPool` with or
without :class:`~beamlens.daemon.executors.dask.DaskStageExecutor`), with the same consumer, ONNX
threads (``--threads``, per worker), frames and batch size; each figure is the fastest of
``--rounds`` alternating rounds (local 1, local 2, Dask 1, Dask 2 in turn, so load changes hit all alike), the model load (per worker, on its first batch) excluded by a warm-up round.
On a 2-core machine shared with the daemon, two Dask workers cannot beat the local pool: the figures
measure the overhead (serialisation, scheduler round trip) that the projection in
docs/scaling_dask.md uses.

Prints one JSON line per figure::

    python benchmarks/scale_dask.py --frames 48 --batch 4 --size 256 --threads 1
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

from beamlens.consumers.base import Batch, Buffers, RunInfo, SeriesInfo, SignalInfo
from beamlens.consumers.defects import DefectsConsumer
from beamlens.daemon.config import ExecutorConfig
from beamlens.daemon.pool import Job, JobPool
from beamlens.daemon.results import ConsumerSlot
from beamlens.models.stem_sim import DynamicsParams, LatticeParams, Movie, MovieParams


def emit(figure: str, value: float, unit: str, target: str | None = None) -> None:
    print(json.dumps({"benchmark": "scale_dask", "figure": figure, "value": round(float(value), 4), "unit": unit,
                      "target": target}), flush=True)


def setup(n: int, size: int, batch: int, threads: int) -> tuple[ConsumerSlot, list[Batch]]:
    """A defects consumer that took a simulated movie's frame signal, and the movie's batches."""
    params = MovieParams(lattice=LatticeParams(shape=(size, size)), dynamics=DynamicsParams(n_defects=max(4, 12 * size * size // 256**2)))
    frames = np.stack([img for img, _ in Movie(params, seed=7).frames(n)])
    consumer = DefectsConsumer(DefectsConsumer.Params(threads=threads, providers=["CPUExecutionProvider"]),
                               RunInfo(uid="bench", nav_shape=(n,), start_doc={}))
    series = SeriesInfo(source="bench", series_id="1", sig_shape=frames.shape[1:], dtype=str(frames.dtype),
                        n_frames=n, meta={"frame_time_s": 0.5})
    info = SignalInfo("bench", "frame", frames.shape[1:], str(frames.dtype), "counts", series=series)
    consumer.buffers = Buffers.allocate(consumer.signal(info), n)
    slot = ConsumerSlot(name="defects", consumer=consumer, signals=[info])
    batches = [Batch(info, frames[a:a + batch], np.arange(a, min(a + batch, n)), np.arange(a, min(a + batch, n)) + 1,
                     np.zeros(len(frames[a:a + batch]))) for a in range(0, n, batch)]
    return slot, batches


def stage_all(pool: JobPool, slot: ConsumerSlot, batches: list[Batch], in_flight: int) -> float:
    """Seconds to stage every batch with at most ``in_flight`` batches out, results taken in order
    (as the run table does); raises if a stage failed."""
    t0 = time.perf_counter()
    pending: list[Job] = []
    for b in batches:
        while len(pending) >= in_flight:
            pending[0].future.result()
            pending.pop(0)
        pending.append(pool.submit(Job("bench", slot, "stage", slot.consumer.stage, (b,))))
    for job in pending:
        job.future.result()
    elapsed = time.perf_counter() - t0
    for job in pool.done():
        if job.error is not None:
            raise job.error
    return elapsed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="ONNX threads per stage (per worker)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from distributed import LocalCluster

    slot, batches = setup(args.frames, args.size, args.batch, args.threads)
    one = batches[:1] * 8  # one-frame-batch round trips for the overhead: the same batch 8 times
    one = [Batch(b.signal, b.data[:1], b.nav_index[:1], b.seq_num[:1], b.time[:1]) for b in one]
    n = args.frames
    from beamlens.daemon.executors.dask import DaskStageExecutor

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None, worker_dashboard_address=None) as c1, \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, protocol="tcp", host="127.0.0.1",
                         dashboard_address=None, worker_dashboard_address=None) as c2:
        pools = {("local", 1): JobPool(1), ("local", 2): JobPool(2), ("dask", 1): JobPool(1), ("dask", 2): JobPool(1)}
        for workers, c in ((1, c1), (2, c2)):
            pools["dask", workers].stage_executor = DaskStageExecutor(
                ExecutorConfig(kind="dask", scheduler=c.scheduler_address, batches_in_flight=2 * workers))
        for (_, workers), pool in pools.items():  # warm-up: model load on each worker
            stage_all(pool, slot, batches[:2 * workers], 2 * workers)
        times: dict[tuple[str, int], float] = {}
        serial: dict[str, float] = {}
        for _ in range(args.rounds):  # alternating rounds, the fastest of each: load changes hit all alike
            for (kind, workers), pool in pools.items():
                t = stage_all(pool, slot, batches, 2 * workers)
                times[kind, workers] = min(t, times.get((kind, workers), t))
                if workers == 1:
                    t = stage_all(pool, slot, one, 1)
                    serial[kind] = min(t, serial.get(kind, t))
        for pool in pools.values():
            pool.shutdown(wait=True)
    local = {w: times["local", w] for w in (1, 2)}
    dask = {w: times["dask", w] for w in (1, 2)}
    local_serial, dask_serial = serial["local"], serial["dask"]
    emit("local_1_thread_frames_per_s", n / local[1], "frames/s")
    emit("local_2_threads_frames_per_s", n / local[2], "frames/s")
    emit("dask_1_worker_frames_per_s", n / dask[1], "frames/s")
    emit("dask_2_workers_frames_per_s", n / dask[2], "frames/s")
    emit("dask_1_worker_vs_local_1_thread", local[1] / dask[1], "ratio")
    emit("dask_2_workers_vs_local_2_threads", local[2] / dask[2], "ratio")
    emit("dask_2_workers_vs_dask_1_worker", dask[1] / dask[2], "ratio")
    emit("dask_per_batch_overhead", 1000 * (dask_serial - local_serial) / len(one), "ms")
    emit("local_one_frame_batch_latency", 1000 * local_serial / len(one), "ms")


if __name__ == "__main__":
    main()
