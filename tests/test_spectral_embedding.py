"""The ``embedding`` consumer: IncrementalPCA vs batch PCA, the mLLE progress map on a curved
reaction path, sign reproducibility, background refits and the off-manifold trigger."""
from __future__ import annotations

import multiprocessing
import os
import threading

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.decomposition import PCA
from sklearn.manifold import LocallyLinearEmbedding

import beamlens.consumers.embedding as embedding_module
from beamlens.consumers.spectral.consumer import edge_position
from beamlens.consumers.spectral.manifold import barycenter_weights, fit_manifold, transform
from beamlens.consumers.spectral.mapping import map_spectra
from beamlens.daemon.sim.datasets import corroding_steel_map, reaction_path_map

from partitions import feed, make_batches, new_instance
from spectral_drive import event_signals, map_descriptor
from spectral_replay import replay


def embedding_yaml(**params: object) -> str:
    body = ", ".join(f"{k}: {v}" for k, v in params.items())
    return "consumers:\n  - {name: emb, class: embedding, params: {" + body + "}}\n"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_progress_map_orders_a_curved_four_phase_path(seed):
    data = reaction_path_map(seed=seed)
    r = replay(embedding_yaml(), data)
    progress = r.get("emb", "progress")
    rho = spearmanr(progress.ravel(), data.progress.ravel())[0]
    assert rho >= 0.95, rho  # signed: progress increases from metal to goethite, for every seed
    assert progress.min() >= -0.05 and progress.max() <= 1.05


def test_progress_sign_does_not_depend_on_acquisition_order():
    data = reaction_path_map(seed=1)
    order = np.random.default_rng(7).permutation(data.shape[0] * data.shape[1])
    a = replay(embedding_yaml(), data).get("emb", "progress").ravel()
    b = replay(embedding_yaml(), data, order=order).get("emb", "progress").ravel()
    assert spearmanr(a, b)[0] >= 0.99


def test_incremental_pca_matches_batch_pca():
    data = corroding_steel_map(seed=0)
    r = replay(embedding_yaml(n_components=3, batch_size=32), data)
    x = data.spectra.reshape(-1, len(data.energy)).astype(np.float64)
    batch = PCA(3).fit(x)
    np.testing.assert_allclose(r.get("emb", "explained_variance_ratio"), batch.explained_variance_ratio_, atol=1e-3)
    comps = r.get("emb", "pca_components")
    cos = np.abs(np.sum(comps * batch.components_, axis=1))
    # three phases summing to one span two centred dimensions; the third component is noise
    assert cos[:2].min() >= 0.999, cos
    score = r.get("emb", "score_1").ravel()
    ref = (x - batch.mean_) @ batch.components_[0]
    assert abs(np.corrcoef(score, ref)[0, 1]) >= 0.9999


def test_mlle_fits_run_off_the_router_thread_when_threaded(monkeypatch):
    threads: list[str] = []
    real = embedding_module.embed

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(embedding_module, "embed", recording)
    r = replay(embedding_yaml(final_refit="false", refit_in_process="false"), reaction_path_map(seed=2))
    # on the daemon's job pool, never on the router thread
    assert threads and all(name.startswith("beamlens-pool") for name in threads), threads
    assert int(r.get("emb", "embedding_fits")[0]) >= 1
    assert np.isfinite(r.get("emb", "progress")).all()  # every point mapped, in sample or out of sample


def test_in_worker_does_the_callers_other_work_while_the_worker_computes():
    """``meanwhile`` (the fit job loads the compiled mapping kernel there) runs on the calling
    thread after the worker got the call, and the worker's result still comes back."""
    calls: list[int] = []
    pid = embedding_module.in_worker(os.getpid, meanwhile=lambda: calls.append(threading.get_ident()))
    assert pid != os.getpid() and calls == [threading.get_ident()]


def test_mlle_refits_run_in_a_worker_process_that_ends_with_its_job(monkeypatch):
    """With ``refit_in_process`` each pool job computes its fit in a worker process of its own
    (another pid), and that process is gone when the job has returned: none outlives the run."""
    pids: list[int] = []
    real = embedding_module.in_worker

    def recording(fn, *args, **kwargs):
        pids.append(real(os.getpid))  # the worker this job would use: a process other than ours
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(embedding_module, "in_worker", recording)
    data = reaction_path_map(seed=2)
    r = replay(embedding_yaml(final_refit="false"), data, settle_after=120)
    assert pids and os.getpid() not in pids
    assert not {p.pid for p in multiprocessing.active_children()} & set(pids)
    assert int(r.get("emb", "embedding_fits")[0]) >= 1
    assert np.isfinite(r.get("emb", "progress")).all()


def test_thread_and_process_refits_give_the_same_maps():
    data = reaction_path_map(seed=1)
    maps = [replay(embedding_yaml(refit_in_process=flag), data).get("emb", "progress") for flag in ("true", "false")]
    np.testing.assert_allclose(maps[0], maps[1], rtol=1e-10, atol=1e-12)


def test_a_new_phase_lies_off_the_manifold():
    data = reaction_path_map(seed=3)
    x = data.spectra.reshape(-1, len(data.energy)).astype(np.float64)
    t = data.progress.ravel()
    edge = edge_position(x, data.energy, False)
    early, known, new = t < 0.5, (t >= 0.4) & (t < 0.5), t > 0.9  # goethite only in the last
    model = fit_manifold(x[early], edge[early])
    _, ratio_known = transform(model, x[known])
    _, ratio_new = transform(model, x[new])
    assert np.median(ratio_known) < 2.0
    assert np.median(ratio_new) > 3.0  # the default refit_residual_ratio


def test_off_manifold_points_trigger_a_refit():
    """Points arrive in order of progress, so goethite appears only at the end. Growth refits are
    switched off (refit_growth 100): any refit after the first comes from the off-manifold trigger."""
    data = reaction_path_map(seed=3)
    order = np.argsort(data.progress.ravel(), kind="stable")
    # the first fit is made on the first 150 points and is in place before the rest arrive
    r = replay(embedding_yaml(refit_growth=100, final_refit="false", min_points=120), data, order=order,
               settle_after=150, page_size=16)
    assert int(r.get("emb", "embedding_fits")[0]) >= 2
    gauge = r.metrics.registry.get_sample_value("beamlens_embedding_residual_ratio", {"consumer": "emb", "index": "0"})
    assert gauge == float(r.get("emb", "embedding_residual")[0])
    rho = spearmanr(r.get("emb", "progress").ravel(), data.progress.ravel())[0]
    assert rho >= 0.9, rho


def test_out_of_sample_weights_reproduce_scikit_learn_transform():
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 3, 300)
    z = np.c_[np.cos(t), np.sin(t), 0.3 * t] + rng.normal(0, 0.01, (300, 3))
    lle = LocallyLinearEmbedding(n_neighbors=10, n_components=2, method="modified", eigen_solver="dense").fit(z[:250])
    idx = lle.nbrs_.kneighbors(z[250:], 10, return_distance=False)
    w = barycenter_weights(z[250:], z[:250][idx], lle.reg)
    np.testing.assert_allclose(np.einsum("nk,nkd->nd", w, lle.embedding_[idx]), lle.transform(z[250:]), atol=1e-12)


def test_one_spectrum_path_equals_the_batched_mapping():
    """The event path maps one spectrum at a time (the compiled kernel: exhaustive neighbour
    scan, Cholesky solve of the local Gram system); a page goes through the batched path (k-d
    tree, ``numpy.linalg.solve``). Both give the same coordinates and off-manifold ratios, for
    spectra on and off the fitted manifold, and for an exact duplicate of a fitted spectrum (its
    local Gram matrix is singular but for the regularisation)."""
    data = corroding_steel_map(seed=0)
    x = data.spectra.reshape(-1, len(data.energy)).astype(np.float64)
    model = fit_manifold(x[:300], np.arange(300.0))
    new = np.vstack([x[300:], x[:5], x[300:310] * 3.0 + 0.5])
    y_page, ratio_page = transform(model, new)
    for i, spectrum in enumerate(new):
        y_one, ratio_one = map_spectra(model, spectrum[None])
        np.testing.assert_allclose(y_one[0], y_page[i], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ratio_one[0], ratio_page[i], rtol=1e-9, atol=1e-12)


def test_a_scan_that_outruns_its_first_fit_is_checked_against_it_at_install():
    """The first fit is submitted at ``min_points`` and returns after the scan has gone on (here:
    after every point): installing it maps the spectra stored since out of sample, and their
    median off-manifold ratio becomes ``embedding_residual`` (the gauge operators watch), so a
    new phase that arrived while the fit ran still triggers the next refit."""
    data = reaction_path_map(seed=3)
    order = np.argsort(data.progress.ravel(), kind="stable")  # goethite only at the end
    x = data.spectra.reshape(-1, len(data.energy)).astype(np.float64)[order]
    n = len(x)
    _, desc = map_descriptor(len(data.energy), data.energy, data.shape)
    signals = event_signals(desc)
    first = n // 2  # the fit's snapshot ends half way along the path
    params = {"min_points": first, "final_refit": False, "refit_in_process": False, "refit_residual_ratio": 2.0}
    c, acc = new_instance(embedding_module.EmbeddingConsumer, params, signals, n)
    jobs = []
    c.run.submit = lambda job, *args, then=None: jobs.append((job, args, then))
    feed(c, make_batches(signals[0], x, np.arange(n), 1), acc)
    assert np.isnan(c.buffers.embedding_residual[0])  # nothing mapped yet: no fit installed
    fits = [j for j in jobs if j[0] is embedding_module.fit_job]
    assert len(fits) == 1
    job, args, then = fits[0]
    jobs.clear()
    then(job(*args))
    newest = np.arange(first, n)
    assert c.buffers.embedding_residual[0] == np.median(c.buffers.manifold_residual[newest])
    assert c.buffers.embedding_residual[0] > 2.0  # the later phases lie off the early ones' manifold
    feed(c, make_batches(signals[0], x[-1:], np.array([n - 1]), 1), acc)  # the next point sees it
    assert [j for j in jobs if j[0] is embedding_module.fit_job]
