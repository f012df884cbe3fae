"""Out-of-sample mapping of spectra into a fitted mLLE embedding on the event path.

:func:`map_spectra` maps a page with :func:`~.manifold.transform` (numpy: k-d tree query, batched
solve) and a single spectrum, the event path's usual batch, by one compiled numba pass of the same
construction (:func:`_map_one`; equal to the batched path to 1e-12, tested): one spectrum through
the chain of small numpy calls costs about 53 us, the compiled pass 8 us (400 channels, 300 fitted
points, 12 neighbours). Kept apart from :mod:`.manifold` so that the worker processes that fit
embeddings do not import numba.
"""
from __future__ import annotations

import numba
import numpy as np

from .manifold import ManifoldModel, transform


def map_spectra(model: ManifoldModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~.manifold.transform` of spectra ``x`` ``(m, c)`` float64: ``(coordinates (m, d),
    off-manifold ratio (m,))``; one spectrum by the compiled pass (the batched path when its local
    Gram matrix is not positive definite: non-finite input)."""
    if len(x) == 1:
        out = np.empty(model.y_train.shape[1] + 1)
        if _map_one(np.ascontiguousarray(x[0], dtype=np.float64), model.comps, model.offset, model.z_train,
                    model.x_train, model.y_train, model.n_neighbors, model.reg, model.baseline, out):
            return out[None, :-1], out[-1:]
    return transform(model, x)


@numba.njit(nogil=True, cache=True)
def _map_one(x, comps, offset, z_train, x_train, y_train, k, reg, baseline, out):  # pragma: no cover - compiled
    """:func:`~.manifold.transform` of one spectrum ``x`` ``(c,)`` in one compiled pass, written to ``out``
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
    for the types :func:`map_spectra` passes, so that the first spectrum mapped on the event path
    does not pay it. A background fit calls this on the daemon's pool before its model is
    installed; later calls cost microseconds."""
    rng = np.random.default_rng(0)
    z = rng.random((4, 2))
    _map_one(rng.random(3), rng.random((2, 3)), np.zeros(2), z, rng.random((4, 3)), rng.random((4, 1)), 3, 1e-3,
             1.0, np.empty(2))

