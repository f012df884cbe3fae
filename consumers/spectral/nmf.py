"""Non-negative unmixing of spectra: vertex initialisation, HALS NMF (batch and online), NNLS.

Model: ``X ≈ W H`` with ``X`` ``(n_points, n_channels)`` spectra, ``W >= 0`` ``(n_points, k)``
abundances and ``H >= 0`` ``(k, n_channels)`` component spectra (Lee & Seung, Nature 401, 788 (1999)).

- :func:`spa`: successive projection algorithm (Araújo et al., Chemom. Intell. Lab. Syst. 57, 65
  (2001); Gillis & Vavasis, IEEE TPAMI 36, 698 (2014)) picks the purest spectra (vertices of the
  data cone). Blind NMF of Fe K-edge spectra from a generic start converges to wrong factors with the
  same loss as the true ones (strongly overlapping spectra with a common edge step); starting from
  the vertices avoids that (measured in beamlens' science notes, section 5.2).
- :func:`hals` : hierarchical alternating least squares (Cichocki & Phan, IEICE Trans. Fundam.
  E92-A, 708 (2009); Gillis & Glineur, Neural Comput. 24, 1085 (2012)), with rows of ``H`` that may
  be held fixed (known standards: the constrained NMF of Maffettone et al., Appl. Phys. Rev. 8,
  041410 (2021)) and optional per-point weights on the ``H`` update.
- :func:`online_step`: the streaming form (Mairal, Bach, Ponce & Sapiro, JMLR 11, 19 (2010)): each
  new spectrum gets its abundances by NNLS against the current ``H``, is added to the sufficient
  statistics ``A = Σ w wᵀ`` (k, k) and ``B = Σ w x`` (k, n_channels), and one HALS sweep updates
  ``H`` from ``A`` and ``B`` alone: the cost per spectrum is ``O(k² n_channels)``, independent of
  the number of points seen; :func:`solve_components` solves the ``H`` update to convergence from
  ``A`` and ``B`` (after merging the statistics of two parts of a run, which add). Periodic batch refits (:func:`fit_nmf`, on all points, vertex
  initialised) re-anchor it; the consumer runs them off the event path.
"""
from __future__ import annotations

from dataclasses import dataclass

import logging

import numpy as np
from scipy.optimize import nnls

log = logging.getLogger(__name__)

EPS = 1e-12


def spa(x: np.ndarray, k: int, fixed: np.ndarray | None = None, rank: int | None = None) -> np.ndarray:
    """Successive projection algorithm: indices of the ``k`` purest rows of ``x``.

    The data are first projected onto their top ``rank`` right singular vectors (default
    ``k + len(fixed)``) to keep noise from deciding the picks; then, repeatedly, the row of largest
    norm is chosen and every row is projected onto the orthogonal complement of it. Rows of
    ``fixed`` (known components) are projected out before the first pick, so the picks are the
    vertices the known components do not explain (hybrid mode).

    Args:
        x: float ``(n, c)`` spectra, n >= k.
        k: number of rows to pick.
        fixed: float ``(m, c)`` known components, or None.
        rank: denoising rank.

    Returns:
        int64 ``(k,)`` row indices into ``x``.

    Raises:
        ValueError: if ``x`` has fewer than ``k`` rows.
    """
    n = len(x)
    if n < k:
        raise ValueError(f"SPA needs at least {k} spectra, got {n}")
    m = 0 if fixed is None else len(fixed)
    r = min(rank or (k + m), *x.shape)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    basis = vt[:r]
    y = x @ basis.T  # (n, r) coordinates in the signal subspace
    if m:
        for f in fixed @ basis.T:
            f = f / max(np.linalg.norm(f), EPS)
            y = y - np.outer(y @ f, f)
    picks = []
    for _ in range(k):
        norms = np.einsum("ij,ij->i", y, y)
        norms[picks] = -1.0
        j = int(np.argmax(norms))
        picks.append(j)
        u = y[j] / max(np.sqrt(norms[j]), EPS)
        y = y - np.outer(y @ u, u)
    return np.asarray(picks, dtype=np.int64)


def nnls_gram(gram: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares for many right-hand sides in Gram form.

    Solves ``min_w ||x - w H||²`` s.t. ``w >= 0`` for each row, given ``gram = H Hᵀ`` ``(k, k)`` and
    ``b = X Hᵀ`` ``(n, k)``: with the Cholesky factor ``gram = L Lᵀ`` the problem is
    ``min ||Lᵀ w - L⁻¹ b||²``, a k x k NNLS (Lawson-Hanson, ``scipy.optimize.nnls``) per row.

    Returns:
        float64 ``(n, k)``.
    """
    k = len(gram)
    l_factor = np.linalg.cholesky(gram + np.eye(k) * EPS * max(np.trace(gram), 1.0))
    rhs = np.linalg.solve(l_factor, np.atleast_2d(b).T).T
    lt = l_factor.T
    return np.array([nnls(lt, r)[0] for r in rhs]).reshape(len(rhs), k)


def abundances(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """NNLS abundances ``(n, k)`` of spectra ``x`` ``(n, c)`` on components ``h`` ``(k, c)``."""
    return nnls_gram(h @ h.T, x @ h.T)


def _update_h(h: np.ndarray, a: np.ndarray, b: np.ndarray, free: np.ndarray) -> None:
    """One HALS sweep over the free rows of ``h`` from ``a = WᵀW`` and ``b = WᵀX`` (in place)."""
    for j in np.flatnonzero(free):
        if a[j, j] > EPS:
            h[j] = np.maximum(h[j] + (b[j] - a[j] @ h) / a[j, j], 0.0)


def _update_w(w: np.ndarray, x_ht: np.ndarray, hht: np.ndarray) -> None:
    for j in range(w.shape[1]):
        if hht[j, j] > EPS:
            w[:, j] = np.maximum(w[:, j] + (x_ht[:, j] - w @ hht[:, j]) / hht[j, j], 0.0)


@dataclass
class FitInfo:
    """How a batch NMF fit went (logged at debug level and published by the ``unmixing`` consumer).

    Attributes:
        iterations: HALS sweeps made (each updates every row of ``W`` and every free row of ``H``).
        rel_change: relative decrease of the loss in the last sweep, ``(prev - loss) / prev``.
        loss: final objective ``sqrt(Σ_i q_i ||x_i - w_i H||²)`` (Frobenius norm when unweighted).
        converged: True when ``rel_change <= tol`` before ``n_iter`` sweeps.
        init: name of the start the fit began from (``spa``, ``nndsvda``, ``random-3``, ``warm``).
    """

    iterations: int
    rel_change: float
    loss: float
    converged: bool
    init: str = ""


def _loss(x2: float, a: np.ndarray, b: np.ndarray, h: np.ndarray) -> float:
    """``sqrt(Σ q|x|² - 2 Σ (QW)ᵀX ∘ H + Σ (QW)ᵀW ∘ HHᵀ)`` from the sufficient statistics
    ``a = (QW)ᵀW`` (k, k) and ``b = (QW)ᵀX`` (k, c): ``O(k² c)`` instead of ``O(n k c)``."""
    return float(np.sqrt(max(x2 - 2.0 * np.einsum("ij,ij->", b, h) + np.einsum("ij,ij->", a, h @ h.T), 0.0)))


def hals(x: np.ndarray, w: np.ndarray, h: np.ndarray, *, n_iter: int = 500, tol: float = 1e-6,
         free: np.ndarray | None = None, weights: np.ndarray | None = None,
         init: str = "") -> tuple[np.ndarray, np.ndarray, FitInfo]:
    """Batch HALS NMF from a given start.

    Minimises ``Σ_i q_i ||x_i - w_i H||²`` over ``W >= 0`` and the free rows of ``H >= 0`` (point
    weights ``q`` enter only the ``H`` update; each ``w_i`` is independent of them). The loss of
    the start is the reference for the first sweep, so the fit runs until a sweep improves the loss
    by less than ``tol`` of its value (or ``n_iter`` sweeps), never stopping after one sweep only
    because there was no previous loss.

    Args:
        x: float ``(n, c)``; w: ``(n, k)`` start; h: ``(k, c)`` start (copied).
        n_iter: maximum sweeps; tol: stop when the relative decrease of the loss in a sweep is at most it.
        free: bool ``(k,)``, rows of ``H`` to learn (default all).
        weights: float ``(n,)`` point weights ``q_i > 0`` (default 1).
        init: label of the start, copied into the returned :class:`FitInfo`.

    Returns:
        ``(W, H, info)``: float64 ``(n, k)``, ``(k, c)`` and a :class:`FitInfo`.
    """
    w, h = w.astype(np.float64, copy=True), h.astype(np.float64, copy=True)
    free = np.ones(len(h), dtype=bool) if free is None else free
    q = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    xq = x * q[:, None]
    x2 = float(np.einsum("ij,ij->", xq, x))
    wq = w * q[:, None]
    prev = _loss(x2, wq.T @ w, wq.T @ x, h)
    rel, it, converged = np.inf, 0, False
    for it in range(1, n_iter + 1):
        _update_w(w, x @ h.T, h @ h.T)
        wq = w * q[:, None]
        a, b = wq.T @ w, w.T @ xq
        _update_h(h, a, b, free)
        loss = _loss(x2, a, b, h)
        rel = (prev - loss) / prev if prev > 0 else 0.0
        prev = loss
        if rel <= tol:
            converged = True
            break
    _update_w(w, x @ h.T, h @ h.T)
    wq = w * q[:, None]
    info = FitInfo(it, float(rel), _loss(x2, wq.T @ w, w.T @ xq, h), converged, init)
    log.debug("HALS from %s: %d sweep(s), last relative change %.3g, loss %.6g%s", init or "start", info.iterations,
              info.rel_change, info.loss, "" if converged else " (sweep limit reached)")
    return w, h, info


def nndsvda(x: np.ndarray, k: int) -> np.ndarray:
    """NNDSVD-a start for ``H`` ``(k, c)``: non-negative double SVD (Boutsidis & Gallopoulos,
    Pattern Recognit. 41, 1350 (2008)), zeros filled with the mean of ``x`` (the "a" variant, as
    scikit-learn's ``init="nndsvda"``). ``x`` float ``(n, c)`` non-negative, ``k <= min(n, c)``."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    h = np.zeros((k, x.shape[1]))
    h[0] = np.sqrt(s[0]) * np.abs(vt[0])
    for j in range(1, k):
        uj, vj = u[:, j], vt[j]
        up, un, vp, vn = np.maximum(uj, 0), np.maximum(-uj, 0), np.maximum(vj, 0), np.maximum(-vj, 0)
        mp = np.linalg.norm(up) * np.linalg.norm(vp)
        mn = np.linalg.norm(un) * np.linalg.norm(vn)
        v, m = (vp / max(np.linalg.norm(vp), EPS), mp) if mp >= mn else (vn / max(np.linalg.norm(vn), EPS), mn)
        h[j] = np.sqrt(s[j] * m) * v
    h[h < EPS] = max(float(x.mean()), EPS)
    return h


def random_start(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Random start for ``H`` ``(k, c)``: ``|N(0, 1)| * sqrt(mean(x) / k)`` (scikit-learn's
    ``init="random"`` scaling), from ``numpy.random.default_rng(seed)``."""
    scale = np.sqrt(max(float(x.mean()), EPS) / max(k, 1))
    return np.abs(np.random.default_rng(seed).standard_normal((k, x.shape[1]))) * scale


def start_names(n_init: int, first: str = "spa") -> list[str]:
    """The starts :func:`fit_nmf` tries for ``n_init``: ``first`` (``spa`` or ``nndsvda``), the
    other of the two, then ``random-0``, ``random-1``, ... Vertex picks first suit XANES, where they
    name the physically pure spectra (science notes, section 5.2); NNDSVD-a first suits diffraction
    ramps, whose extreme patterns (thermal expansion shifts the peaks within a phase) are not the
    phases' mean patterns."""
    pair = ["spa", "nndsvda"] if first == "spa" else ["nndsvda", "spa"]
    return (pair + [f"random-{i}" for i in range(max(n_init - 2, 0))])[:max(n_init, 1)]


def _start(x: np.ndarray, k: int, fixed: np.ndarray, name: str) -> np.ndarray:
    if name == "spa":
        return np.maximum(x[spa(x, k, fixed if len(fixed) else None)], 0.0)
    # the other starts describe what the known components leave over
    rest = np.maximum(x - abundances(x, fixed) @ fixed, 0.0) if len(fixed) else np.maximum(x, 0.0)
    if name == "nndsvda":
        return nndsvda(rest, k)
    return random_start(rest, k, int(name.split("-", 1)[1]))


def fit_nmf(x: np.ndarray, k: int, fixed: np.ndarray | None = None, *, weights: np.ndarray | None = None,
            n_iter: int = 500, tol: float = 1e-6, init_h: np.ndarray | None = None, n_init: int = 1,
            first: str = "spa", tie_tolerance: float = 1e-3) -> tuple[np.ndarray, np.ndarray, FitInfo]:
    """NMF of ``x`` with ``k`` learned components after ``fixed`` known ones, best of several starts.

    Starts (:func:`start_names`): the spectra :func:`spa` picks (vertex start), NNDSVD-a
    (:func:`nndsvda`) and seeded random ones, ``n_init`` of them in that order (or only ``init_h``
    when given: a warm start); each is clipped at 0, gets abundances by NNLS and is refined by
    :func:`hals` with the known rows held fixed. The fit of lowest loss is kept; a later start must
    beat the best so far by more than ``tie_tolerance`` (relative) to replace it, so that equally
    good factorisations (NMF's rotational ambiguity) resolve to the earliest start.

    Args:
        x: float ``(n, c)``; k: learned components (may be 0: pure reference fit).
        fixed: ``(m, c)`` known components or None.
        weights: ``(n,)`` point weights for the component update (manifold weighting).
        n_iter, tol: per-start HALS limits (see :func:`hals`).
        init_h: ``(k, c)`` start for the learned components (warm start) instead of the list.
        n_init: number of starts to try (1: ``first`` only).
        first: ``spa`` or ``nndsvda``, the start tried first (and kept on ties).
        tie_tolerance: relative loss margin a later start must win by.

    Returns:
        ``(W (n, m + k), H (m + k, c), info)``, known components first; ``info`` of the kept fit.

    Raises:
        ValueError: fewer spectra than learned components.
    """
    fixed = np.zeros((0, x.shape[1])) if fixed is None else np.asarray(fixed, dtype=np.float64)
    if k == 0:
        w = abundances(x, fixed)
        return w, fixed.copy(), FitInfo(0, 0.0, float(np.linalg.norm(x - w @ fixed)), True, "references")
    if len(x) < k:
        raise ValueError(f"NMF needs at least {k} spectra, got {len(x)}")
    starts = [("warm", np.maximum(init_h, 0.0))] if init_h is not None else \
        [(name, None) for name in start_names(n_init, first)]
    free = np.r_[np.zeros(len(fixed), dtype=bool), np.ones(k, dtype=bool)]
    best: tuple[np.ndarray, np.ndarray, FitInfo] | None = None
    for name, h0 in starts:
        h = np.vstack([fixed, _start(x, k, fixed, name) if h0 is None else h0])
        fit = hals(x, abundances(x, h), h, n_iter=n_iter, tol=tol, free=free, weights=weights, init=name)
        if best is None or fit[2].loss < (1.0 - tie_tolerance) * best[2].loss:
            best = fit
    return best


def tail_scale(h: np.ndarray, tail_fraction: float = 0.2) -> np.ndarray:
    """Per-component scale ``(k,)``: mean of the last ``tail_fraction`` of channels (for XANES the
    post-edge, so dividing by it gives components of unit edge step and abundances in edge-step
    units, i.e. fractions of the absorber for edge-normalised data). Falls back to the maximum when
    the tail mean is not positive."""
    m = max(1, int(round(h.shape[1] * tail_fraction)))
    s = h[:, -m:].mean(axis=1)
    return np.where(s > EPS, s, np.maximum(h.max(axis=1), EPS))


def online_step(x: np.ndarray, h: np.ndarray, a: np.ndarray, b: np.ndarray, free: np.ndarray) -> np.ndarray:
    """One online NMF step (Mairal et al. 2010) for new spectra ``x`` ``(n, c)``, in place.

    Abundances by NNLS against the current components ``h`` ``(K, c)``; they are added to the
    sufficient statistics ``a = Σ w wᵀ`` ``(K, K)`` and ``b = Σ w x`` ``(K, c)``, and one HALS sweep
    updates the free rows of ``h`` from ``a`` and ``b`` alone (``O(K² c)``, independent of the points
    seen). With no free row (reference mode) only the abundances are computed.

    Returns:
        ``(n, K)`` float64 abundances in the components before the sweep.
    """
    w = abundances(x, h)
    if free.any():
        a += w.T @ w
        b += w.T @ x
        _update_h(h, a, b, free)
    return w


def solve_components(h: np.ndarray, a: np.ndarray, b: np.ndarray, free: np.ndarray, *, n_iter: int = 1000,
                     tol: float = 1e-9) -> int:
    """The dictionary update of online NMF solved to convergence, in place: the free rows of ``h``
    ``(K, c)`` minimising ``½ tr(H a Hᵀ) - tr(bᵀ H)`` over ``H >= 0`` (the part of ``Σ ||x - w H||²``
    that depends on ``H``), by HALS sweeps from ``h`` until no entry moves by more than ``tol`` of
    the largest (or ``n_iter`` sweeps). With ``a`` positive definite the minimiser is unique, so the
    result depends on the statistics, not on the start: merged statistics (sums of the parts'
    ``a`` and ``b``) give the components of all the parts' points together.

    Returns:
        sweeps made.
    """
    it = 0
    for it in range(1, n_iter + 1):
        before = h.copy()
        _update_h(h, a, b, free)
        if np.abs(h - before).max() <= tol * max(float(np.abs(h).max()), EPS):
            break
    return it


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), EPS))


def unit_derivatives(spectra: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """First derivatives d/dE of ``spectra`` ``(k, c)`` on ``energy`` ``(c,)`` eV, each scaled to
    unit norm: ``(k, c)``. Their dot products are derivative cosines."""
    d = np.gradient(spectra, energy, axis=1)
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), EPS)


def derivative_cosines(components: np.ndarray, library: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """Cosine similarity ``(k, m)`` of the first derivatives d/dE of ``components`` ``(k, c)`` and
    ``library`` ``(m, c)`` on ``energy`` ``(c,)`` eV. The derivative discriminates Fe(III) phases
    whose normalised spectra all agree to cosine >= 0.99 (science notes, section 5.1)."""
    return unit_derivatives(components, energy) @ unit_derivatives(library, energy).T
