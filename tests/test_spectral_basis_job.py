"""The embedding's PCA statistics are updated in its basis job, off the event path: the job's
update equals the one the daemon thread would make, bit for bit; a job whose snapshot went stale
(a point re-measured while it ran) installs its basis but not its statistics, and the run's PCA
still ends exact."""
from __future__ import annotations

import numpy as np
import pytest
from partitions import feed, make_batches, new_instance
from sklearn.decomposition import PCA

from beamlens.consumers.base import Buffers
from beamlens.consumers.embedding import EmbeddingConsumer
from beamlens.consumers.pca import PCAConsumer
from beamlens.daemon.results import ConsumerSlot
from beamlens.consumers.spectral.incremental import add_rows, basis_update, catch_up, moment_specs, snapshot
from beamlens.daemon.sim.datasets import reaction_path_map

from spectral_drive import event_signals, map_descriptor


def test_basis_update_equals_catch_up_bit_for_bit():
    rng = np.random.default_rng(3)
    spectra = rng.random((40, 12))
    spectra[[5, 17]] = np.nan  # points not measured yet
    b = Buffers.allocate(moment_specs("pca", 12), 40)
    first = np.flatnonzero(np.isfinite(spectra[:20]).all(axis=1))  # the first half already in the statistics
    add_rows(b, "pca", spectra[first])
    b.pca_added[:] = 0
    b.pca_added[first] = 1
    pending = np.flatnonzero((b.pca_added == 0) & np.isfinite(spectra).all(axis=1))
    n, mean, scatter, basis = basis_update(*snapshot(b, "pca"), spectra[pending], 3)
    catch_up(b, "pca", spectra)
    assert n == b.pca_n[0] == 38
    np.testing.assert_array_equal(mean, b.pca_mean)
    np.testing.assert_array_equal(scatter, b.pca_scatter)
    assert basis is not None and basis[1].shape == (3, 12)


def _run():
    data = reaction_path_map(seed=2)
    ny, nx = data.shape
    n = ny * nx
    _, desc = map_descriptor(len(data.energy), data.energy, (ny, nx))
    signals = event_signals(desc)
    flat = data.spectra.reshape(n, -1).astype(np.float64)
    return signals, flat, n


def test_a_stale_basis_job_leaves_the_statistics_and_results_stay_exact():
    signals, flat, n = _run()
    c, acc = new_instance(EmbeddingConsumer, {"batch_size": 32, "final_refit": False}, signals, n)
    jobs = []
    c.run.submit = lambda job, *args, then=None: jobs.append((job, args, then))
    feed(c, make_batches(signals[0], flat[:40], np.arange(40), 1), acc)
    basis_jobs = [j for j in jobs if j[0].__name__ == "basis_update"]
    assert len(basis_jobs) == 1
    job, args, then = basis_jobs[0]
    pending = int(np.sum(c.buffers.pca_added[:40] != 1))  # not in the statistics (the job's included)
    # point 1 re-measured while the job runs: its snapshot holds the old spectrum
    feed(c, make_batches(signals[0], flat[100:101], np.array([1]), 1), acc)
    then(job(*args))
    assert np.isfinite(c.buffers.pca_components).all()  # the basis is published
    assert int(np.sum(c.buffers.pca_added[:40] == 0)) == pending  # its statistics were not installed: all pending
    # a fresh job with nothing changed meanwhile installs them
    jobs.clear()
    c._submit_basis()
    job, args, then = jobs[0]
    then(job(*args))
    assert int(np.sum(c.buffers.pca_added[:40] == 0)) == 0 and c.buffers.pca_n[0] == 40
    c.results()
    x = flat[:40].copy()
    x[1] = flat[100]
    ref = PCA(3).fit(x)
    got = c.buffers.pca_components
    np.testing.assert_allclose(np.abs(got @ ref.components_.T), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(c.buffers.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-9)


@pytest.mark.parametrize("cls", [PCAConsumer, EmbeddingConsumer])
@pytest.mark.parametrize("growth", [0.0, 0.25])
def test_basis_updates_wait_for_update_growth_and_the_run_still_ends_exact(cls, growth):
    """One spectrum per batch: a basis update is submitted each time the count passes a multiple of
    ``batch_size`` and, with ``update_growth``, only once the count has grown by that fraction since
    the last one (re-scoring every point costs O(points) on the router thread). Whatever the
    schedule, the run ends on the exact PCA of every spectrum."""
    signals, flat, n = _run()
    params = {"batch_size": 16, "update_growth": growth, "n_components": 3}
    if cls is EmbeddingConsumer:
        params |= {"final_refit": False, "refit_in_process": False}
    c, acc = new_instance(cls, params, signals, n)
    at: list[int] = []

    def submit(job, *args, then=None):
        if job.__name__ in ("basis_of", "basis_update"):
            at.append(int(c.buffers.n_points[0]))
        result = job(*args)
        if then is not None:
            then(result)

    c.run.submit = submit
    feed(c, make_batches(signals[0], flat, np.arange(n), 1), acc)
    assert at[0] == 2 and all(m % 16 == 0 for m in at[1:]), at
    steps = np.diff(at[1:])
    if growth == 0:
        assert (steps == 16).all(), at
    else:
        assert all(b >= a * (1 + growth) for a, b in zip(at[1:], at[2:])), at
        assert len(at) < 1 + n // 16 // 2, at  # geometric, not one per batch
    c.results()
    ref = PCA(3).fit(flat)
    comps = c.buffers.pca_components if cls is EmbeddingConsumer else c.buffers.components
    np.testing.assert_allclose(np.abs(comps @ ref.components_.T), np.eye(3), atol=1e-8)
    np.testing.assert_allclose(c.buffers.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-8)


def test_a_window_rolled_on_while_a_basis_job_runs_keeps_each_spectrum_in_the_statistics_once():
    """A run of unknown length at its point limit rolls its nav buffers on in place
    (``ConsumerSlot.roll_nav``) between points, possibly while a basis job runs: the points that
    job adds are marked in the ``pca_added`` nav buffer, so the marks move with them, and each
    spectrum enters the statistics exactly once (before, the job's point indices went stale: the
    moved points were added a second time and empty rows were marked added)."""
    signals, flat, n = _run()
    c, acc = new_instance(EmbeddingConsumer, {"batch_size": 16, "update_growth": 0.0, "final_refit": False,
                                              "min_points": 1000, "max_fit_points": 1000}, signals, 48)
    jobs = []
    c.run.submit = lambda job, *args, then=None: jobs.append((job, args, then))
    feed(c, make_batches(signals[0], flat[:16], np.arange(16), 1), acc)
    for job, args, then in jobs:  # the updates up to 16 points, installed
        then(job(*args))
    jobs.clear()
    feed(c, make_batches(signals[0], flat[16:32], np.arange(16, 32), 1), acc)
    (job, args, then), = jobs  # adds points 16..31; not run yet
    ConsumerSlot("emb", c).roll_nav(8)  # the oldest 8 points leave the window; 16..31 move to 8..23
    then(job(*args))
    added = c.buffers.pca_added
    assert set(np.unique(added)) <= {0, 1}
    np.testing.assert_array_equal(added[:24], 1)  # every point in the window is in the statistics
    c.results()
    assert c.buffers.pca_n[0] == 32  # each spectrum once, the 8 rolled out included
    ref = PCA(3).fit(flat[:32])
    np.testing.assert_allclose(np.abs(c.buffers.pca_components @ ref.components_.T), np.eye(3), atol=1e-8)
