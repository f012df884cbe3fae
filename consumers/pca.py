"""``pca``: incremental principal component analysis of the spectra of a scan, as score maps.

Uses scikit-learn's ``IncrementalPCA`` (Ross, Lim, Lin & Yang, IJCV 77, 125 (2008)): spectra are
buffered until ``batch_size`` have arrived, then ``partial_fit`` updates the mean and the principal
subspace; at the end of the run the remainder is fitted, so the final subspace matches a batch PCA of
the same spectra up to numerical error and component sign. Scores of all points seen so far are
recomputed after every update (O(N * channels * k) per batch, about a millisecond for 10^4 points of
10^2 channels), so the maps are always in the current basis.

Each component's sign is fixed so that its largest-magnitude loading is positive: maps do not flip
between updates.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field
from sklearn.decomposition import IncrementalPCA

from .base import BufferSpec, Consumer, ConsumerParams, finite_rows, first_array_key, stack_rows
from .spectral.preprocess import energy_axis


class PCAParams(ConsumerParams):
    data_key: str | None = None
    """Spectrum data key; default: the first inline 1-D array key."""
    energy_key: str | None = None
    """Configuration key holding the energy axis (eV); default: any ``*energy`` key of matching length."""
    n_components: int = Field(3, ge=1, le=20)
    batch_size: int = Field(64, ge=2)
    """Spectra per ``partial_fit``; at least ``n_components``."""


class PCAConsumer(Consumer):
    """Score maps and explained variance of an incremental PCA.

    Input: spectra ``(n_events, n_channels)`` (or frames, flattened), any real dtype.
    Output: ``score_1`` ... ``score_k`` (``nav``, float64, same units as the data), ``components``
    (``sig``, ``(k, n_channels)``), ``mean`` (``sig``, ``(n_channels,)``) and
    ``explained_variance_ratio`` (``single``, ``(k,)``, exported as the metric
    ``beamlens_explained_variance_ratio``).
    """

    name = "pca"
    Params = PCAParams
    params: PCAParams

    def descriptor(self, doc: Mapping[str, Any]) -> None:
        self.key = self.params.data_key or first_array_key(doc, ndim=(1, 2))
        self.sig_shape = tuple(doc["data_keys"][self.key]["shape"])
        self.n_channels = int(np.prod(self.sig_shape))
        self.k = min(self.params.n_components, self.n_channels)
        self.batch = max(self.params.batch_size, self.k)
        energy = energy_axis(doc, self.n_channels, self.params.energy_key) if len(self.sig_shape) == 1 else None
        self.axis_name = "energy" if energy is not None else None
        if energy is not None:
            self.run.axes["energy"] = (energy, "eV")
        self.ipca = IncrementalPCA(n_components=self.k)
        self.seen = np.empty((256, self.n_channels))  # spectra kept to re-score; rows [:n_seen] valid
        self.seen_pos = np.empty(256, dtype=np.int64)
        self.n_seen = 0
        self.fitted_upto = 0

    def result_buffers(self) -> list[BufferSpec]:
        sig = (self.n_channels,)
        return [
            *(BufferSpec(f"score_{i + 1}", "nav", description=f"score on principal component {i + 1}")
              for i in range(self.k)),
            BufferSpec("components", "sig", (self.k, *sig), axis=self.axis_name, description="principal components (unit norm)"),
            BufferSpec("mean", "sig", sig, axis=self.axis_name, description="mean spectrum"),
            BufferSpec("explained_variance_ratio", "single", (self.k,), metric="explained_variance_ratio",
                       description="fraction of variance per component"),
        ]

    def event_page(self, doc: Mapping[str, Any], positions: np.ndarray) -> None:
        x = stack_rows(doc["data"][self.key], self.sig_shape).reshape(len(positions), -1)
        finite = finite_rows(x)
        self.run.skipped("nonfinite", int((~finite).sum()))
        ok = finite & (positions >= 0)
        self._append(x[ok], positions[ok])
        while self.n_seen - self.fitted_upto >= self.batch:
            self._fit(self.fitted_upto + self.batch)

    def stop(self, doc: Mapping[str, Any]) -> None:
        if not hasattr(self, "ipca"):
            return
        remaining = self.n_seen - self.fitted_upto
        if remaining >= self.k:
            self._fit(self.n_seen)
        elif remaining and self.fitted_upto:
            # too few for a partial_fit of their own: score them in the final basis
            self._publish()

    # -- internals ---------------------------------------------------------------------------
    def _append(self, x: np.ndarray, pos: np.ndarray) -> None:
        n, m = self.n_seen, len(x)
        if n + m > len(self.seen):
            capacity = max(2 * len(self.seen), n + m)
            self.seen = np.concatenate([self.seen[:n], np.empty((capacity - n, self.n_channels))])
            self.seen_pos = np.concatenate([self.seen_pos[:n], np.empty(capacity - n, dtype=np.int64)])
        self.seen[n:n + m] = x
        self.seen_pos[n:n + m] = pos
        self.n_seen = n + m

    def _fit(self, upto: int) -> None:
        self.ipca.partial_fit(self.seen[self.fitted_upto:upto])
        self.fitted_upto = upto
        self._publish()

    def _publish(self) -> None:
        n = self.n_seen
        comps = self.ipca.components_.copy()
        signs = np.sign(comps[np.arange(len(comps)), np.argmax(np.abs(comps), axis=1)])
        comps *= signs[:, None]
        scores = (self.seen[:n] - self.ipca.mean_) @ comps.T
        for i in range(self.k):
            self.results[f"score_{i + 1}"][self.seen_pos[:n]] = scores[:, i]
        self.results.components[...] = comps
        self.results.mean[...] = self.ipca.mean_
        self.results.explained_variance_ratio[...] = self.ipca.explained_variance_ratio_
