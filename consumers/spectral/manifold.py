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
spectra like those fitted, much larger for a phase the embedding has not seen. A page is mapped
with numpy (k-d tree query, batched solve); a single spectrum, the event path's usual batch, by
one compiled numba pass (:func:`_map_one`, the same construction, equal to 1e-12).
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
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
    c = np.ascontiguousarray  # the compiled one-spectrum path (:func:`_map_one`) takes C-ordered float64
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
    if len(x) == 1:
        out = np.empty(model.y_train.shape[1] + 1)
        if _map_one(np.ascontiguousarray(x[0], dtype=np.float64), model.comps, model.offset, model.z_train,
                    model.x_train, model.y_train, model.n_neighbors, model.reg, model.baseline, out):
            return out[None, :-1], out[-1:]
    z = (x - model.mean) @ model.comps.T
    idx = model.tree.query(z, model.n_neighbors)[1]
    w = barycenter_weights(z, model.z_train[idx], model.reg)[:, None, :]
    y = (w @ model.y_train[idx])[:, 0]
    d = x - (w @ model.x_train[idx])[:, 0]
    return y, np.sqrt(np.einsum("nc,nc->n", d, d)) / model.baseline


@numba.njit(nogil=True, cache=True)
def _map_one(x, comps, offset, z_train, x_train, y_train, k, reg, baseline, out):  # pragma: no cover - compiled
    """:func:`transform` of one spectrum ``x`` ``(c,)`` in one compiled pass, written to ``out``
    ``(d + 1,)`` (coordinates, then the off-manifold ratio); False, ``out`` undefined, when the
    local Gram matrix is not positive definite (non-finite input), for the batched path to handle.

    The event path's usual batch is one point, where the batched path's chain of small numpy calls
    (k-d tree query, gathers, a batched LU solve) costs several times the arithmetic. The same
    construction: scores ``comps @ x - offset``; the ``k`` fitted points nearest in score space
    by exact squared distance (an exhaustive scan, ties to the lower index; the k-d tree's set but
    for exact ties at the k-th distance); the regularised local Gram system ``(G + reg tr(G) I) w = 1``
    solved by Cholesky, ``w`` normalised to sum 1; coordinates ``w @ y_train[idx]``; the
    residual ``|x - w @ x_train[idx]|`` over ``baseline``.
    """
    p, c = comps.shape
    n = z_train.shape[0]
    z = np.empty(p)
    for i in range(p):
        s = 0.0
        for j in range(c):
            s += comps[i, j] * x[j]
        z[i] = s - offset[i]
    best = np.full(k, np.inf)  # the k smallest squared distances so far, ascending
    idx = np.zeros(k, dtype=np.int64)
    for i in range(n):
        d2 = 0.0
        for j in range(p):
            t = z_train[i, j] - z[j]
            d2 += t * t
        if d2 < best[k - 1]:
            a = k - 1
            while a > 0 and best[a - 1] > d2:
                best[a] = best[a - 1]
                idx[a] = idx[a - 1]
                a -= 1
            best[a] = d2
            idx[a] = i
    g = np.empty((k, p))
    for a in range(k):
        for j in range(p):
            g[a, j] = z_train[idx[a], j] - z[j]
    gram = np.empty((k, k))  # lower triangle
    for a in range(k):
        for b in range(a + 1):
            s = 0.0
            for j in range(p):
                s += g[a, j] * g[b, j]
            gram[a, b] = s
    tr = 0.0
    for a in range(k):
        tr += gram[a, a]
    r = reg * tr if tr > 0 else reg
    chol = np.zeros((k, k))  # lower Cholesky factor of the regularised Gram matrix
    for a in range(k):
        for b in range(a + 1):
            s = gram[a, b] + (r if a == b else 0.0)
            for m in range(b):
                s -= chol[a, m] * chol[b, m]
            if a == b:
                if not s > 0.0:
                    return False
                chol[a, a] = np.sqrt(s)
            else:
                chol[a, b] = s / chol[b, b]
    w = np.empty(k)
    for a in range(k):  # forward: L v = 1
        s = 1.0
        for m in range(a):
            s -= chol[a, m] * w[m]
        w[a] = s / chol[a, a]
    for a in range(k - 1, -1, -1):  # back: L^T w = v
        s = w[a]
        for m in range(a + 1, k):
            s -= chol[m, a] * w[m]
        w[a] = s / chol[a, a]
    total = 0.0
    for a in range(k):
        total += w[a]
    for a in range(k):
        w[a] /= total
    d = y_train.shape[1]
    for j in range(d):
        s = 0.0
        for a in range(k):
            s += w[a] * y_train[idx[a], j]
        out[j] = s
    recon = np.zeros(c)
    for a in range(k):
        row = x_train[idx[a]]
        wa = w[a]
        for j in range(c):
            recon[j] += wa * row[j]
    res = 0.0
    for j in range(c):
        t = x[j] - recon[j]
        res += t * t
    out[d] = np.sqrt(res) / baseline
    return True


def warm_up() -> None:
    """Compile :func:`_map_one` (or load it from numba's on-disk cache: about 0.35 s even then)
    for the types :func:`transform` passes, so that the first spectrum mapped on the event path
    does not pay it. A background fit calls this on the daemon's pool before its model is
    installed; later calls cost microseconds."""
    rng = np.random.default_rng(0)
    z = rng.random((4, 2))
    _map_one(rng.random(3), rng.random((2, 3)), np.zeros(2), z, rng.random((4, 3)), rng.random((4, 1)), 3, 1e-3,
             1.0, np.empty(2))

