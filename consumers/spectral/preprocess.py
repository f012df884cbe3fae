"""Energy axes and edge-step normalisation of X-ray absorption spectra.

Normalisation follows the usual XAFS convention (Athena/Larch ``pre_edge``; B. Ravel & M. Newville,
J. Synchrotron Rad. 12, 537 (2005)): E0 at the maximum of the (lightly smoothed) first derivative,
a straight line fitted to the pre-edge region and one fitted to the post-edge region, edge step =
post(E0) - pre(E0), normalised mu = (mu - pre(E)) / step.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter1d


def energy_axis(descriptor: Mapping[str, Any], n_channels: int, key: str | None = None) -> np.ndarray | None:
    """Find the energy axis (eV) of a spectrum data key in an EventDescriptor.

    Looks in ``descriptor["configuration"][device]["data"]`` for ``key`` (when given) or else for the
    first key whose name ends in ``energy`` and whose value has ``n_channels`` entries (ophyd puts a
    detector's ``kind="config"`` signals there).

    Returns:
        float64 ``(n_channels,)`` or None when nothing matches.
    """
    for device in descriptor.get("configuration", {}).values():
        for name, value in (device.get("data") or {}).items():
            if (name == key) if key else name.lower().endswith("energy"):
                arr = np.asarray(value, dtype=np.float64).ravel()
                if arr.shape == (n_channels,):
                    return arr
    return None


def find_e0(energy: np.ndarray, mu: np.ndarray, smooth_ev: float = 1.5) -> float:
    """Edge energy (eV): position of the maximum of the Gaussian-smoothed first derivative.

    Args:
        energy: ``(n,)`` eV, increasing.
        mu: ``(n,)`` absorption.
        smooth_ev: Gaussian sigma of the smoothing, in eV (on a uniform resampling).
    """
    grid = np.arange(energy[0], energy[-1], max(0.1, float(np.median(np.diff(energy))) / 2))
    y = np.interp(grid, energy, mu)
    step = grid[1] - grid[0]
    d = np.gradient(gaussian_filter1d(y, smooth_ev / step), grid)
    return float(grid[int(np.argmax(d))])


def normalize_edge(energy: np.ndarray, mu: np.ndarray, e0: float | None = None,
                   pre: tuple[float, float] = (-150.0, -30.0), post: tuple[float, float] = (50.0, 300.0),
                   ) -> tuple[np.ndarray, float, float]:
    """Edge-step normalise one spectrum.

    Args:
        energy: float ``(n,)``, eV, increasing.
        mu: float ``(n,)``.
        e0: edge energy in eV; found with :func:`find_e0` when None.
        pre, post: fit ranges relative to E0, eV; clipped to the data, and shrunk towards the ends
            of the scan when fewer than 3 points fall inside (short XANES scans).

    Returns:
        ``(normalised mu (n,), e0 in eV, edge step)``.

    Raises:
        ValueError: when the edge step is not positive (no edge in the data).
    """
    energy = np.asarray(energy, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    if e0 is None:
        e0 = find_e0(energy, mu)

    def window(lo: float, hi: float, at_start: bool) -> np.ndarray:
        sel = (energy >= e0 + lo) & (energy <= e0 + hi)
        if sel.sum() < 3:
            n = max(3, len(energy) // 10)
            sel = np.zeros_like(sel)
            sel[:n] = at_start
            sel[-n:] = not at_start
        return sel

    pre_sel, post_sel = window(*pre, at_start=True), window(*post, at_start=False)
    pre_line = np.polyfit(energy[pre_sel], mu[pre_sel], 1)
    post_line = np.polyfit(energy[post_sel], mu[post_sel], 1)
    step = float(np.polyval(post_line, e0) - np.polyval(pre_line, e0))
    if not step > 0:
        raise ValueError(f"no absorption edge: edge step {step:.3g} at E0 = {e0:.1f} eV")
    return (mu - np.polyval(pre_line, energy)) / step, e0, step


def resample(energy: np.ndarray, mu: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation onto ``grid`` (eV).

    Raises:
        ValueError: when ``grid`` reaches outside ``energy``.
    """
    if grid[0] < energy[0] - 1e-6 or grid[-1] > energy[-1] + 1e-6:
        raise ValueError(f"grid {grid[0]:.1f}-{grid[-1]:.1f} eV reaches outside the data {energy[0]:.1f}-{energy[-1]:.1f} eV")
    return np.interp(grid, energy, mu)
