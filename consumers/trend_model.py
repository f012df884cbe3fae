"""Gaussian-process trend regression and threshold-crossing forecasts of one series ``y(x)``.

The regression follows the battery-electrode study that motivates it (``../shared/science.md`` §3):
each figure is MinMax-normalised and regressed against the cycle number (optionally on a log axis)
by a Gaussian process with the squared-exponential kernel ``k(x, x') = θf² exp(−‖x − x'‖² / θl)``.
In scikit-learn that kernel is ``ConstantKernel(θf²) * RBF(length_scale=sqrt(θl / 2))``, because
``RBF`` is ``exp(−‖x − x'‖² / (2 ℓ²))`` (:func:`paper_kernel` states the mapping; a unit test checks
it). A ``WhiteKernel`` takes the measurement noise.

An SE kernel alone reverts to its mean away from the data and so never forecasts a crossing. Two
remedies, both plain GP algebra:

* Without history, a linear trend term (``ConstantKernel * DotProduct``) is added, so the GP
  extrapolates the local slope (:func:`default_kernel`).
* With earlier series of the same figure (earlier cells, samples or runs, as a facility has them),
  :func:`learn_prior` builds a population prior: the mean curve of those series as the GP's mean
  function, a *time-scale* basis term ``σs² g(x) g(x')`` with ``g = x · dm/dx`` (``dm/du`` on a log
  axis) — a series that ages ``s`` times faster than the mean reads ``m(x·s) ≈ m(x) + (s − 1) g(x)``
  — plus SE and white noise for the rest, with hyper-parameters fitted by maximising the summed
  log marginal likelihood of the earlier series (never the one being forecast). The forecast band
  then carries the spread between series, not just the noise of one.

:class:`TrendModel` keeps a window of the last ``window`` points (so the cost per point is bounded
by one ``window``-point Cholesky solve), re-optimises the hyper-parameters every ``refit_every``
points and conditions on new points with fixed hyper-parameters in between (with a prior the
hyper-parameters stay those learned from the earlier series). :meth:`TrendModel.forecast` gives the
mean and the ±2σ band on a grid; :meth:`TrendModel.crossing` the x where the mean and either bound
reach a threshold (``inf`` when not within the horizon).

Layering: numpy, scipy and scikit-learn only; nothing from ``beamlens.daemon``.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import minimize
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, DotProduct, Hyperparameter, Kernel, WhiteKernel

log = logging.getLogger(__name__)

Direction = Literal["below", "above"]
#: While a series has fewer than this many times ``refit_every`` points, every new point refits:
#: hyper-parameters fitted on a handful of points are unreliable, and such fits are cheap.
EARLY_REFITS = 3


def paper_kernel(theta_f: float, theta_l: float, bounds: str | tuple[float, float] = (1e-5, 1e5)) -> Kernel:
    """The paper's SE kernel ``k(x, x') = θf² exp(−‖x − x'‖² / θl)`` as scikit-learn kernels.

    Args:
        theta_f: signal amplitude θf (normalised y units).
        theta_l: the paper's length parameter θl (x units squared; note: not a length scale).
        bounds: bounds of both hyper-parameters for optimisation, or ``"fixed"``.

    Returns:
        ``ConstantKernel(θf²) * RBF(length_scale=sqrt(θl / 2))``: scikit-learn's RBF is
        ``exp(−d² / (2 ℓ²))``, so ``2 ℓ² = θl``.
    """
    return ConstantKernel(theta_f**2, bounds) * RBF(math.sqrt(theta_l / 2.0), bounds)


def default_kernel() -> Kernel:
    """The kernel used without a population prior, on MinMax-normalised y and scaled x:
    SE (the paper's) + a linear trend (so a forecast follows the local slope) + white noise."""
    # length scales below a tenth of the window's span cannot be resolved by its points: bounded
    return (ConstantKernel(0.1, (1e-4, 1e2)) * RBF(0.3, (1e-1, 1e2))
            + ConstantKernel(0.1, (1e-4, 1e2)) * DotProduct(1.0, "fixed")
            + WhiteKernel(1e-3, (1e-8, 1e-1)))


class BasisKernel(Kernel):
    """``k(x, x') = variance · g(x) g(x')`` for a fixed basis function ``g`` tabulated on a grid
    (linear interpolation, held constant outside): Bayesian linear regression on ``g`` as a GP
    term. Used for the time-scale deviation from a population mean (:func:`learn_prior`).

    Args:
        grid: float64 ``(n,)`` increasing x (GP input units).
        values: float64 ``(n,)`` ``g`` on ``grid``.
        variance: prior variance of the coefficient of ``g``.
        variance_bounds: bounds for optimisation, or ``"fixed"``.
    """

    def __init__(self, grid: np.ndarray, values: np.ndarray, variance: float = 1.0,
                 variance_bounds: tuple[float, float] | str = (1e-6, 1e3)):
        self.grid = grid
        self.values = values
        self.variance = variance
        self.variance_bounds = variance_bounds

    @property
    def hyperparameter_variance(self) -> Hyperparameter:
        return Hyperparameter("variance", "numeric", self.variance_bounds)

    def _g(self, X: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(X, dtype=np.float64)[:, 0], self.grid, self.values)

    def __call__(self, X, Y=None, eval_gradient=False):
        gx = self._g(X)
        if Y is not None and eval_gradient:
            raise ValueError("gradient can only be evaluated when Y is None")
        K = self.variance * np.outer(gx, gx if Y is None else self._g(Y))
        if not eval_gradient:
            return K
        if self.hyperparameter_variance.fixed:
            return K, np.empty((len(gx), len(gx), 0))
        return K, K[:, :, None]  # dK / d log(variance)

    def diag(self, X):
        return self.variance * self._g(X) ** 2

    def is_stationary(self):
        return False

    def __repr__(self):
        return f"BasisKernel(variance={self.variance:.3g})"


@dataclass(frozen=True)
class Prior:
    """A population prior learned from earlier series (:func:`learn_prior`).

    Attributes:
        grid: float64 ``(n,)`` GP input coordinates (x, or ``log1p(x)`` when ``log_x``) of the mean.
        mean: float64 ``(n,)`` mean curve of the earlier series, normalised y units.
        kernel: fitted kernel (hyper-parameters fixed) for the deviation from ``mean``.
        y_range: ``(lo, hi)`` of the MinMax normalisation, value units.
        x_max: the x (value units) up to which at least half the earlier series have points;
            forecasts end there.
        n_series: how many earlier series it was learned from.
    """

    grid: np.ndarray
    mean: np.ndarray
    kernel: Kernel
    y_range: tuple[float, float]
    x_max: float
    n_series: int


@dataclass(frozen=True)
class Forecast:
    """GP forecast on a grid (value units): x ``(n,)``, mean ``(n,)``, std ``(n,)``, lower/upper =
    mean ∓ ``n_sigma`` std."""

    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


@dataclass(frozen=True)
class Crossing:
    """Forecast x (series x units) where a threshold is reached: by the mean, by the pessimistic
    bound (the bound that reaches it first) and by the optimistic bound; ``inf`` when not within
    the horizon. The forecast band of the crossing is ``[pessimistic, optimistic]``."""

    mean: float
    pessimistic: float
    optimistic: float

    def covers(self, x: float) -> bool:
        """Whether ``x`` lies inside the band ``[pessimistic, optimistic]``."""
        return bool(self.pessimistic <= x <= self.optimistic)


def first_crossing(x: np.ndarray, y: np.ndarray, threshold: float, direction: Direction = "below") -> float:
    """The first x where the piecewise-linear curve ``y(x)`` reaches ``threshold`` (``y <= t`` for
    ``"below"``, ``y >= t`` for ``"above"``), interpolated linearly; ``x[0]`` when it starts there;
    ``inf`` when it never does. ``x``, ``y``: float ``(n,)``, x increasing."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    s = 1.0 if direction == "below" else -1.0
    hit = np.nonzero(s * (y - threshold) <= 0)[0]
    if not len(hit):
        return math.inf
    i = int(hit[0])
    if i == 0:
        return float(x[0])
    y0, y1 = y[i - 1], y[i]
    return float(x[i - 1] + (y0 - threshold) * (x[i] - x[i - 1]) / (y0 - y1))


def _fit_quiet(gp: GaussianProcessRegressor, X: np.ndarray, y: np.ndarray) -> GaussianProcessRegressor:
    with warnings.catch_warnings():
        # L-BFGS reaching a bound is normal for the noise level of clean data; not an error.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return gp.fit(X, y)


class TrendModel:
    """Incremental GP regression of one series with bounded cost per point.

    Args:
        log_x: regress on ``log1p(x)`` (the paper's log cycle axis; ``log(1 + x)`` so cycle 0 works).
        window: at most this many latest points are kept and conditioned on.
        refit_every: re-optimise hyper-parameters after this many new points (1 = every point),
            and at every point while the window holds fewer than ``EARLY_REFITS * refit_every``;
            in between, new points are conditioned on with the last hyper-parameters. Ignored with
            a prior (its hyper-parameters are learned from the earlier series and stay fixed).
        kernel: the GP kernel on normalised units (default :func:`default_kernel`, or the prior's).
        prior: a population prior (:func:`learn_prior`) on the same ``log_x`` axis, or None.
        y_range: fixed ``(lo, hi)`` of the MinMax normalisation; default the prior's, else the
            window's values at each refit.
        n_restarts: optimiser restarts at a refit (scikit-learn ``n_restarts_optimizer``).
        seed: random state of the restarts.

    Raises:
        ValueError: ``window < 2`` or ``refit_every < 1``.
    """

    def __init__(self, *, log_x: bool = False, window: int = 200, refit_every: int = 5, kernel: Kernel | None = None,
                 prior: Prior | None = None, y_range: tuple[float, float] | None = None, n_restarts: int = 2,
                 seed: int = 0):
        if window < 2 or refit_every < 1:
            raise ValueError(f"window must be >= 2 and refit_every >= 1 (got {window}, {refit_every})")
        self.log_x, self.window, self.refit_every = log_x, int(window), int(refit_every)
        self.prior = prior
        self.kernel = kernel if kernel is not None else (prior.kernel if prior is not None else default_kernel())
        self.fixed_y_range = y_range if y_range is not None else (prior.y_range if prior is not None else None)
        self.n_restarts, self.seed = n_restarts, seed
        self.x = np.empty(0)
        self.y = np.empty(0)
        self.gp: GaussianProcessRegressor | None = None
        self.since_refit = 0
        self.refits = 0
        self._scale: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)  # y lo, y span, u lo, u span

    # -- coordinates ---------------------------------------------------------------------------
    def u(self, x: np.ndarray) -> np.ndarray:
        """GP input coordinate of x: ``x`` or ``log1p(x)``; float64 ``(n,)``."""
        x = np.asarray(x, dtype=np.float64)
        return np.log1p(x) if self.log_x else x

    def _inputs(self, x: np.ndarray) -> np.ndarray:
        u = self.u(x)
        if self.prior is not None:  # the prior's grid and kernel are in raw u units
            return u[:, None]
        lo, span = self._scale[2], self._scale[3]
        return ((u - lo) / span)[:, None]

    def _prior_mean(self, x: np.ndarray) -> np.ndarray:
        if self.prior is None:
            return np.zeros(len(np.atleast_1d(x)))
        return np.interp(self.u(x), self.prior.grid, self.prior.mean)

    def normalise(self, y: np.ndarray) -> np.ndarray:
        """MinMax-normalised y (the study's scaling), float64."""
        lo, span = self._scale[0], self._scale[1]
        return (np.asarray(y, dtype=np.float64) - lo) / span

    def denormalise(self, yn: np.ndarray) -> np.ndarray:
        return np.asarray(yn, dtype=np.float64) * self._scale[1] + self._scale[0]

    # -- data ----------------------------------------------------------------------------------
    def add(self, x: float | Sequence[float] | np.ndarray, y: float | Sequence[float] | np.ndarray) -> bool:
        """Append point(s) and update the fit.

        Args:
            x, y: scalars or float ``(n,)`` arrays of equal length; non-finite pairs are ignored
                (and logged at DEBUG).

        Returns:
            Whether the hyper-parameters were re-optimised in this update.

        Raises:
            ValueError: ``x`` and ``y`` of different lengths.
        """
        x, y = np.atleast_1d(np.asarray(x, dtype=np.float64)), np.atleast_1d(np.asarray(y, dtype=np.float64))
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"x and y must be 1-D of equal length (got {x.shape}, {y.shape})")
        ok = np.isfinite(x) & np.isfinite(y)
        if self.log_x:
            ok &= x > -1.0
        if not ok.all():
            log.debug("ignoring %d non-finite point(s)", int((~ok).sum()))
        x, y = x[ok], y[ok]
        if not len(x):
            return False
        self.x = np.concatenate([self.x, x])[-self.window:]
        self.y = np.concatenate([self.y, y])[-self.window:]
        self.since_refit += len(x)
        optimise = self.prior is None and (self.gp is None or self.since_refit >= self.refit_every
                                           or len(self.x) < EARLY_REFITS * self.refit_every)
        self._fit(optimise)
        return optimise

    def set_data(self, x: np.ndarray, y: np.ndarray, optimise: bool) -> None:
        """Replace the points by the last ``window`` of ``(x, y)`` (float ``(n,)``, x increasing,
        finite) and fit: with hyper-parameter optimisation, or conditioned on them with the kernel
        as it is (a kernel restored from saved hyper-parameters).

        Raises:
            ValueError: no points, or x and y of different lengths.
        """
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != y.shape or x.ndim != 1 or not len(x):
            raise ValueError(f"x and y must be 1-D, non-empty and of equal length (got {x.shape}, {y.shape})")
        self.x, self.y = x[-self.window:], y[-self.window:]
        self.gp = None
        self._fit(optimise and self.prior is None)
        if not optimise:
            self.since_refit = 0

    def _fit(self, optimise: bool) -> None:
        if optimise or self.gp is None:
            u = self.u(self.x)
            if self.fixed_y_range is not None:
                ylo, yhi = self.fixed_y_range
            else:
                ylo, yhi = float(self.y.min()), float(self.y.max())
            uspan = float(u.max() - u.min())
            self._scale = (ylo, (yhi - ylo) or 1.0, float(u.min()), uspan or 1.0)
        kernel = self.kernel if (optimise or self.gp is None) else self.gp.kernel_
        gp = GaussianProcessRegressor(kernel, alpha=1e-10, optimizer="fmin_l_bfgs_b" if optimise else None,
                                      n_restarts_optimizer=self.n_restarts if optimise else 0,
                                      normalize_y=False, random_state=self.seed)
        self.gp = _fit_quiet(gp, self._inputs(self.x), self.normalise(self.y) - self._prior_mean(self.x))
        if optimise:
            self.kernel = self.gp.kernel_
            self.since_refit = 0
            self.refits += 1

    @property
    def kernel_(self) -> Kernel | None:
        """The kernel with the hyper-parameters in use (None before the first point)."""
        return None if self.gp is None else self.gp.kernel_

    # -- forecasts -----------------------------------------------------------------------------
    def forecast(self, x: np.ndarray, n_sigma: float = 2.0) -> Forecast:
        """Posterior mean and ``±n_sigma`` band at ``x`` (float ``(n,)``, series x units), value units.

        Raises:
            RuntimeError: no point yet.
        """
        if self.gp is None:
            raise RuntimeError("no data to forecast from")
        x = np.asarray(x, dtype=np.float64)
        mu, sd = self.gp.predict(self._inputs(x), return_std=True)
        mean = self.denormalise(mu + self._prior_mean(x))
        std = sd * self._scale[1]
        return Forecast(x, mean, std, mean - n_sigma * std, mean + n_sigma * std)

    def horizon(self, factor: float = 2.0) -> float:
        """Default forecast horizon (x units): the prior's extent, else ``factor`` × the span of the
        window beyond its last point."""
        if self.prior is not None:
            return max(self.prior.x_max, float(self.x[-1]))
        return float(self.x[-1] + factor * max(self.x[-1] - self.x[0], 1.0))

    def grid(self, horizon: float | None = None, n: int = 400) -> np.ndarray:
        """Forecast grid from the window's first x to ``horizon`` (default :meth:`horizon`), ``(n,)``."""
        return np.linspace(float(self.x[0]), self.horizon() if horizon is None else horizon, n)

    def crossing(self, threshold: float, direction: Direction = "below", horizon: float | None = None,
                 n_sigma: float = 2.0, n: int = 800) -> Crossing:
        """Forecast x at which the series reaches ``threshold`` (value units).

        The search starts at the last observed x; if the fitted mean there has already reached the
        threshold, the mean's crossing is searched from the window's start instead (already
        crossed). Each curve (mean, pessimistic and optimistic bound) gets its first crossing on a
        grid of ``n`` points up to ``horizon``; ``inf`` when it does not reach the threshold there.
        For ``"below"`` the pessimistic bound is ``mean − n_sigma σ``; for ``"above"`` ``mean + n_sigma σ``.
        """
        end = self.horizon() if horizon is None else float(horizon)
        last = float(self.x[-1])
        s = 1.0 if direction == "below" else -1.0
        now = self.forecast(np.array([last]), n_sigma)
        start = float(self.x[0]) if s * (now.mean[0] - threshold) <= 0 else last
        if end <= start:
            return Crossing(math.inf, math.inf, math.inf)
        f = self.forecast(np.linspace(start, end, n), n_sigma)
        pess, opt = (f.lower, f.upper) if direction == "below" else (f.upper, f.lower)
        return Crossing(first_crossing(f.x, f.mean, threshold, direction),
                        first_crossing(f.x, pess, threshold, direction),
                        first_crossing(f.x, opt, threshold, direction))


def _mean_curve(series: Sequence[tuple[np.ndarray, np.ndarray]], grid_u: np.ndarray, u: callable) -> np.ndarray:
    """Average of the series' piecewise-linear interpolants on ``grid_u`` (each only within its
    own x span; duplicate x averaged), held constant beyond the last covered grid point."""
    rows = []
    for x, y in series:
        ux = np.unique(x)
        uy = np.array([y[x == v].mean() for v in ux])
        rows.append(np.interp(grid_u, u(ux), uy, left=np.nan, right=np.nan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # grid points no series covers
        m = np.nanmean(np.array(rows), axis=0)
    ok = np.isfinite(m)
    return np.interp(grid_u, grid_u[ok], m[ok])


def learn_prior(series: Sequence[tuple[np.ndarray, np.ndarray]], *, log_x: bool = False, floor: float | None = None,
                direction: Direction = "below", n_grid: int = 600, n_restarts: int = 2, seed: int = 0) -> Prior:
    """Population prior for forecasting a new series from earlier ones of the same figure.

    Args:
        series: earlier series, each ``(x, y)`` float ``(n_i,)`` arrays (value units), e.g. the
            capacity check-ups of earlier cells. The series being forecast must not be among them.
        log_x: build the prior on ``log1p(x)`` (must match the :class:`TrendModel`).
        floor: hyper-parameters are fitted only on points not past this value (``y >= floor`` for a
            falling figure, ``<=`` for a rising one): the regime the forecast is about, not the deep
            tail after a knee. None: all points. The mean curve uses all points.
        direction: ``"below"`` for a falling figure (capacity), ``"above"`` for a rising one.
        n_grid: points of the tabulated mean and basis.
        n_restarts: random restarts of the L-BFGS-B maximisation of the summed log marginal
            likelihood.
        seed: random state of the restarts.

    Returns:
        A :class:`Prior`: mean curve, time-scale basis ``g = x·dm/dx`` (``dm/du`` on a log axis),
        kernel ``BasisKernel + ConstantKernel*RBF + WhiteKernel`` with the fitted hyper-parameters
        (fixed), normalisation range.

    Raises:
        ValueError: fewer than 2 usable series.
    """
    clean = []
    for x, y in series:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y) & ((x > -1.0) if log_x else True)
        if ok.sum() >= 2:
            o = np.argsort(x[ok], kind="stable")
            clean.append((x[ok][o], y[ok][o]))
    if len(clean) < 2:
        raise ValueError(f"a prior needs at least 2 earlier series with 2 finite points (got {len(clean)})")
    u = np.log1p if log_x else (lambda v: np.asarray(v, dtype=np.float64))
    ally = np.concatenate([y for _, y in clean])
    lo, hi = float(ally.min()), float(ally.max())
    span = (hi - lo) or 1.0
    # the mean curve (and the forecast horizon) ends where fewer than half the series still have
    # points: beyond, the average of the few longest series jumps as others drop out
    x_max = float(np.median([x[-1] for x, _ in clean]))
    x_min = float(min(x[0] for x, _ in clean))
    grid = np.linspace(u(x_min), u(x_max), n_grid)
    norm = [(x, (y - lo) / span) for x, y in clean]
    mean = _mean_curve(norm, grid, u)
    dm = np.gradient(mean, grid)
    g = dm * grid if not log_x else dm  # time scale: x·dm/dx; on log1p x a shift: dm/du
    ext = float(grid[-1] - grid[0]) or 1.0
    kernel = (BasisKernel(grid, g, 1e-2, (1e-6, 1e2))
              + ConstantKernel(1e-2, (1e-6, 1.0)) * RBF(0.2 * ext, (0.01 * ext, 10 * ext))
              + WhiteKernel(1e-4, (1e-8, 1e-1)))
    fits = []
    nfloor = None if floor is None else (floor - lo) / span
    for x, yn in norm:
        keep = np.ones(len(x), bool) if nfloor is None else (yn >= nfloor if direction == "below" else yn <= nfloor)
        if keep.sum() < 2:
            continue
        resid = yn[keep] - np.interp(u(x[keep]), grid, mean)
        fits.append(_fit_quiet(GaussianProcessRegressor(kernel, optimizer=None, alpha=1e-10), u(x[keep])[:, None], resid))
    if len(fits) < 2:
        raise ValueError("fewer than 2 earlier series have 2 points within the floor")

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        total, grad = 0.0, np.zeros_like(theta)
        for gp in fits:
            v, dv = gp.log_marginal_likelihood(theta, eval_gradient=True, clone_kernel=False)
            total -= v
            grad -= dv
        return total, grad

    bounds = kernel.bounds
    rng = np.random.default_rng(seed)
    starts = [kernel.theta] + [rng.uniform(bounds[:, 0], bounds[:, 1]) for _ in range(n_restarts)]
    best = None
    for th0 in starts:
        with np.errstate(all="ignore"):
            r = minimize(nll, th0, jac=True, method="L-BFGS-B", bounds=bounds)
        if np.isfinite(r.fun) and (best is None or r.fun < best.fun):
            best = r
    if best is None:
        raise ValueError("the prior's marginal likelihood could not be maximised (degenerate series)")
    fitted = kernel.clone_with_theta(best.x)
    fixed = _freeze(fitted)
    log.debug("prior from %d series: %s", len(fits), fixed)
    return Prior(grid, mean, fixed, (lo, hi), x_max, len(fits))


def _freeze(kernel: Kernel) -> Kernel:
    """The same kernel with every hyper-parameter's bounds set to ``"fixed"``."""
    return kernel.clone_with_theta(kernel.theta).set_params(**{h.name + "_bounds": "fixed" for h in kernel.hyperparameters})
