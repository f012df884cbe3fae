"""Blind unmixing agrees with a careful batch fit (scikit-learn NMF, several starts, run to
convergence) on real data of two kinds: a powder-diffraction temperature ramp (BaTiO3, no axis in
the files: pixel axis, max-normalised) and the Fe L-edge STXM image (energy axis). Both go through
the real Router point by point; the comparison is on the consumer's published results."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning

from beamlens.consumers.spectral.nmf import cosine
from beamlens.daemon.sim.datasets import SpectralMap, stxm_map

from real_data import batio3_ramp, needs_batio3
from spectral_replay import replay

SK_STARTS = [("nndsvda", 0), ("nndsvd", 0), ("random", 0), ("random", 1), ("random", 2)]


def careful_batch_fit(x: np.ndarray, k: int, max_iter: int = 5000) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """scikit-learn NMF (coordinate descent) from each of :data:`SK_STARTS`, run to convergence.

    On both data sets the starts converge to losses within 1e-3 of each other (relative) but not
    always to the same factors (NMF's rotational ambiguity: on the STXM pixels the random starts
    reach a loss 2e-6 lower with an Fe(III) component of cosine 0.92 to the NNDSVD-a one). The
    reference is therefore the fit from scikit-learn's default start, NNDSVD-a, checked to be
    within 1e-3 of the best loss of all starts.

    Returns:
        ``(W (n, k), H (k, c))`` of the NNDSVD-a start, and the losses of every start.
    """
    fits = []
    for init, seed in SK_STARTS:
        model = NMF(k, init=init, solver="cd", max_iter=max_iter, tol=1e-10, random_state=seed)
        with warnings.catch_warnings():  # the valley is flat: cd creeps along it to max_iter
            warnings.simplefilter("ignore", ConvergenceWarning)
            w = model.fit_transform(x)
        fits.append((float(np.linalg.norm(x - w @ model.components_)), w, model.components_))
    losses = [f[0] for f in fits]
    loss, w, h = fits[0]
    assert loss <= (1 + 1e-3) * min(losses), losses
    return w, h, losses


def unit_max(w: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = h.max(axis=1)
    return w * s, h / s[:, None]


def matched(h: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian match on cosine: ``(order of ref rows for h's rows, cosines)``."""
    c = np.array([[cosine(a, b) for b in ref] for a in h])
    rows, cols = linear_sum_assignment(-c)
    return cols, c[rows, cols]


def boundaries(dominant: np.ndarray) -> list[int]:
    """Steps at which the dominant component changes."""
    return [i for i in range(1, len(dominant)) if dominant[i] != dominant[i - 1]]


@pytest.fixture(scope="module")
def bto():
    temps, raw = batio3_ramp()
    data = SpectralMap("BaTiO3 XRD ramp", np.arange(raw.shape[1], dtype=np.float64), raw[None].astype(np.float32),
                       temps, np.zeros(1), "K", "counts")
    r = replay("consumers:\n  - {name: unmix, class: unmixing, params: {n_components: 4}}\n", data, axis_key=None)
    return temps, raw, r


@needs_batio3
def test_diffraction_ramp_phase_boundaries_match_the_batch_fit_within_one_step(bto):
    temps, raw, r = bto
    x = raw / raw.max(axis=1, keepdims=True)  # what normalize: auto (max) does off an energy axis
    wb, hb, losses = careful_batch_fit(x, 4)
    wb, hb = unit_max(wb, hb)
    h = r.get("unmix", "components")
    w = np.stack([r.get("unmix", f"abundance_{j + 1}").ravel() for j in range(4)], axis=1)
    assert np.allclose(h.max(axis=1), 1.0)  # published at unit max: abundances are pattern fractions
    order, cos = matched(h, hb)
    assert cos.min() >= 0.99, cos
    ours = boundaries(order[np.argmax(w, axis=1)])
    batch = boundaries(np.argmax(wb, axis=1))
    assert len(ours) == len(batch) == 3, (temps[ours], temps[batch])
    assert max(abs(a - b) for a, b in zip(ours, batch)) <= 1, (temps[ours], temps[batch])
    # the known BaTiO3 transitions (rhombohedral-orthorhombic-tetragonal-cubic), as marked in the
    # data's source: 185, 280, 400 K; the batch fit itself is within 10 K (two steps) of them
    assert np.abs(temps[ours] - np.array([185.0, 280.0, 400.0])).max() <= 15.0
    err = float(r.get("unmix", "reconstruction_error")[0])
    assert err <= (1 + 1e-3) * min(losses) / np.linalg.norm(x)
    assert r.store.summaries()[0]["consumers"]["unmix"]["buffers"]["components"]["axis"] == "pixel"


def test_stxm_components_match_the_batch_fit():
    data = stxm_map()
    e = data.energy
    od = data.spectra.reshape(-1, len(e)).astype(np.float64)
    jump = od[:, (e > 707) & (e < 711)].max(axis=1) - od[:, e < 705].mean(axis=1)
    idx = np.flatnonzero(jump > 0.3)[::4]
    sub = SpectralMap("Fe-rich pixels", e, od[idx][None].astype(np.float32), np.arange(len(idx)), np.zeros(1), "px", "OD")
    r = replay("consumers:\n  - {name: unmix, class: unmixing, params: {n_components: 2, "
               "preprocess: {normalize: pre_edge, pre_edge_degree: 0}}}\n", sub)
    x = od[idx] - od[idx][:, e < 703].mean(axis=1, keepdims=True)  # the same constant pre-edge offset
    wb, hb, _ = careful_batch_fit(np.maximum(x, 0.0), 2, max_iter=3000)  # scikit-learn needs x >= 0
    h = r.get("unmix", "components")
    order, cos = matched(h, hb)
    assert cos.min() >= 0.99, cos
    w = np.stack([r.get("unmix", f"abundance_{j + 1}").ravel() for j in range(2)], axis=1)
    wb, _ = unit_max(wb, hb)
    w, _ = unit_max(w, h)
    same = float(np.mean(order[np.argmax(w, axis=1)] == np.argmax(wb, axis=1)))
    assert same >= 0.95, same
