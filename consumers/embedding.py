"""``embedding``: live PCA score maps and a modified-LLE reaction-progress map of a spectral scan.

Event path (constant cost per spectrum): each spectrum is preprocessed and stored, scored in the
current principal basis and, once an mLLE embedding exists, mapped into it out of sample
(:func:`~beamlens.consumers.spectral.manifold.transform`) with its off-manifold ratio.

Background (two :class:`~beamlens.consumers.spectral.background.Refitter`\ s, so neither ever
runs on the event path): the IncrementalPCA is updated on a thread with every ``batch_size`` new
spectra; the mLLE refits run in a worker process of the run's own (``refit_in_process``; the fit's
Python and numpy work would otherwise hold the interpreter lock and slow the event path while it
runs), which also re-scores all points in the basis current at the snapshot. The worker stops at
the end of the run. The mLLE embedding is fitted
once ``min_points`` spectra exist and refitted whenever the run has grown by ``refit_growth`` since
the last fit, or as soon as the newest spectra lie off the learned manifold (median off-manifold
ratio of a page above ``refit_residual_ratio``: a new phase appeared). A refit never runs on the
event path; its result is installed at the next page (all fitted points get their new coordinates,
points that arrived during the fit are mapped into the new embedding). Runs longer than
``max_fit_points`` are embedded from an evenly spaced subset, the rest mapped out of sample. At the
end of the run the last refit is awaited, the PCA remainder fitted, and (``final_refit``) the
embedding refitted on all points, so the final maps do not depend on how the run was batched.

The progress map is the first mLLE coordinate, scaled to [0, 1], increasing with edge energy.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from .base import BufferSpec
from .spectral.background import Refitter
from .spectral.consumer import SpectralConsumer, SpectralParams, edge_position
from .spectral.incremental import IncrementalBasis, PointStore
from .spectral.manifold import ManifoldModel, fit_manifold, transform


class EmbeddingParams(SpectralParams):
    n_components: int = Field(3, ge=1, le=20)
    """Principal components published as score maps."""
    batch_size: int = Field(32, ge=2)
    """Spectra per IncrementalPCA ``partial_fit``."""
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
    """Run background mLLE refits in a worker process (False: a thread, sharing the GIL with the
    event path)."""
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

    Input: one spectrum per event ``(n_channels,)``, preprocessed per ``params.preprocess``.
    Output: ``score_1`` ... ``score_k`` (``nav``), ``pca_components`` (``sig``, ``(k, c)``),
    ``explained_variance_ratio`` (``single``, metric ``beamlens_explained_variance_ratio``),
    ``progress`` and ``lle_2`` ... (``nav``, [0, 1]), ``manifold_residual`` (``nav``, off-manifold
    ratio per point), ``embedding_residual`` (``single`` ``(1,)``, median ratio of the newest page,
    metric ``beamlens_embedding_residual_ratio``), ``embedding_fits`` (``single`` ``(1,)``, mLLE fits
    installed so far).
    """

    name = "embedding"
    Params = EmbeddingParams
    params: EmbeddingParams

    def setup(self, doc: Mapping[str, Any]) -> None:
        super().setup(doc)
        c = self.prep.n_out
        self.k = min(self.params.n_components, c)
        self.store = PointStore(c)
        self.basis = IncrementalBasis(self.k, self.params.batch_size)
        self.refitter = Refitter(f"beamlens-embedding-{self.run.uid[:8]}", process=self.params.refit_in_process)
        self.pca_refitter = Refitter(f"beamlens-embedding-pca-{self.run.uid[:8]}")
        self.pca_requested_upto = 0
        self.mean: np.ndarray | None = None  # current principal basis (c,), (k, c)
        self.comps: np.ndarray | None = None
        self.model: ManifoldModel | None = None
        self.mapped_upto = 0  # store rows [:mapped_upto] have coordinates in self.model
        self.last_fit_n = 0
        self.off_manifold = False
        self.n_off_manifold = 0  # triggers so far (the first is logged at INFO, later ones at DEBUG)

    def result_buffers(self) -> list[BufferSpec]:
        c = self.prep.n_out
        p = self.params
        return [
            *(BufferSpec(f"score_{i + 1}", "nav", description=f"score on principal component {i + 1}")
              for i in range(self.k)),
            BufferSpec("pca_components", "sig", (self.k, c), axis=self.axis_name, description="principal components (unit norm)"),
            BufferSpec("explained_variance_ratio", "single", (self.k,), metric="explained_variance_ratio",
                       description="fraction of variance per principal component"),
            BufferSpec("progress", "nav", description="reaction progress: first mLLE coordinate, 0..1, increasing with edge energy"),
            *(BufferSpec(f"lle_{j + 1}", "nav", description=f"mLLE coordinate {j + 1}, 0..1")
              for j in range(1, p.n_embedding)),
            BufferSpec("manifold_residual", "nav", description="off-manifold ratio: barycentric residual / median residual of the fitted points"),
            BufferSpec("embedding_residual", "single", (1,), metric="embedding_residual_ratio",
                       description="median off-manifold ratio of the newest spectra"),
            BufferSpec("embedding_fits", "single", (1,), dtype="int64", description="mLLE fits installed in this run"),
        ]

    # -- documents ---------------------------------------------------------------------------
    def event_page(self, doc: Mapping[str, Any], positions: np.ndarray) -> None:
        y, pos = self.preprocessed(doc, positions)
        self._install_basis(self.pca_refitter.poll())
        self._install(self.refitter.poll())
        if len(y):
            self.store.append(y, pos)
            if self.mean is not None:
                self._score(slice(self.store.n - len(y), self.store.n))
            self._map_new()
        if self.store.n - self.pca_requested_upto >= self.basis.batch:
            self.pca_requested_upto = self.store.n
            self.pca_refitter.request(self._pca_step, (self.store.x, self.store.n))  # rows [:n] never change
        if self._refit_due():
            self._request_refit()

    def stop(self, doc: Mapping[str, Any]) -> None:
        if not hasattr(self, "store"):
            return
        self._install_basis(self.pca_refitter.wait(timeout=300))
        try:
            self._install(self.refitter.wait(timeout=300))
        finally:
            self.refitter.close()
        if self.basis.finish(self.store.x, self.store.n) or self.basis.ready:
            self._install_basis(self._basis())
            self._score(slice(0, self.store.n))
        n = self.store.n
        if self.params.final_refit and n >= self.params.min_points and (self.model is None or n > self.last_fit_n):
            self._install(fit_snapshot(self._snapshot()))

    # -- internals ---------------------------------------------------------------------------
    def _pca_step(self, snap: tuple[np.ndarray, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Background (PCA thread): fit the complete batches not yet fitted; the new basis."""
        x, n = snap
        return self._basis() if self.basis.update(x, n) else None

    def _basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mean, comps = self.basis.basis()
        return mean, comps, self.basis.explained_variance_ratio.copy()

    def _install_basis(self, basis: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
        if basis is None:
            return
        self.mean, self.comps, evr = basis
        self.results.pca_components[...] = self.comps
        self.results.explained_variance_ratio[...] = evr

    def _score(self, rows: slice) -> None:
        scores = (self.store.x[rows] - self.mean) @ self.comps.T
        pos = self.store.pos[rows]
        for i in range(self.k):
            self.results[f"score_{i + 1}"][pos] = scores[:, i]

    def _write_coords(self, pos: np.ndarray, coords: np.ndarray, ratio: np.ndarray) -> None:
        self.results.progress[pos] = coords[:, 0]
        for j in range(1, coords.shape[1]):
            self.results[f"lle_{j + 1}"][pos] = coords[:, j]
        self.results.manifold_residual[pos] = ratio

    def _map_new(self) -> None:
        """Map rows not yet in the embedding out of sample (constant cost per new row)."""
        if self.model is None or self.mapped_upto >= self.store.n:
            return
        rows = slice(self.mapped_upto, self.store.n)
        coords, ratio = transform(self.model, self.store.x[rows])
        self._write_coords(self.store.pos[rows], coords, ratio)
        self.mapped_upto = self.store.n
        newest = float(np.median(ratio))
        self.results.embedding_residual[0] = newest
        if newest > self.params.refit_residual_ratio:
            if not self.off_manifold:
                level = logging.INFO if self.n_off_manifold == 0 else logging.DEBUG
                self.log.log(level, "run %s: spectra off the learned manifold (ratio %.1f); refitting", self.run.uid, newest)
                self.n_off_manifold += 1
            self.off_manifold = True

    def _refit_due(self) -> bool:
        n, p = self.store.n, self.params
        if n < p.min_points or self.refitter.busy:
            return False
        if n >= p.refit_growth * max(self.last_fit_n, 1):
            return True
        # an off-manifold refit waits for enough new points to form neighbourhoods of their own,
        # and for 10 % growth, so a heterogeneous scan (real STXM) does not refit continuously
        return self.off_manifold and n >= self.last_fit_n + max(p.n_neighbors, self.last_fit_n // 10)

    def _snapshot(self) -> tuple:
        n, cap = self.store.n, self.params.max_fit_points
        rows = np.arange(n) if n <= cap else np.linspace(0, n - 1, cap).round().astype(np.int64)
        self.last_fit_n = n
        self.off_manifold = False
        # rows [:n] are never rewritten: views are safe to hand to the worker
        basis = None if self.mean is None else (self.mean, self.comps)
        p = self.params
        settings = FitSettings(self.energy, p.preprocess.derivative, p.edge_window_ev, p.n_neighbors, p.n_embedding, p.n_pca)
        return self.store.x[:n], rows, n, basis, settings

    def _request_refit(self) -> None:
        self.refitter.request(fit_snapshot, self._snapshot())

    def _install(self, result: tuple | None) -> None:
        """Adopt a finished fit: coordinates (and scores) of the rows it covered, then map the rows
        that arrived while it ran."""
        if result is None:
            return
        self.model, coords, ratio, scores = result
        n = len(coords)
        self._write_coords(self.store.pos[:n], coords, ratio)
        if scores is not None:
            for i in range(self.k):
                self.results[f"score_{i + 1}"][self.store.pos[:n]] = scores[:, i]
        self.mapped_upto = n
        self._map_new()
        self.results.embedding_fits[0] += 1


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


def fit_snapshot(snap: tuple) -> tuple[ManifoldModel, np.ndarray, np.ndarray, np.ndarray | None]:
    """Background (worker process or thread): fit mLLE on the snapshot's fit rows, map its other
    rows, and re-score all of them in the principal basis current at the snapshot.

    Args:
        snap: ``(x (n, c) float64, fit rows (m,) int64, n, (mean (c,), components (k, c)) or None,
            FitSettings)``.

    Returns:
        ``(model, coordinates (n, d), off-manifold ratio (n,), PCA scores (n, k) or None)`` for
        store rows ``[:n]``.
    """
    x, rows, n, basis, settings = snap
    model = fit_manifold(x[rows], edge_energy(x[rows], settings), n_neighbors=settings.n_neighbors,
                         n_components=settings.n_embedding, n_pca=settings.n_pca)
    coords = np.empty((n, settings.n_embedding))
    ratio = np.empty(n)
    coords[rows], ratio[rows] = model.y_train, model.loo_ratio
    others = np.setdiff1d(np.arange(n), rows, assume_unique=True)
    if len(others):
        coords[others], ratio[others] = transform(model, x[others])
    scores = None if basis is None else (x - basis[0]) @ basis[1].T
    return model, coords, ratio, scores
