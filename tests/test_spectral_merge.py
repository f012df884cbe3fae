"""pca, embedding and unmixing on the new consumer contract: the same run split into k partitions
(k = 1, 2, 3, 7, uneven, interleaved; merged in shuffled order), each part processed by a fresh
instance and merged, equals the sequential result; a checkpoint-level round trip (buffers -> fresh
instance, same ``signal()`` calls, arrays bound, ``results()``) gives the same maps, and a run
resumed from it mid-way ends as the uninterrupted one; frame signals are taken where a spectrum or
an image per frame makes sense."""
from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
from partitions import (assert_buffers_equal, checkpoint_round_trip, feed, frame_signal, make_batches, new_instance,
                        published, run_partitions)
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import PCA

from beamlens.consumers.base import Batch, NotApplicable, SeriesInfo, SignalInfo
from beamlens.consumers.embedding import EmbeddingConsumer
from beamlens.consumers.pca import PCAConsumer
from beamlens.consumers.spectral.background import in_worker
from beamlens.consumers.spectral.nmf import cosine, derivative_cosines
from beamlens.consumers.unmixing import UnmixingConsumer
from beamlens.daemon.sim.datasets import STEEL_PHASES, SpectralMap, corroding_steel_map, reaction_path_map

from spectral_drive import event_signals, map_descriptor


def map_run(data: SpectralMap, batch_size: int = 16, seed: int | None = 0):
    """``(signals, batches, nav_size)`` of a map run: the descriptor's signals (the energy axis in
    its configuration), batches of ``batch_size`` points in a shuffled acquisition order."""
    ny, nx = data.shape
    n = ny * nx
    _, desc = map_descriptor(len(data.energy), data.energy, (ny, nx))
    signals = event_signals(desc)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    flat = data.spectra.reshape(n, -1).astype(np.float64)
    return signals, make_batches(signals[0], flat[order], order, batch_size), n


def restored(c, cls, params, signals, nav_size):
    """A checkpoint-level restore of ``c``: a fresh instance, the same ``signal()`` calls, layouts
    checked, copies of every buffer bound, ``results()``."""
    fresh, _ = new_instance(cls, params, signals, nav_size)
    assert {n: s.layout() for n, s in fresh.buffers.specs.items()} == {n: s.layout() for n, s in c.buffers.specs.items()}
    for name, array in c.buffers.items():
        fresh.buffers.bind(name, array.copy(), fresh.buffers.specs[name])
    fresh.results()
    return fresh


@pytest.fixture(scope="module")
def steel():
    return corroding_steel_map(seed=0)


# -- pca ------------------------------------------------------------------------------------------
PCA_PARAMS = {"n_components": 3, "batch_size": 32}


def test_pca_partitions_equal_sequential_and_batch_pca(steel):
    signals, batches, n = map_run(steel)
    seq, merged = run_partitions(PCAConsumer, PCA_PARAMS, signals, batches, n)
    x = steel.spectra.reshape(n, -1).astype(np.float64)
    batch = PCA(3).fit(x)
    np.testing.assert_allclose(seq.buffers.explained_variance_ratio, batch.explained_variance_ratio_, rtol=1e-9)
    np.testing.assert_allclose(np.abs(np.sum(seq.buffers.components * batch.components_, axis=1)), 1.0, atol=1e-9)
    assert seq.buffers.specs["points"].private and seq.buffers.specs["pca_scatter"].private
    assert set(merged) >= {"k=1", "k=2", "k=3", "k=7", "uneven", "interleaved"}
    for label, m in merged.items():  # exact statistics: equal to rounding
        assert_buffers_equal(seq, m, label=label, rtol=1e-9, atol=1e-9 * np.abs(x).max())


def test_pca_takes_detector_frames_flattened_and_a_region_of_interest():
    rng = np.random.default_rng(4)
    n = 90
    basis = rng.normal(size=(2, 20, 16))
    frames = np.clip(1000 + 100 * np.einsum("nk,kij->nij", rng.normal(size=(n, 2)), basis)
                     + rng.normal(0, 3, (n, 20, 16)), 0, None).astype(np.uint16)
    sig = frame_signal("eiger", (20, 16), "uint16", n_frames=n)
    order = rng.permutation(n)
    batches = make_batches(sig, frames[order], order, batch_size=7)
    seq, merged = run_partitions(PCAConsumer, {"n_components": 2, "signal": "frame"}, [sig], batches, n)
    x = frames.reshape(n, -1).astype(np.float64)
    ref = PCA(2).fit(x)
    for i in range(2):
        assert abs(np.corrcoef(seq.buffers[f"score_{i + 1}"], ref.transform(x)[:, i])[0, 1]) > 1 - 1e-9
    assert seq.buffers.components.shape == (2, 320) and seq.buffers.specs["score_1"].units == "counts"
    for label, m in merged.items():
        assert_buffers_equal(seq, m, label=label, rtol=1e-9, atol=1e-6)
    roi = run_partitions(PCAConsumer, {"n_components": 2, "roi": (5, 15, 0, 8)}, [sig], batches, n, ks=())[0]
    xr = frames[:, 5:15, 0:8].reshape(n, -1).astype(np.float64)
    np.testing.assert_allclose(roi.buffers.explained_variance_ratio, PCA(2).fit(xr).explained_variance_ratio_, rtol=1e-9)
    c, _ = new_instance(PCAConsumer, {}, [], n)
    with pytest.raises(NotApplicable, match="set roi"):
        c.signal(frame_signal("big", (512, 512)))


# -- embedding ------------------------------------------------------------------------------------
EMB_PARAMS = {"refit_in_process": False, "batch_size": 32}


def test_embedding_partitions_equal_sequential_after_the_final_fit():
    """The mergeable parts (spectra, PCA statistics) merge exactly; the final mLLE fit is made on
    the merged spectra in nav order, so the merged progress map equals the sequential one."""
    data = reaction_path_map(seed=1)
    signals, batches, n = map_run(data)
    seq, merged = run_partitions(EmbeddingConsumer, EMB_PARAMS, signals, batches, n)
    assert np.isfinite(seq.buffers.progress).all() and int(seq.buffers.embedding_fits[0]) >= 2
    derived = [name for name in published(seq) if name not in ("embedding_fits", "embedding_residual")]
    for label, m in merged.items():
        assert_buffers_equal(seq, m, label=label, names=derived, rtol=1e-9, atol=1e-9)
        assert_buffers_equal(seq, m, label=label, names=["spectra", "pca_n"])


def test_embedding_live_merge_keeps_a_map_and_exact_pca():
    """Before the final fit: the PCA part of a merge is exact, and the merged instance maps every
    point into the embedding of its largest part."""
    data = reaction_path_map(seed=2)
    signals, batches, n = map_run(data)
    seq, merged = run_partitions(EmbeddingConsumer, EMB_PARAMS, signals, batches, n, ks=(2, 3), finish=False)
    for label, m in merged.items():
        assert_buffers_equal(seq, m, label=label, names=["pca_components", "explained_variance_ratio", "score_1"],
                             rtol=1e-9, atol=1e-9)
        assert np.isfinite(m.buffers.progress).all(), label


def test_refits_are_jobs_and_a_worker_process_ends_with_its_job():
    """Fits go through ``run.submit`` (deferred here, as on the daemon's pool: the event path never
    fits); with ``refit_in_process`` the job computes in a worker process that is gone when the
    job returns."""
    data = reaction_path_map(seed=2)
    signals, batches, n = map_run(data)
    c, acc = new_instance(EmbeddingConsumer, {"batch_size": 32}, signals, n)
    jobs = []
    c.run.submit = lambda job, *args, then=None: jobs.append((job, args, then))
    feed(c, batches, acc)
    # one fit and one basis update in flight, none run on the event path, no second one submitted
    assert sorted(job.__name__ for job, _, _ in jobs) == ["basis_update", "fit_job"]
    assert int(c.buffers.embedding_fits[0]) == 0 and np.isnan(c.buffers.progress).all()
    assert np.isnan(c.buffers.pca_components).all()
    before = set(multiprocessing.active_children())
    for job, args, then in jobs:
        then(job(*args))
    assert set(multiprocessing.active_children()) <= before
    assert int(c.buffers.embedding_fits[0]) == 1 and np.isfinite(c.buffers.progress).all()
    assert np.isfinite(c.buffers.score_1).all()
    jobs.clear()
    c.finish()
    assert [job.__name__ for job, _, _ in jobs] == ["fit_job"]  # the final fit on all points
    pid = in_worker(os.getpid)
    assert pid != os.getpid() and set(multiprocessing.active_children()) <= before


# -- unmixing -------------------------------------------------------------------------------------
UNMIX_PARAMS = {"n_components": 3, "n_init": 1}


def matched_cosines(h: np.ndarray, ref: np.ndarray, energy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = derivative_cosines(h, ref, energy)
    rows, cols = linear_sum_assignment(-d)
    return np.array([cosine(h[i], ref[j]) for i, j in zip(rows, cols)]), d[rows, cols]


def test_unmixing_partitions_equal_sequential(steel):
    """After the final refit (on the merged spectra, in nav order) merged equals sequential. Before
    it, the components re-solved from the summed (aligned) A/B statistics agree with the
    sequential online ones to the tolerance of the batch comparisons (cosine 0.99, derivative
    cosine 0.95; abundances within 0.07 RMSE, the blind fidelity bound). Parts of 63 points (k=7)
    learn their components from a strip of the map each; merged, the components still agree
    (derivative cosine 0.99), but the strongly overlapping Fe K-edge spectra trade abundance
    between them (measured RMSE 0.09 against the sequential state): bound 0.15 there, and the
    refit a merged instance makes at its next batch (or at the end) restores the sequential result."""
    signals, batches, n = map_run(steel)
    seq, merged = run_partitions(UnmixingConsumer, UNMIX_PARAMS, signals, batches, n)
    derived = [name for name in published(seq) if name not in ("unmixing_fits", "refit_sweeps", "refit_relative_change")]
    for label, m in merged.items():
        assert_buffers_equal(seq, m, label=label, names=derived, rtol=1e-9, atol=1e-9)
    live_seq, live = run_partitions(UnmixingConsumer, {**UNMIX_PARAMS, "final_refit": False}, signals, batches, n,
                                    finish=False)
    h_seq = live_seq.buffers.components
    w_seq = np.stack([live_seq.buffers[f"abundance_{j + 1}"] for j in range(3)], axis=1)
    for label, m in live.items():
        cos, dcos = matched_cosines(m.buffers.components, h_seq, steel.energy)
        assert cos.min() >= 0.99 and dcos.min() >= 0.95, (label, cos, dcos)
        w = np.stack([m.buffers[f"abundance_{j + 1}"] for j in range(3)], axis=1)
        order = linear_sum_assignment(-derivative_cosines(m.buffers.components, h_seq, steel.energy))[1]
        rmse = float(np.sqrt(np.mean((w - w_seq[:, order]) ** 2)))
        assert rmse <= (0.15 if label == "k=7" else 0.07), (label, rmse)
        err = float(m.buffers.reconstruction_error[0])
        assert err <= 1.05 * float(live_seq.buffers.reconstruction_error[0]) + 1e-3, label
        assert int(m.buffers.n_points[0]) == n and int(m.buffers.last_fit_n[0]) < n  # a refit is due


def test_unmixing_reference_mode_partitions_equal_exactly(steel):
    params = {"n_components": 0, "references": [{"path": p} for p in STEEL_PHASES.values()]}
    signals, batches, n = map_run(steel)
    seq, merged = run_partitions(UnmixingConsumer, params, signals, batches, n)
    for label, m in merged.items():
        assert_buffers_equal(seq, m, label=label, rtol=1e-12, atol=1e-12)


def test_unmixing_of_a_spectrum_per_frame_equals_the_event_path(steel):
    """An EELS/XRF-like frame stream (one 1-D spectrum per frame, the evenly spaced energy axis
    from ``energy_range``) and a 2-D spectrometer camera (rows summed) give the maps of the same
    spectra sent as events."""
    signals, batches, n = map_run(steel)
    lo, hi = float(steel.energy[0]), float(steel.energy[-1])
    assert np.allclose(steel.energy, np.linspace(lo, hi, len(steel.energy)))
    event = run_partitions(UnmixingConsumer, UNMIX_PARAMS, signals, batches, n, ks=())[0]
    params = {**UNMIX_PARAMS, "signal": "frame", "preprocess": {"energy_range": (lo, hi)}}
    c = len(steel.energy)
    sig = SignalInfo("eels", "frame", (c,), "float64", "counts", series=SeriesInfo("eels", "1", (c,), "float64", n))
    frames = [Batch(sig, b.data, b.nav_index, b.seq_num, b.time) for b in batches]
    framed = run_partitions(UnmixingConsumer, params, [sig], frames, n, ks=())[0]
    assert framed.run.axes["energy"][1] == "eV"
    np.testing.assert_allclose(framed.run.axes["energy"][0], steel.energy, rtol=1e-12)
    assert_buffers_equal(event, framed, names=[f"abundance_{j + 1}" for j in range(3)] + ["components"],
                         rtol=1e-9, atol=1e-9)
    cam = SignalInfo("cam", "frame", (4, c), "float64", "counts", series=SeriesInfo("cam", "1", (4, c), "float64", n))
    stacked = [Batch(cam, np.repeat(b.data[:, None, :] / 4, 4, axis=1), b.nav_index, b.seq_num, b.time) for b in batches]
    summed = run_partitions(UnmixingConsumer, {**params, "sum_frame_rows": True}, [cam], stacked, n, ks=())[0]
    np.testing.assert_allclose(summed.buffers.spectra, framed.buffers.spectra, rtol=1e-12, atol=1e-12)
    u, _ = new_instance(UnmixingConsumer, UNMIX_PARAMS, [], n)
    with pytest.raises(NotApplicable, match="sum_frame_rows"):
        u.signal(cam)


@pytest.mark.parametrize(("cls", "params", "make"), [
    (PCAConsumer, PCA_PARAMS, lambda: corroding_steel_map(seed=0)),
    (EmbeddingConsumer, EMB_PARAMS, lambda: reaction_path_map(seed=0)),
    (UnmixingConsumer, UNMIX_PARAMS, lambda: corroding_steel_map(seed=0)),
], ids=["pca", "embedding", "unmixing"])
def test_checkpoint_round_trip_and_resume(cls, params, make, tmp_path):
    """Half a run, then its buffers into a fresh instance (same ``signal()`` calls, arrays bound,
    ``results()``): the same buffers, maps included; and through the daemon's checkpoint file
    (npz members + versioned JSON, no pickle), the resumed run ends as the uninterrupted one."""
    signals, batches, n = map_run(make())
    a, acc = new_instance(cls, params, signals, n)
    feed(a, batches[:len(batches) // 2], acc)
    b = restored(a, cls, params, signals, n)
    a.results()
    assert_buffers_equal(a, b, label="restored", private=True)
    if cls is EmbeddingConsumer:
        measured = np.isfinite(b.buffers.spectra).all(axis=1)
        assert int(b.buffers.embedding_fits[0]) >= 1 and np.isfinite(b.buffers.progress[measured]).all()
    whole, resumed = checkpoint_round_trip(cls, params, signals, batches, n, tmp_path / "run.ckpt")
    assert_buffers_equal(whole, resumed, label="resumed", private=True, rtol=1e-12, atol=1e-12)
