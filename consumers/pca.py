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

from .base import BufferSpec, Consumer, ConsumerParams, finite_rows, first_array_key, stack_rows
from .spectral.incremental import IncrementalBasis, PointStore
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
        energy = energy_axis(doc, self.n_channels, self.params.energy_key) if len(self.sig_shape) == 1 else None
        self.axis_name = "energy" if energy is not None else None
        if energy is not None:
            self.run.axes["energy"] = (energy, "eV")
        self.basis = IncrementalBasis(self.k, self.params.batch_size)
        self.store = PointStore(self.n_channels)  # spectra kept to re-score

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
        self.store.append(x[ok], positions[ok])
        if self.basis.update(self.store.x, self.store.n):
            self._publish()

    def stop(self, doc: Mapping[str, Any]) -> None:
        if not hasattr(self, "basis"):
            return
        if self.basis.finish(self.store.x, self.store.n) or self.basis.ready:
            self._publish()  # too few left for a partial_fit of their own: score them in the final basis

    # -- internals ---------------------------------------------------------------------------
    def _publish(self) -> None:
        n = self.store.n
        mean, comps = self.basis.basis()
        scores = (self.store.x[:n] - mean) @ comps.T
        for i in range(self.k):
            self.results[f"score_{i + 1}"][self.store.pos[:n]] = scores[:, i]
        self.results.components[...] = comps
        self.results.mean[...] = mean
        self.results.explained_variance_ratio[...] = self.basis.explained_variance_ratio
