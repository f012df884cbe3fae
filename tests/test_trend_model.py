"""The GP trend model (beamlens.consumers.trend_model) against scikit-learn batch fits, the paper's
kernel parameterisation, windows/refits, and crossings."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel

from beamlens.consumers.trend_model import (BasisKernel, TrendModel, first_crossing, learn_prior, paper_kernel)


def test_paper_kernel_maps_theta_l_to_sklearn_length_scale():
    """k(x, x') = θf² exp(−‖x − x'‖² / θl) equals sklearn's ConstantKernel(θf²) * RBF(ℓ) with
    ℓ = sqrt(θl / 2), because RBF is exp(−d² / (2ℓ²))."""
    theta_f, theta_l = 0.7, 3.2
    k = paper_kernel(theta_f, theta_l)
    assert k.k2.length_scale == pytest.approx(math.sqrt(theta_l / 2))
    assert k.k1.constant_value == pytest.approx(theta_f**2)
    x = np.linspace(-2, 3, 9)[:, None]
    paper = theta_f**2 * np.exp(-((x - x.T) ** 2) / theta_l)
    np.testing.assert_allclose(k(x), paper, rtol=1e-12)
    # and the naive reading (length_scale = θl) is wrong
    assert not np.allclose((ConstantKernel(theta_f**2) * RBF(theta_l))(x), paper)


def _series(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0, 100, n))
    y = 1.0 - 0.002 * x - 1e-5 * x**2 + rng.normal(0, 0.004, n)
    return x, y


@pytest.mark.parametrize("log_x", [False, True])
def test_fit_equals_sklearn_batch_fit_on_the_same_window(log_x):
    x, y = _series()
    model = TrendModel(log_x=log_x, window=15, refit_every=4)
    for xi, yi in zip(x, y):
        model.add(xi, yi)
    wx, wy = x[-15:], y[-15:]
    np.testing.assert_array_equal(model.x, wx)
    # the same kernel (hyper-parameters in use), the same normalisation, a plain sklearn batch fit
    u = np.log1p(wx) if log_x else wx
    ylo, yspan, ulo, uspan = model._scale
    ref = GaussianProcessRegressor(model.kernel_, optimizer=None, alpha=1e-10, normalize_y=False)
    ref.fit(((u - ulo) / uspan)[:, None], (wy - ylo) / yspan)
    grid = np.linspace(x[0], x[-1] + 30, 57)
    ug = np.log1p(grid) if log_x else grid
    mu, sd = ref.predict(((ug - ulo) / uspan)[:, None], return_std=True)
    f = model.forecast(grid)
    np.testing.assert_allclose(f.mean, mu * yspan + ylo, atol=1e-6, rtol=0)
    np.testing.assert_allclose(f.std, sd * yspan, atol=1e-6, rtol=0)


def test_refit_every_k_points_and_fixed_hyperparameters_between():
    x, y = _series(30)
    model = TrendModel(window=100, refit_every=5)
    flags = [model.add(xi, yi) for xi, yi in zip(x, y)]
    assert flags[0] is True
    # every point while the series is short (< 3 x 5 points), then every 5th
    assert [i for i, f in enumerate(flags) if f] == list(range(14)) + [18, 23, 28]
    # between refits the kernel is the last optimised one
    model2 = TrendModel(window=100, refit_every=5)
    model2.add(x[:15], y[:15])  # one refit over 15 points
    k_before = model2.kernel_
    for xi, yi in zip(x[15:19], y[15:19]):
        assert model2.add(xi, yi) is False
        assert model2.kernel_ == k_before
    assert model2.add(x[19], y[19]) is True


def test_refit_result_equals_sklearn_optimised_fit():
    x, y = _series(20)
    model = TrendModel(window=50, refit_every=1, n_restarts=0)
    model.add(x, y)
    ylo, yspan, ulo, uspan = model._scale
    from beamlens.consumers.trend_model import default_kernel
    ref = GaussianProcessRegressor(default_kernel(), alpha=1e-10, n_restarts_optimizer=0, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # as the model does: a bound reached
        ref.fit(((x - ulo) / uspan)[:, None], (y - ylo) / yspan)
    np.testing.assert_allclose(model.kernel_.theta, ref.kernel_.theta, rtol=1e-6)


def test_window_bounds_the_points_conditioned_on():
    x, y = _series(60)
    model = TrendModel(window=10, refit_every=100)
    model.add(x, y)
    assert len(model.x) == 10 and len(model.gp.X_train_) == 10


def test_nonfinite_points_are_ignored_and_shapes_checked():
    model = TrendModel()
    model.add([0.0, 1.0, np.nan, 3.0], [1.0, np.inf, 0.5, 0.9])
    assert list(model.x) == [0.0, 3.0]
    with pytest.raises(ValueError, match="equal length"):
        model.add([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        TrendModel(window=1)
    with pytest.raises(RuntimeError):
        TrendModel().forecast(np.array([1.0]))


def test_first_crossing():
    x = np.array([0.0, 10.0, 20.0, 30.0])
    assert first_crossing(x, np.array([1.0, 0.9, 0.7, 0.6]), 0.8) == pytest.approx(15.0)
    assert first_crossing(x, np.array([1.0, 0.9, 0.85, 0.81]), 0.8) == math.inf
    assert first_crossing(x, np.array([0.1, 0.2, 0.6, 0.9]), 0.5, "above") == pytest.approx(17.5)
    assert first_crossing(x, np.array([0.7, 0.9, 0.6, 0.5]), 0.8) == 0.0


def test_linear_trend_forecasts_a_crossing_with_a_band_around_it():
    """A falling straight line with noise: the default kernel (SE + linear + white) extrapolates the
    slope, so the mean crossing is near the true one and lies inside the band; an unreachable
    threshold gives inf."""
    rng = np.random.default_rng(3)
    x = np.arange(0.0, 60.0, 2.0)
    y = 1.0 - 0.004 * x + rng.normal(0, 0.003, len(x))
    model = TrendModel(refit_every=1)
    model.add(x, y)
    c = model.crossing(0.6, horizon=300)  # truth: x = 100
    assert c.mean == pytest.approx(100, abs=12)
    assert c.pessimistic <= c.mean <= c.optimistic
    assert c.covers(100.0)
    assert model.crossing(-5.0, horizon=200).mean == math.inf


def test_prior_is_learned_from_earlier_series_and_forecasts_their_knee():
    """Earlier series share a knee shape at different time scales; the prior's mean curve and its
    time-scale term let a new series' early points forecast the crossing after the knee, where a
    line through the last points overshoots."""
    rng = np.random.default_rng(5)

    def cell(scale):
        x = np.arange(0.0, 2400.0, 160.0)
        t = x / scale
        y = 1 - 0.12 * t - 0.5 * np.clip(t - 0.9, 0, None) ** 2 * 4 + rng.normal(0, 0.003, len(x))
        return x, y

    earlier = [cell(s) for s in rng.uniform(900, 1300, 12)]
    prior = learn_prior(earlier, floor=0.6)
    assert prior.n_series == 12 and prior.x_max == pytest.approx(2240.0)
    assert isinstance(prior.kernel.k1.k1, BasisKernel)
    assert all(h.fixed for h in prior.kernel.hyperparameters)
    x, y = cell(1100.0)
    truth = first_crossing(x, y, 0.8)
    early = x <= 0.6 * truth
    model = TrendModel(prior=prior)
    assert model.add(x[early], y[early]) is False  # hyper-parameters stay the prior's
    c = model.crossing(0.8)
    lin = np.polyfit(x[early][-3:], y[early][-3:], 1)
    lin_cross = (0.8 - lin[1]) / lin[0]
    assert abs(c.mean - truth) < abs(lin_cross - truth)
    assert c.covers(truth)
    with pytest.raises(ValueError, match="at least 2"):
        learn_prior([earlier[0]])
