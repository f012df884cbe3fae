"""``pca``: principal component analysis of the spectra (or detector frames) of a scan, as score maps.

The principal basis comes from the exact, mergeable PCA statistics of every point seen so far
(count, mean and scatter matrix: :mod:`beamlens.consumers.spectral.incremental`): it equals a batch
PCA (scikit-learn's ``PCA``) of the same points, whatever the batching, however the run is split
across instances and merged. The points are kept (private nav buffer ``points``) so that every
score map is recomputed in the current basis each time ``batch_size`` more points have arrived
and the stored points have grown by ``update_growth`` (1/8 by default) since the last update, and at
the end of the run (:meth:`PCAConsumer.results`); in between, new points are scored in the basis of
the last update.

Inputs: an event data key holding a spectrum ``(n_channels,)`` or an image ``(rows, cols)`` per
point (flattened), or a detector frame series (``signal: frame``, or the first array signal
offered), each frame flattened: a spectrum per frame (EELS, XRF), a 2-D detector region of interest
(``roi``). Each component's sign is fixed so that its largest-magnitude loading is positive.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .base import (
    Batch, Buffers, BufferSpec, Consumer, ConsumerParams, NotApplicable, SignalInfo, array_signals,
    finite_rows, main_signal,
)
from .spectral.consumer import last_of_each
from .spectral.incremental import (MAX_SCATTER_CHANNELS, basis_of, catch_up, forget, merge_moments, moment_specs,
                                   principal_basis, snapshot)
from .spectral.preprocess import energy_axis

SCORE_BLOCK = 2048
"""Points re-scored per block when a new basis is installed (a block of 123-channel spectra is 2 MB)."""


class PCAParams(ConsumerParams):
    data_key: str | None = None
    """Data key (or frame source name) to analyse; default: the first 1-D or 2-D array signal."""
    signal: Literal["any", "event", "frame"] = "any"
    """Which kind of signal to take: event data keys, detector frames, or whichever comes first."""
    energy_key: str | None = None
    """Configuration key holding the energy axis (eV); default: any ``*energy`` key of matching length."""
    n_components: int = Field(3, ge=1, le=20)
    batch_size: int = Field(64, ge=2)
    """Points between basis updates (each re-scores every point in the new basis)."""
    update_growth: float = Field(0.125, ge=0.0, le=10.0)
    """A basis update also waits until the stored points have grown by this fraction of those the
    last update used (0: every ``batch_size`` points). Re-scoring is ``O(points)``, so updates every
    ``batch_size`` points cost ``O(points² / batch_size)`` over a run; growing geometrically they
    cost ``O(points / update_growth)``, while the basis shown is always that of at least
    ``1 / (1 + update_growth)`` of the points. The end of the run always gives the exact basis of all."""
    roi: tuple[int, int, int, int] | None = None
    """For 2-D signals: ``(row_start, row_stop, col_start, col_stop)`` in px of the region analysed
    (numpy slices); default: the whole frame."""


class PCAConsumer(Consumer):
    """Score maps and explained variance of a PCA of every point.

    Input: one array signal, ``(n, n_channels)`` or ``(n, rows, cols)`` (flattened, within ``roi``),
    any real dtype; at most :data:`~beamlens.consumers.spectral.incremental.MAX_SCATTER_CHANNELS`
    values per point.
    Output: ``score_1`` ... ``score_k`` (``nav``, float64, same units as the data), ``components``
    (``sig``, ``(k, n_values)``), ``mean`` (``sig``, ``(n_values,)``) and
    ``explained_variance_ratio`` (``single``, ``(k,)``, exported as the metric
    ``beamlens_explained_variance_ratio``). Private: ``points`` (``nav``, ``(n_values,)``),
    ``n_points`` and the PCA statistics ``pca_n``, ``pca_mean``, ``pca_scatter``, ``pca_added``
    (points are added to them in bulk when the basis is updated). Points with non-finite values are
    skipped and counted under ``nonfinite``. Mergeable: the statistics merge exactly, the points by
    ``fill``, everything published is derived by :meth:`results`.
    """

    name = "pca"
    Params = PCAParams
    params: PCAParams

    def signal(self, info: SignalInfo) -> list[BufferSpec]:
        p = self.params
        main_signal(self, info, p.data_key)
        if p.signal not in ("any", info.kind) or not array_signals(info):
            raise NotApplicable(f"{info.kind} signal {info.name!r} of shape {info.sig_shape} is not a spectrum or image")
        self.window: tuple[slice, ...] = ()
        shape = info.sig_shape
        if len(shape) == 2 and p.roi is not None:
            r0, r1, c0, c1 = p.roi
            self.window = (slice(r0, r1), slice(c0, c1))
            shape = np.empty(shape, dtype=bool)[self.window].shape
            if 0 in shape:
                raise NotApplicable(f"roi {p.roi} selects nothing of a {info.sig_shape} frame")
        self.n_values = int(np.prod(shape))
        if self.n_values > MAX_SCATTER_CHANNELS:
            raise NotApplicable(f"{info.name!r} has {self.n_values} values per point, more than the "
                                f"{MAX_SCATTER_CHANNELS} a PCA keeps statistics of: set roi")
        self.key = info.name
        self.k = min(p.n_components, self.n_values)
        self._basis_pending = False
        """A basis job was submitted and not installed yet (scheduling only, not result state)."""
        self._updated_at = 0
        """Points stored when the last basis update was submitted (scheduling only)."""
        energy = None
        if len(info.sig_shape) == 1 and info.descriptor is not None:
            energy = energy_axis(info.descriptor, self.n_values, p.energy_key)
        axis_name = "energy" if energy is not None else None
        if energy is not None:
            self.run.axes["energy"] = (energy, "eV")
        sig = (self.n_values,)
        units = info.units or ("counts" if info.kind == "frame" else "")
        return [
            BufferSpec("points", "nav", sig, units=units, private=True, axis=axis_name,
                       description=f"{info.name} per point, flattened, as analysed (no preprocessing)"),
            BufferSpec("n_points", "single", (1,), dtype="int64", private=True, merge="sum", description="points stored"),
            *moment_specs("pca", self.n_values),
            *(BufferSpec(f"score_{i + 1}", "nav", units=units, merge=None,
                         description=f"score on principal component {i + 1}") for i in range(self.k)),
            BufferSpec("components", "sig", (self.k, *sig), axis=axis_name, description="principal components (unit norm)"),
            BufferSpec("mean", "sig", sig, units=units, axis=axis_name, description="mean spectrum"),
            BufferSpec("explained_variance_ratio", "single", (self.k,), metric="explained_variance_ratio",
                       description="fraction of variance per component"),
        ]

    def process(self, batch: Batch, staged: object = None) -> bool:
        """Store the batch's finite points and score them in the current basis. Each time the
        count passes a multiple of ``batch_size`` the pending points join the statistics and a
        basis update is submitted (``run.submit``: the eigendecomposition runs on the daemon's
        pool), whose result re-scores every point. Returns False."""
        b = self.buffers
        x = np.asarray(batch.data[(slice(None), *self.window)], dtype=np.float64).reshape(len(batch), -1)
        ok = finite_rows(x)
        if not ok.all():
            self.run.skipped("nonfinite", int((~ok).sum()))
        x, pos = x[ok], batch.nav_index[ok]
        keep = last_of_each(pos)  # a repeated index within the batch: the last one wins
        x, pos = x[keep], pos[keep]
        if not len(pos):
            return False
        old = b.points[pos]
        new = ~np.isfinite(old).all(axis=1)
        forget(b, "pca", pos, old)
        before = int(b.n_points[0])
        b.n_points[0] += int(new.sum())
        b.points[pos] = x
        if np.isfinite(b.mean).all():
            self._score(x, pos, b.mean, b.components)
        step = self.params.batch_size
        n = int(b.n_points[0])
        due = n >= self._updated_at * (1.0 + self.params.update_growth)
        if n >= 2 and (before // step != n // step or not np.isfinite(b.mean).all()) and not self._basis_pending and due:
            catch_up(b, "pca", b.points)
            self._basis_pending = True
            self._updated_at = n
            self.run.submit(basis_of, *snapshot(b, "pca"), self.k, then=self._install_basis)
        return False

    def merge(self, dest: Buffers, src: Buffers) -> None:
        super().merge(dest, src)  # points by fill; everything published is derived
        merge_moments(dest, src, "pca")

    def results(self) -> None:
        """Basis from the statistics (every stored point added), every stored point re-scored in it."""
        catch_up(self.buffers, "pca", self.buffers.points)
        self._write_basis(principal_basis(self.buffers, "pca", self.k))

    def _install_basis(self, basis: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
        """A basis job finished (daemon thread)."""
        self._basis_pending = False
        self._write_basis(basis)

    def _write_basis(self, basis: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
        if basis is None:
            return
        b = self.buffers
        mean, comps, evr = basis
        b.components[...] = comps
        b.mean[...] = mean
        b.explained_variance_ratio[...] = evr
        self._score_stored(mean, comps)

    def _score_stored(self, mean: np.ndarray, comps: np.ndarray) -> None:
        """Re-score every stored point (finite row of ``points``) in the basis ``mean`` ``(c,)``,
        ``comps`` ``(k, c)``: rows never stored (NaN) are dropped on their first value, the rest
        gathered, centred and projected in blocks of :data:`SCORE_BLOCK` rows (one pass over the
        stored points, no full-buffer temporaries)."""
        points = self.buffers.points
        stored = np.flatnonzero(np.isfinite(points[:, 0])) if points.shape[1] else np.zeros(0, dtype=np.int64)
        for start in range(0, len(stored), SCORE_BLOCK):
            pos = stored[start:start + SCORE_BLOCK]
            x = points[pos]  # a copy (fancy index): centred in place
            ok = finite_rows(x)
            if not ok.all():
                x, pos = x[ok], pos[ok]
            x -= mean
            scores = x @ comps.T
            for i in range(self.k):
                self.buffers[f"score_{i + 1}"][pos] = scores[:, i]

    def _score(self, x: np.ndarray, pos: np.ndarray, mean: np.ndarray, comps: np.ndarray) -> None:
        scores = (x - mean) @ comps.T
        for i in range(self.k):
            self.buffers[f"score_{i + 1}"][pos] = scores[:, i]
