"""Growing point storage and incremental PCA shared by the ``pca``, ``embedding`` and ``unmixing``
consumers.

IncrementalPCA is scikit-learn's (Ross, Lim, Lin & Yang, IJCV 77, 125 (2008)): spectra are fitted
in batches of ``batch`` as they arrive, so the cost per spectrum is constant, and the subspace after
the last batch matches a batch PCA of the same spectra up to numerical error and sign.
"""
from __future__ import annotations

import numpy as np
from sklearn.decomposition import IncrementalPCA


class PointStore:
    """Rows of (preprocessed) spectra with their flat nav positions, grown by doubling.

    Rows ``[:n]`` are never modified once written, so a view of them handed to a background fit
    stays valid while new rows are appended (a reallocation leaves the old array to the view).

    Args:
        n_channels: values per row.
        n_extra: extra float columns kept per row (e.g. an edge-energy estimate), in ``extra``.
    """

    def __init__(self, n_channels: int, n_extra: int = 0, capacity: int = 256):
        self.x = np.empty((capacity, n_channels))
        self.pos = np.empty(capacity, dtype=np.int64)
        self.extra = np.empty((capacity, n_extra))
        self.n = 0

    def append(self, x: np.ndarray, pos: np.ndarray, extra: np.ndarray | None = None) -> None:
        """Append rows ``x`` ``(m, n_channels)`` at positions ``pos`` ``(m,)`` (and ``extra`` ``(m, n_extra)``)."""
        n, m = self.n, len(x)
        if n + m > len(self.x):
            cap = max(2 * len(self.x), n + m)
            self.x = np.concatenate([self.x[:n], np.empty((cap - n, self.x.shape[1]))])
            self.pos = np.concatenate([self.pos[:n], np.empty(cap - n, dtype=np.int64)])
            self.extra = np.concatenate([self.extra[:n], np.empty((cap - n, self.extra.shape[1]))])
        self.x[n:n + m] = x
        self.pos[n:n + m] = pos
        if extra is not None:
            self.extra[n:n + m] = extra
        self.n = n + m


class IncrementalBasis:
    """An IncrementalPCA fed from a :class:`PointStore` in batches of ``batch`` rows.

    Each component's sign is fixed so that its largest-magnitude loading is positive, so score maps
    do not flip between updates.

    Args:
        k: components (at most the number of channels).
        batch: rows per ``partial_fit`` (at least ``k``).
    """

    def __init__(self, k: int, batch: int):
        self.k = k
        self.batch = max(batch, k)
        self.ipca = IncrementalPCA(n_components=k)
        self.fitted_upto = 0

    @property
    def ready(self) -> bool:
        return self.fitted_upto > 0

    def update(self, x: np.ndarray, n: int) -> bool:
        """Fit every complete batch of rows ``x[fitted_upto:n]`` not yet fitted; True if any was."""
        fitted = False
        while n - self.fitted_upto >= self.batch:
            self._fit(x, self.fitted_upto + self.batch)
            fitted = True
        return fitted

    def finish(self, x: np.ndarray, n: int) -> bool:
        """Fit the remainder ``x[fitted_upto:n]`` at the end of a run (when it has at least ``k`` rows)."""
        if n - self.fitted_upto >= self.k:
            self._fit(x, n)
            return True
        return False

    def _fit(self, x: np.ndarray, upto: int) -> None:
        self.ipca.partial_fit(x[self.fitted_upto:upto])
        self.fitted_upto = upto

    def basis(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean (c,), components (k, c))``, copies, signs fixed."""
        comps = self.ipca.components_.copy()
        signs = np.sign(comps[np.arange(len(comps)), np.argmax(np.abs(comps), axis=1)])
        return self.ipca.mean_.copy(), comps * signs[:, None]

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.ipca.explained_variance_ratio_
