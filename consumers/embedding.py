"""``embedding``: live PCA score maps and a modified-LLE reaction-progress map of a spectral scan.

State (all declared buffers, see :class:`EmbeddingConsumer`): the preprocessed spectra (private nav
buffer ``spectra``), the exact PCA statistics (count, mean, scatter matrix;
:mod:`~beamlens.consumers.spectral.incremental`) and the coordinates of the spectra the current
mLLE embedding was fitted on (private nav buffer ``lle_fit``). Everything published is derived from
them by :meth:`EmbeddingConsumer.results`: the principal basis (a batch PCA of every spectrum so
far), the score maps in it, and the progress map (fitted points at their fitted coordinates, every
other point mapped out of sample, :func:`~beamlens.consumers.spectral.manifold.transform`, with its
off-manifold ratio).

Event path (constant cost per spectrum): each spectrum is preprocessed, stored, scored in the
basis of the last update and mapped into the current embedding. Every ``batch_size`` spectra,
once the stored spectra have grown by ``update_growth`` since the last update, a basis update is a
job on the daemon's pool (:func:`~beamlens.consumers.spectral.incremental.basis_update`): it adds the spectra stored since
the last update to a copy of the PCA statistics (the ``O(m c²)`` rank update) and computes the
eigendecomposition; installing it writes the statistics back (unless a re-measured point, a merge
or :meth:`EmbeddingConsumer.results` changed them meanwhile: the spectra then stay pending and the
next update or ``results()`` adds them) and re-scores every point.

Background: the mLLE embedding is fitted once ``min_points`` spectra exist and refitted whenever
the run has grown by ``refit_growth`` since the last fit, or as soon as the newest spectra lie off
the learned manifold (median off-manifold ratio of a batch above ``refit_residual_ratio``: a new
phase appeared). A fit is a job on the daemon's pool (``run.submit``; inline without a daemon),
never on the event path; with ``refit_in_process`` the job computes it in a worker process of its
own that ends with the job (:func:`~beamlens.consumers.spectral.background.in_worker`), so no
process outlives a fit or the run. The job's result is installed on the daemon's thread (the fitted
points' coordinates into ``lle_fit``), then every map is rederived. Runs longer than
``max_fit_points`` are embedded from a subset evenly spaced in nav order, the rest mapped out of
sample. At the end of the run (:meth:`EmbeddingConsumer.finish`, ``final_refit``) the embedding is
refitted on all points, in nav order: the final maps depend neither on the order the points
arrived in, nor on how the run was batched or split across instances and merged.

Merging two parts of a run: spectra by ``fill``, PCA statistics exactly, and the embedding of the
part whose fit covered more points is kept (the other part's points are mapped into it out of
sample) until the next refit or the final one, which fits the merged spectra exactly as one
instance would have.

The progress map is the first mLLE coordinate, scaled to [0, 1], increasing with edge energy.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
from pydantic import Field, model_validator
from threadpoolctl import threadpool_limits

from .base import Batch, Buffers, BufferSpec, SignalInfo
from .spectral.background import in_worker
from .spectral.consumer import SpectralConsumer, SpectralParams, edge_position
from .spectral.incremental import (
    IN_JOB, basis_update, catch_up, forget, merge_moments, moment_specs, pending_rows, principal_basis, snapshot,
)
from .spectral.manifold import ManifoldModel, embed, model_from, transform
from .spectral.mapping import map_spectra, warm_up


class EmbeddingParams(SpectralParams):
    n_components: int = Field(3, ge=1, le=20)
    """Principal components published as score maps."""
    batch_size: int = Field(32, ge=2)
    """Spectra between basis updates (each adds the spectra stored since to the PCA statistics
    and re-scores every point in the new basis)."""
    update_growth: float = Field(0.125, ge=0.0, le=10.0)
    """A basis update also waits until the stored spectra have grown by this fraction of those
    the last update was submitted at (0: every ``batch_size`` spectra), as ``pca``'s: re-scoring is
    ``O(points)``, so the router thread's cost over a run grows as ``O(points / update_growth)``
    instead of ``O(points² / batch_size)``. The end of the run always gives the exact basis of all."""
    n_neighbors: int = Field(12, ge=3)
    """mLLE neighbourhood size (10-15 for a few hundred spectra)."""
    n_embedding: int = Field(2, ge=1, le=5)
    """mLLE coordinates; the first is the progress map."""
    n_pca: int = Field(10, ge=2)
    """Principal components of the spectra fed to mLLE."""
    min_points: int = Field(50, ge=4)
    """Spectra before the first mLLE fit."""
    refit_growth: float = Field(1.5, gt=1.0)
    """Refit when the run has this many times the points of the last fit."""
    refit_residual_ratio: float = Field(3.0, gt=1.0)
    """Refit early when a page's median off-manifold ratio exceeds this."""
    max_fit_points: int = Field(1000, ge=50)
    """Largest mLLE fit (dense eigensolver: memory ~ N^2, about 1 s at 1000 points); larger runs
    use an evenly spaced subset."""
    final_refit: bool = True
    """Refit the embedding on all points at the end of the run."""
    refit_in_process: bool = True
    """Run each background mLLE refit in a worker process of its own job (False: on the daemon's
    pool thread itself, sharing the GIL with the event path)."""
    edge_window_ev: float = Field(10.0, gt=0)
    """Half-width (eV) of the window around the main edge of the fitted spectra (their mean) in
    which each spectrum's edge energy is estimated (for the progress sign). Post-edge oscillations
    outside it would otherwise dominate the estimate (measured: rank correlation with true progress 0.1 over 7070-7240 eV,
    0.98 within +/-10 eV)."""

    @model_validator(mode="after")
    def _neighbours(self) -> EmbeddingParams:
        if self.n_neighbors < self.n_embedding or min(self.min_points, self.max_fit_points) <= self.n_neighbors:
            raise ValueError("need n_embedding <= n_neighbors < min(min_points, max_fit_points)")
        return self


class EmbeddingConsumer(SpectralConsumer):
    """PCA score maps, explained variance and the mLLE progress map of a spectral scan.

    Input: one spectrum per point ``(n_channels,)`` (an event data key, or a frame series of
    spectra), preprocessed per ``params.preprocess`` to ``c`` channels.
    Output: ``score_1`` ... ``score_k`` (``nav``, float64), ``pca_components`` (``sig``, ``(k, c)``),
    ``explained_variance_ratio`` (``single``, metric ``beamlens_explained_variance_ratio``),
    ``progress`` and ``lle_2`` ... (``nav``, [0, 1]), ``manifold_residual`` (``nav``, off-manifold
    ratio per point), ``embedding_residual`` (``single`` ``(1,)``, median ratio of the newest batch,
    metric ``beamlens_embedding_residual_ratio``), ``embedding_fits`` (``single`` ``(1,)`` int64,
    mLLE fits installed).
    Private: ``spectra`` (``nav``, ``(c,)``), ``prep_e0``, ``n_points``, the PCA statistics
    ``pca_n``/``pca_mean``/``pca_scatter``/``pca_added`` (:func:`~.spectral.incremental.moment_specs`),
    ``pca_basis_mean`` (``sig`` ``(c,)``, the mean the published basis was computed with),
    ``lle_fit`` (``nav``, ``(n_embedding,)``: coordinates of the fitted points, NaN elsewhere) and
    ``lle_fit_n`` (``single`` ``(1,)``: spectra stored when that fit was snapshotted).
    """

    name = "embedding"
    Params = EmbeddingParams
    params: EmbeddingParams

    def setup(self, info: SignalInfo) -> None:
        self.k = min(self.params.n_components, self.prep.n_out)
        self._model: ManifoldModel | None = None
        """Cache of the model rebuilt from ``lle_fit`` and ``spectra`` (cleared when they change)."""
        self._mapped: ManifoldModel | None = None
        """The model every stored point's coordinates were last derived in (:meth:`results` maps
        them all again only when the model changed; :meth:`process` maps new points in it)."""
        self._basis_pending = False
        """A basis job was submitted and not installed yet (scheduling only)."""
        self._updated_at = 0
        """Spectra stored when the last basis update was submitted (scheduling only)."""
        self._stats_changed = 0
        """Counts changes of the PCA statistics (or of a stored spectrum) made on this thread: a
        basis job's updated statistics are installed only if none happened since its snapshot."""
        self._refit_pending = False
        """A refit job was submitted and not installed yet (scheduling only, not result state)."""
        c = self.prep.n_out
        self._scratch = (np.empty(c), np.empty((c, c)))
        """The basis job's copy of the PCA statistics, reused by each job (one is pending at most):
        the job updates it in place and its installation copies it back into the buffers."""
        self._projection: tuple[np.ndarray, np.ndarray] | None = None
        """``(components.T (c, k) C-ordered, components @ basis mean (k,))`` of the published
        basis, for scoring (cleared whenever the basis is written)."""
        self._score_names = [f"score_{i + 1}" for i in range(self.k)]
        self._n_off_manifold = 0  # triggers so far (the first is logged at INFO, later ones at DEBUG)

    def spectral_buffers(self) -> list[BufferSpec]:
        c = self.prep.n_out
        p = self.params
        return [
            BufferSpec("n_points", "single", (1,), dtype="int64", private=True, merge="sum", description="spectra stored"),
            *moment_specs("pca", c),
            BufferSpec("pca_basis_mean", "sig", (c,), axis=self.axis_name, private=True,
                       description="mean spectrum of the published principal basis"),
            BufferSpec("lle_fit", "nav", (p.n_embedding,), private=True, merge=None,
                       description="mLLE coordinates of the spectra of the current fit"),
            BufferSpec("lle_fit_n", "single", (1,), private=True, description="spectra stored when the fit was made"),
            *(BufferSpec(f"score_{i + 1}", "nav", merge=None, description=f"score on principal component {i + 1}")
              for i in range(self.k)),
            BufferSpec("pca_components", "sig", (self.k, c), axis=self.axis_name, description="principal components (unit norm)"),
            BufferSpec("explained_variance_ratio", "single", (self.k,), metric="explained_variance_ratio",
                       description="fraction of variance per principal component"),
            BufferSpec("progress", "nav", merge=None,
                       description="reaction progress: first mLLE coordinate, 0..1, increasing with edge energy"),
            *(BufferSpec(f"lle_{j + 1}", "nav", merge=None, description=f"mLLE coordinate {j + 1}, 0..1")
              for j in range(1, p.n_embedding)),
            BufferSpec("manifold_residual", "nav", merge=None,
                       description="off-manifold ratio: barycentric residual / median residual of the fitted points"),
            BufferSpec("embedding_residual", "single", (1,), metric="embedding_residual_ratio", merge="max",
                       description="median off-manifold ratio of the newest spectra"),
            BufferSpec("embedding_fits", "single", (1,), dtype="int64", merge="sum",
                       description="mLLE fits installed in this run"),
        ]

    # -- the contract ------------------------------------------------------------------------
    def process(self, batch: Batch, staged: object = None) -> bool:
        """Store, score and map the batch's spectra; submit a refit when one is due. Each time the
        count passes a multiple of ``batch_size`` (and has grown by ``update_growth`` since the
        last update) the pending spectra join the PCA statistics and a basis update is submitted
        (the eigendecomposition runs on the daemon's pool), whose result re-scores every spectrum.
        Returns False."""
        b = self.buffers
        before = self._n_stored()
        y, pos, old = self.preprocessed(batch)
        has_basis = b.pca_basis_mean[0] == b.pca_basis_mean[0]  # written whole: finite iff published
        if len(y):
            was = np.isfinite(old).all(axis=1)
            remeasured = int(np.count_nonzero(was))
            if remeasured:  # their previous spectra leave the statistics
                forget(b, "pca", pos[was], old[was])
                self._stats_changed += 1
            b.n_points[0] += len(y) - remeasured
            if has_basis:
                self._write_scores(y, pos)
            model = self._current_model()
            if model is not None:
                coords, ratio = map_spectra(model, y)
                self._write_coords(pos, coords, ratio)
                self._note_residual(float(ratio[0] if len(ratio) == 1 else np.median(ratio)))
        if self._refit_due():
            self._submit_fit()
        step = self.params.batch_size
        n = self._n_stored()
        due = n >= self._updated_at * (1.0 + self.params.update_growth)
        if n >= 2 and (before // step != n // step or not has_basis) and not self._basis_pending and due:
            self._submit_basis()
        return False

    def merge(self, dest: Buffers, src: Buffers) -> None:
        """Spectra by ``fill`` (and the default rules), PCA statistics exactly; the embedding of
        the part whose fit covered more spectra is kept (``dest``'s on a tie)."""
        n_dest, n_src = (float(np.nan_to_num(x.lle_fit_n[0])) for x in (dest, src))
        super().merge(dest, src)
        merge_moments(dest, src, "pca")
        self._stats_changed += 1
        if n_src > n_dest:
            dest.lle_fit[...] = src.lle_fit
            dest.lle_fit_n[...] = src.lle_fit_n
        self._model = self._mapped = self._projection = None

    def results(self) -> None:
        """Basis from the PCA statistics, every stored spectrum re-scored in it and mapped into the
        embedding of ``lle_fit`` (fitted spectra at their fitted coordinates, the others out of
        sample)."""
        b = self.buffers
        x, pos = self.stored()
        if catch_up(b, "pca", b.spectra):
            self._stats_changed += 1
        self._write_basis(principal_basis(b, "pca", self.k), x, pos)
        self._derive_map(x, pos)

    def _derive_map(self, x: np.ndarray, pos: np.ndarray) -> None:
        """Progress and further coordinates, off-manifold ratios of the stored spectra ``x`` at
        ``pos`` in the embedding of ``lle_fit`` (skipped when they were derived in this very model:
        new spectra are mapped into it as they arrive)."""
        b = self.buffers
        model = self._current_model()
        if model is None or not len(pos) or model is self._mapped:
            return
        self._mapped = model
        fitted = np.isfinite(b.lle_fit[pos]).all(axis=1)
        coords = np.empty((len(pos), self.params.n_embedding))
        ratio = np.empty(len(pos))
        coords[fitted], ratio[fitted] = model.y_train, model.loo_ratio
        if (~fitted).any():
            coords[~fitted], ratio[~fitted] = transform(model, x[~fitted])
        self._write_coords(pos, coords, ratio)

    def finish(self) -> None:
        """Refit the embedding on every stored spectrum (``final_refit``), via the daemon's pool."""
        n = self._n_stored()
        if self.params.final_refit and n >= self.params.min_points and n > self._fit_n():
            self._submit_fit()

    # -- internals ---------------------------------------------------------------------------
    def _n_stored(self) -> int:
        return int(self.buffers.n_points[0])

    def _fit_n(self) -> int:
        n = float(self.buffers.lle_fit_n[0])
        return int(n) if n == n else 0  # NaN at allocation: no fit yet

    def _current_model(self) -> ManifoldModel | None:
        """The embedding of ``lle_fit`` (rebuilt from the buffers when the cache was cleared)."""
        if self._model is None:
            b = self.buffers
            pos = np.flatnonzero(np.isfinite(b.lle_fit).all(axis=1)) if b.lle_fit.size else np.zeros(0, dtype=np.int64)
            if len(pos) <= self.params.n_neighbors:
                return None
            p = self.params
            self._model = model_from(b.spectra[pos], b.lle_fit[pos], n_neighbors=p.n_neighbors, n_pca=p.n_pca)
        return self._model

    def _submit_basis(self) -> None:
        """Submit a basis update (:func:`~.spectral.incremental.basis_update`): copies of the
        statistics and of the spectra stored since they were last updated; adding those spectra and
        the eigendecomposition are the job's, off the event path."""
        b = self.buffers
        pending = pending_rows(b, "pca", b.spectra)
        b.pca_added[pending] = IN_JOB  # marked in the nav buffer: a roll of the window moves the marks
        self._basis_pending = True
        self._updated_at = self._n_stored()
        changed = self._stats_changed
        self.run.submit(basis_update, *snapshot(b, "pca", self._scratch), b.spectra[pending], self.k,
                        then=lambda result: self._install_basis(result, b, changed))

    def _install_basis(self, result: tuple[float, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray] | None],
                       buffers: Buffers, changed: int) -> None:
        """A basis job finished (daemon thread): adopt its statistics (the points marked
        :data:`~.spectral.incremental.IN_JOB` added) when nothing changed the statistics or a
        stored spectrum since its snapshot (else those points are pending again for the next
        update, and :meth:`results` adds them anyway), then publish the basis and re-score every
        stored spectrum."""
        self._basis_pending = False
        b = self.buffers
        if b is not buffers:  # restored or replaced meanwhile: the job's snapshot is of other buffers
            return
        n, mean, scatter, basis = result
        in_job = b.pca_added == IN_JOB
        if changed == self._stats_changed:
            b.pca_n[0] = n
            b.pca_mean[...] = mean
            b.pca_scatter[...] = scatter
            b.pca_added[in_job] = 1
        else:
            b.pca_added[in_job] = 0
        if basis is not None:
            b.pca_basis_mean[...], b.pca_components[...], b.explained_variance_ratio[...] = basis
            self._projection = None
            # every point at once on the nav buffer (no copy of the stored rows): NaN rows, points
            # not measured, score NaN, as they were
            self._write_scores(b.spectra, slice(None))

    def _write_basis(self, basis: tuple[np.ndarray, np.ndarray, np.ndarray] | None, x: np.ndarray,
                     pos: np.ndarray) -> None:
        if basis is None:
            return
        b = self.buffers
        b.pca_basis_mean[...], b.pca_components[...], b.explained_variance_ratio[...] = basis
        self._projection = None
        self._write_scores(x, pos)

    def _write_scores(self, x: np.ndarray, pos: np.ndarray | slice) -> None:
        """Score spectra ``x`` ``(m, c)`` in the published basis (``x · Cᵀ − C · mean``, no
        centred copy of ``x``) and write them at ``pos``."""
        b = self.buffers
        if self._projection is None:
            comps = b.pca_components
            self._projection = (np.ascontiguousarray(comps.T), comps @ b.pca_basis_mean)
        ct, offset = self._projection
        scores = x @ ct - offset
        for i, name in enumerate(self._score_names):
            b[name][pos] = scores[:, i]

    def _write_coords(self, pos: np.ndarray, coords: np.ndarray, ratio: np.ndarray) -> None:
        b = self.buffers
        b.progress[pos] = coords[:, 0]
        for j in range(1, coords.shape[1]):
            b[f"lle_{j + 1}"][pos] = coords[:, j]
        b.manifold_residual[pos] = ratio

    def _note_residual(self, newest: float) -> None:
        self.buffers.embedding_residual[0] = newest
        if newest > self.params.refit_residual_ratio and not self._refit_pending:
            level = logging.INFO if self._n_off_manifold == 0 else logging.DEBUG
            self.log.log(level, "run %s: spectra off the learned manifold (ratio %.1f); refitting", self.run.uid, newest)
            self._n_off_manifold += 1

    def _refit_due(self) -> bool:
        n, p, last = self._n_stored(), self.params, self._fit_n()
        if n < p.min_points or self._refit_pending:
            return False
        if last == 0 or n >= p.refit_growth * last:  # the first fit at min_points, whatever the growth
            return True
        # an off-manifold refit waits for enough new points to form neighbourhoods of their own,
        # and for 10 % growth, so a heterogeneous scan (real STXM) does not refit continuously
        off = float(self.buffers.embedding_residual[0]) > p.refit_residual_ratio  # NaN: False
        return off and n >= last + max(p.n_neighbors, last // 10)

    def _submit_fit(self) -> None:
        """Snapshot the stored spectra (copies: the job never sees the buffers) and submit the fit."""
        x, pos = self.stored()
        cap = self.params.max_fit_points
        if len(pos) > cap:
            rows = np.linspace(0, len(pos) - 1, cap).round().astype(np.int64)
            x, pos = x[rows], pos[rows]
        p = self.params
        settings = FitSettings(self.energy, p.preprocess.derivative, p.edge_window_ev, p.n_neighbors, p.n_embedding, p.n_pca)
        self._refit_pending = True
        self.run.submit(fit_job, x, pos, self._n_stored(), settings, p.refit_in_process, then=self._install)

    def _install(self, result: tuple[np.ndarray, np.ndarray, int, ManifoldModel]) -> None:
        """Adopt a finished fit (on the daemon's thread): the fitted spectra's coordinates, then
        every map rederived. A fit older than the installed one is dropped. When the fit took
        every spectrum of its snapshot, the spectra stored since (mapped out of sample just now)
        are the newest: their median off-manifold ratio becomes ``embedding_residual``, so a scan
        that outran the fit is still checked against it (and may trigger the next refit)."""
        self._refit_pending = False
        pos, coords, n, model = result
        b = self.buffers
        if n < self._fit_n():
            return
        b.lle_fit[...] = np.nan
        b.lle_fit[pos] = coords
        b.lle_fit_n[0] = n
        b.embedding_fits[0] += 1
        self._model = model  # built by the job from the same spectra and coordinates: what the buffers give
        x, stored = self.stored()
        self._derive_map(x, stored)
        if len(pos) == n and len(stored) > n:
            newest = stored[~np.isfinite(b.lle_fit[stored, 0])]
            self._note_residual(float(np.median(b.manifold_residual[newest])))


@dataclass(frozen=True)
class FitSettings:
    """What a background mLLE fit needs besides the spectra (sent to the worker process)."""

    energy: np.ndarray | None
    derivative: bool
    edge_window_ev: float
    n_neighbors: int
    n_embedding: int
    n_pca: int


def edge_energy(x: np.ndarray, settings: FitSettings) -> np.ndarray:
    """Edge energy per spectrum ``(n,)`` (eV) of spectra ``x`` ``(n, c)``, within
    ``edge_window_ev`` of the main edge of the mean of ``x`` (so the window depends on the fitted
    points, not on page boundaries)."""
    energy, derivative = settings.energy, settings.derivative
    sel = np.ones(x.shape[1], dtype=bool)
    if energy is not None and x.shape[1] > 2:
        mean = x.mean(axis=0)
        d = mean if derivative else np.gradient(mean, energy)
        window = np.abs(energy - energy[int(np.argmax(d))]) <= settings.edge_window_ev
        if window.sum() >= 3:
            sel = window
    return edge_position(x[:, sel], None if energy is None else energy[sel], derivative)


_ONE_BLAS_THREAD = threading.Lock()


def fit_coordinates(x: np.ndarray, settings: FitSettings) -> np.ndarray:
    """mLLE coordinates ``(m, n_embedding)`` of spectra ``x`` ``(m, c)`` (a module-level function:
    it may run in a worker process).

    Computed with one BLAS thread, wherever it runs: the dense eigenproblem of mLLE is
    ill-conditioned enough that BLAS's thread count moves coordinates by ~1e-3 (measured on the
    reaction-path map), and the maps must not depend on the machine or on where the fit ran. In
    the daemon's own process the limit is process-wide while a fit runs (fits are serialised by a
    lock so that the limit is restored correctly).
    """
    with _ONE_BLAS_THREAD, threadpool_limits(1):
        return embed(x, edge_energy(x, settings), n_neighbors=settings.n_neighbors,
                     n_components=settings.n_embedding, n_pca=settings.n_pca)


def fit_model(x: np.ndarray, settings: FitSettings) -> tuple[np.ndarray, ManifoldModel]:
    """:func:`fit_coordinates` of spectra ``x`` ``(m, c)`` and their out-of-sample model
    (:func:`model_from`): the whole fit, wherever it runs (a module-level function: it may run in a
    worker process, whose result, k-d tree included, comes back pickled)."""
    coords = fit_coordinates(x, settings)
    return coords, model_from(x, coords, n_neighbors=settings.n_neighbors, n_pca=settings.n_pca)


def fit_job(x: np.ndarray, pos: np.ndarray, n: int, settings: FitSettings,
            in_process: bool) -> tuple[np.ndarray, np.ndarray, int, ManifoldModel]:
    """Background (daemon pool): fit the embedding of a snapshot.

    Args:
        x: ``(m, c)`` float64 spectra to fit (a copy); pos: ``(m,)`` int64 their nav indices;
        n: spectra stored at the snapshot; settings: what the fit needs besides the spectra;
        in_process: compute it in a worker process that ends with this job (:func:`in_worker`):
            the embedding and its out-of-sample model are both built there, so the pool thread
            holds the GIL only to unpickle the result.

    Returns:
        ``(pos, coordinates (m, n_embedding), n, model)``: the model for out-of-sample mapping is
        built with the fit (:func:`fit_model`, deterministic: equal to the one rebuilt from the
        buffers), so installing the fit costs the daemon's thread only the mapping of spectra
        stored since.
    """
    # the event path maps the next spectra into this model with the compiled kernel: load it now
    if in_process:
        coords, model = in_worker(fit_model, x, settings, meanwhile=warm_up)
    else:
        coords, model = fit_model(x, settings)
        warm_up()
    return pos, coords, n, model
