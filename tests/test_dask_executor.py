"""The Dask executor (``executor: {kind: dask}``) with a real ``distributed.LocalCluster`` of worker
processes over TCP on 127.0.0.1: a defect movie (array-1.0 over real ZeroMQ) analysed with the
stages on 1 and 2 Dask workers gives the local executor's maps, counts and positions exactly, and a
worker process killed mid-run loses nothing."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from distributed import Client, LocalCluster

from beamlens.daemon.config import ConfigError, load_config
from beamlens.daemon.sim.microscope import SimulatedMicroscope
from frame_helpers import daemon_yaml, frame_source_yaml
from helpers import wait_for

N = 12
DEFECTS = ("counts", "total", "positions", "density_map", "diffusion", "diffusion_steps", "transition_matrix",
           "frame_defects")
STATS = ("total", "max", "mean")
_reference: dict[str, np.ndarray] = {}


def cluster(n_workers: int) -> LocalCluster:
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, protocol="tcp",
                        host="127.0.0.1", dashboard_address=None, worker_dashboard_address=None)


def run_movie(make_daemon, executor: str = "", during=None) -> dict[str, np.ndarray]:
    """Stream the movie into a fresh daemon; the maps of its run once it closed. ``during(daemon)``
    is called while the movie streams (the kill test)."""
    with SimulatedMicroscope(n_frames=N, rate_hz=None, seed=7) as scope:
        text = daemon_yaml([frame_source_yaml("stem", "array-1.0", scope.address)],
                           consumers="  - {name: defects, class: defects, params: {fit_after: 4}}\n"
                                     "  - {name: stats, class: stats}\n",
                           router="{series_quiet_s: 5.0}") + executor
        daemon = make_daemon(text)
        scope.start()
        if during is not None:
            during(daemon)
        scope.join(60)

        def closed() -> bool:
            runs = daemon.store.summaries()
            return bool(runs) and runs[0]["status"] not in ("open", "running", "finishing")
        wait_for(closed, timeout=180)
        (run,) = daemon.store.summaries()
        assert run["status"] == "success" and run["frames_done"] == N
        out = {f"defects.{b}": daemon.store.snapshot(run["uid"], "defects", b).data for b in DEFECTS}
        out.update({f"stats.{b}": daemon.store.snapshot(run["uid"], "stats", b).data for b in STATS})
        for name in ("defects", "stats"):
            assert not daemon.metrics.registry.get_sample_value("beamlens_consumer_failures_total", {"consumer": name})
            jobs = daemon.metrics.registry.get_sample_value("beamlens_consumer_jobs_total",
                                                            {"consumer": name, "method": "stage", "outcome": "ok"})
            # defects' stage always goes through the job path; stats only as partitions (executor dask)
            out[f"jobs.{name}"] = np.array([jobs or 0.0])
        daemon.stop()  # before the cluster goes: the daemon's client disconnects cleanly
        return out


def reference(make_daemon) -> dict[str, np.ndarray]:
    """The local executor's maps of the movie (computed once per session)."""
    if not _reference:
        _reference.update(run_movie(make_daemon))
        assert np.nansum(_reference["defects.total"]) > 0
    return _reference


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    assert want["jobs.stats"][0] == 0 and got["jobs.stats"][0] >= 1  # stats ran as partitions on the workers
    assert got["jobs.defects"][0] >= 1
    for name in want:
        if name.startswith("jobs."):
            continue
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def executor_yaml(address: str, in_flight: int = 4) -> str:
    return f"executor: {{kind: dask, scheduler: '{address}', batches_in_flight: {in_flight}, partitions: [stats]}}\n"


@pytest.mark.parametrize("n_workers", [1, 2])
def test_stages_on_dask_workers_equal_the_local_executor(make_daemon, n_workers):
    want = reference(make_daemon)
    with cluster(n_workers) as c, Client(c, set_as_default=False) as client:
        got = run_movie(make_daemon, executor_yaml(c.scheduler_address))
        # the stages ran on the workers: each worker that took a batch rebuilt the consumer there
        rebuilt = client.run(lambda: len(__import__("beamlens.daemon.executors.dask", fromlist=["_cache"])._cache))
        assert sum(rebuilt.values()) >= 1
    assert_same(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("allowed_failures", [None, 0])
def test_a_killed_worker_process_loses_nothing(make_daemon, allowed_failures):
    """``None``: the scheduler's default reruns take the lost batch; ``0``: the scheduler gives up
    at once (``KilledWorker``) and the executor sends the batch again itself."""
    import dask

    want = reference(make_daemon)
    killed: list[int] = []
    executors: list = []
    settings = {} if allowed_failures is None else {"distributed.scheduler.allowed-failures": allowed_failures}
    with dask.config.set(settings), cluster(2) as c, Client(c, set_as_default=False) as client:
        pids = client.run(os.getpid)

        def kill_a_busy_worker(daemon) -> None:
            executors.append(daemon.router.table.pool.stage_executor)

            def busy() -> bool:
                for addr, keys in client.processing().items():
                    if any(str(k).startswith("beamlens-stage-") for k in keys) and addr in pids:
                        os.kill(pids[addr], signal.SIGKILL)
                        killed.append(pids[addr])
                        return True
                return False
            wait_for(busy, timeout=60, interval=0.005)

        got = run_movie(make_daemon, executor_yaml(c.scheduler_address, in_flight=2), during=kill_a_busy_worker)
        assert killed and killed[0] not in client.run(os.getpid).values()  # the nanny started a new worker
    if allowed_failures == 0:
        assert executors[0].resubmitted >= 1
    assert_same(got, want)


def test_bad_executor_config_fails_with_its_path():
    with pytest.raises(ConfigError) as err:
        load_config(text="executor: {kind: dask}\n", environ={})
    assert "executor" in str(err.value) and "scheduler" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(text="executor: {kind: dask, scheduler: 'http://127.0.0.1:1'}\n", environ={})
    assert "executor.scheduler" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(text="executor: {kind: dask, scheduler: 'tcp://127.0.0.1:1', batches_in_flight: 0}\n", environ={})
    assert "executor.batches_in_flight" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(text="executor: {kind: dask, scheduler: 'tcp://127.0.0.1:1', partitions: [nope]}\n", environ={})
    assert "executor.partitions" in str(err.value) and "nope" in str(err.value)
    assert load_config(text="", environ={}).executor.kind == "local"


def test_per_batch_partitions_fold_into_the_sequential_result():
    """What a worker runs for a partitioned consumer (``run_partial``: a fresh instance with the
    batch's rows) folded by the daemon's ``merge_partial`` in shuffled order gives the sequential
    result exactly: stats on spectra normalised by an I0 event field, with NaN spectra skipped."""
    from beamlens.consumers.stats import StatsConsumer
    from beamlens.daemon.executors import merge_partial
    from beamlens.daemon.executors.dask import ConsumerSpec, run_partial
    from partitions import assert_buffers_equal, event_signal, make_batches, new_instance, run_sequential

    rng = np.random.default_rng(3)
    n = 40
    spectra = rng.random((n, 16))
    spectra[[5, 17]] = np.nan
    i0 = rng.random(n) + 0.5
    sig, mon = event_signal("spectrum", (16,)), event_signal("I0")
    order = rng.permutation(n)  # points arrive out of nav order, some batches mix both signals' points
    batches = make_batches(sig, spectra[order], order, batch_size=6) + make_batches(mon, i0[order], order, batch_size=9)
    params = {"normalize_by": "I0"}
    skips: dict[str, int] = {}
    want = run_sequential(StatsConsumer, params, [sig, mon], batches, n)

    got, accepted = new_instance(StatsConsumer, params, [sig, mon], n)
    got.run.skipped = lambda reason, k: skips.__setitem__(reason, skips.get(reason, 0) + k)
    spec = ConsumerSpec(token="t", class_path="beamlens.consumers.stats:StatsConsumer", name="stats",
                        params=got.params.model_dump(mode="json"), uid="run", nav_shape=(n,),
                        start_doc={"uid": "run", "time": 0.0, "num_points": n}, signals=tuple(accepted))
    for i in rng.permutation(len(batches)):
        b = batches[i]
        partial, seconds = run_partial(spec, b.signal, b.data, b.nav_index, b.seq_num, b.time)
        assert seconds >= 0 and len(partial.rows) == len(set(b.nav_index.tolist()))
        if merge_partial(got, partial):
            got.results()
    got.finish()
    got.results()
    assert_buffers_equal(want, got, label="per-batch partitions")
    assert skips == {"nonfinite": 2}
