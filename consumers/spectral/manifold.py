"""Modified locally linear embedding of spectra, with out-of-sample mapping and an off-manifold
residual.

Fit (:func:`fit_manifold`): the spectra are centred and projected on their top ``n_pca`` principal
components (denoising, and a cheaper neighbour search), then embedded by scikit-learn's
``LocallyLinearEmbedding(method="modified")`` (Zhang & Wang, NIPS 19 (2007)). Its first coordinate
orders spectra along the reaction path (the progress map). Its sign is fixed reproducibly: the
coordinate increases with the edge energy of the spectra (metal -> oxide); further coordinates are
signed to positive skewness. Every coordinate is scaled to [0, 1] over the fitted points.

Out of sample (:func:`transform`): a new spectrum is written as the regularised barycentric
combination of its ``n_neighbors`` nearest fitted points (Saul & Roweis, JMLR 4, 119 (2003); the
same construction as ``LocallyLinearEmbedding.transform``) and mapped to the same combination of
their coordinates. The combination's reconstruction residual in the full spectral space, divided by
the median leave-one-out residual of the fitted points, is the off-manifold ratio: about 1 for
spectra like those fitted, much larger for a phase the embedding has not seen. This module maps
with numpy (k-d tree query, batched solve); the event path maps its usual batch, one spectrum, by
one compiled pass of the same construction (:mod:`.mapping`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree
from sklearn.manifold import LocallyLinearEmbedding


@dataclass
class ManifoldModel:
    """A fitted embedding (read-only once built; shared between threads).

    Attributes:
        mean, comps: ``(c,)``, ``(p, c)`` the PCA projection used as the embedding's input.
        tree: scipy k-d tree over the fitted points' PCA scores ``z_train`` ``(n, p)`` (neighbour queries
            of pages in O(log n) per spectrum; a single spectrum is mapped by an exhaustive scan,
            ``n p`` operations: a few microseconds at the largest fit, ``max_fit_points``).
        x_train: ``(n, c)`` fitted spectra (for residuals); y_train: ``(n, d)`` scaled coordinates.
        n_neighbors, reg: barycentric-weight parameters (as scikit-learn's).
        baseline: median leave-one-out reconstruction residual of the fitted points.
        loo_ratio: ``(n,)`` each fitted point's leave-one-out residual over ``baseline``.
        offset: ``(p,)`` ``comps @ mean`` (a spectrum's scores are ``comps @ x - offset``).
    """

    mean: np.ndarray
    comps: np.ndarray
    tree: cKDTree
    z_train: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    n_neighbors: int
    reg: float
    baseline: float
    loo_ratio: np.ndarray
    offset: np.ndarray

    @property
    def n_fit(self) -> int:
        return len(self.x_train)


def barycenter_weights(z: np.ndarray, neighbours: np.ndarray, reg: float) -> np.ndarray:
    """Regularised barycentric weights ``(n, k)`` that reconstruct each ``z[i]`` ``(n, p)`` from
    ``neighbours[i]`` ``(n, k, p)``, summing to 1 (Roweis & Saul 2000; regularisation as
    scikit-learn's ``barycenter_weights``: ``reg * trace`` added to the local Gram diagonal)."""
    g = neighbours - z[:, None, :]
    c = g @ g.transpose(0, 2, 1)
    diag = np.einsum("nkk->nk", c)  # a writable view of the diagonals
    tr = diag.sum(axis=1)
    diag += np.where(tr > 0, reg * tr, reg)[:, None]
    w = np.linalg.solve(c, np.ones(c.shape[:2] + (1,)))[..., 0]
    return w / w.sum(axis=1, keepdims=True)


def _fix_signs(y: np.ndarray, edge: np.ndarray) -> np.ndarray:
    y = y.copy()
    ok = np.isfinite(edge)
    if ok.sum() > 2 and np.std(edge[ok]) > 0:
        if np.corrcoef(y[ok, 0], edge[ok])[0, 1] < 0:
            y[:, 0] *= -1
    for j in range(1, y.shape[1]):
        centred = y[:, j] - y[:, j].mean()
        if (centred ** 3).sum() < 0:
            y[:, j] *= -1
    return y


def _projection(x: np.ndarray, n_pca: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean (c,), components (p, c), scores (n, p))`` of the top ``n_pca`` principal components."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:min(n_pca, len(vt))]
    return mean, comps, (x - mean) @ comps.T


def embed(x: np.ndarray, edge: np.ndarray, *, n_neighbors: int = 12, n_components: int = 2, n_pca: int = 10,
          reg: float = 1e-3) -> np.ndarray:
    """mLLE coordinates ``(n, n_components)`` float64 of spectra ``x`` ``(n, c)`` with edge energies
    ``edge`` ``(n,)`` (eV): signed (see the module docstring) and scaled to [0, 1]. Deterministic:
    the same rows in the same order give the same coordinates.

    Raises:
        ValueError: fewer than ``n_neighbors + 1`` spectra, or ``n_neighbors < n_components``.
    """
    n = len(x)
    if n <= n_neighbors:
        raise ValueError(f"mLLE with {n_neighbors} neighbours needs more than {n_neighbors} spectra, got {n}")
    z = _projection(x, n_pca)[2]
    lle = LocallyLinearEmbedding(n_neighbors=n_neighbors, n_components=n_components, method="modified",
                                 eigen_solver="dense", reg=reg, random_state=0)
    y = _fix_signs(lle.fit_transform(z), edge)
    lo, hi = y.min(axis=0), y.max(axis=0)
    return (y - lo) / np.where(hi > lo, hi - lo, 1.0)


def model_from(x: np.ndarray, y: np.ndarray, *, n_neighbors: int = 12, n_pca: int = 10, reg: float = 1e-3) -> ManifoldModel:
    """The out-of-sample model of an embedding: fitted spectra ``x`` ``(n, c)`` and their
    coordinates ``y`` ``(n, d)`` (from :func:`embed`); everything else (projection, k-d tree,
    leave-one-out residuals) is recomputed from them, so a model rebuilt from stored buffers
    equals the one made at the fit."""
    mean, comps, z = _projection(x, n_pca)
    tree = cKDTree(z)
    idx = tree.query(z, n_neighbors + 1)[1][:, 1:]  # leave each point out
    w = barycenter_weights(z, z[idx], reg)
    loo = np.linalg.norm(x - np.einsum("nk,nkc->nc", w, x[idx]), axis=1)
    baseline = float(np.median(loo)) or 1.0
    c = np.ascontiguousarray  # the compiled one-spectrum path (:mod:`.mapping`) takes C-ordered float64
    return ManifoldModel(c(mean), c(comps), tree, c(z), c(x, dtype=np.float64), c(y, dtype=np.float64), n_neighbors,
                         reg, baseline, loo / baseline, c(comps @ mean))


def fit_manifold(x: np.ndarray, edge: np.ndarray, *, n_neighbors: int = 12, n_components: int = 2,
                 n_pca: int = 10, reg: float = 1e-3) -> ManifoldModel:
    """Fit the embedding to spectra ``x`` ``(n, c)`` with edge energies ``edge`` ``(n,)`` (eV):
    :func:`embed`, then :func:`model_from`.

    Raises:
        ValueError: fewer than ``n_neighbors + 1`` spectra, or ``n_neighbors < n_components``.
    """
    y = embed(x, edge, n_neighbors=n_neighbors, n_components=n_components, n_pca=n_pca, reg=reg)
    return model_from(x, y, n_neighbors=n_neighbors, n_pca=n_pca, reg=reg)


def transform(model: ManifoldModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map new spectra ``x`` ``(m, c)`` into a fitted embedding.

    Returns:
        ``(coordinates (m, d), off-manifold ratio (m,))``.
    """
    z = (x - model.mean) @ model.comps.T
    idx = model.tree.query(z, model.n_neighbors)[1]
    w = barycenter_weights(z, model.z_train[idx], model.reg)[:, None, :]
    y = (w @ model.y_train[idx])[:, 0]
    d = x - (w @ model.x_train[idx])[:, 0]
    return y, np.sqrt(np.einsum("nc,nc->n", d, d)) / model.baseline
