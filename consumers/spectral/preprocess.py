"""Signal axes of spectra and patterns, edge-step normalisation of X-ray absorption spectra, and
the generic normalisations (``max``, ``area``, ``l2``) for other signals.

Axis kinds (:data:`AXIS_UNITS`): ``energy`` (eV; absorption and emission spectra), ``two_theta``
(deg; powder diffraction), ``q`` (1/angstrom; scattering, PDF), ``d`` (angstrom), ``wavelength``
(nm; optical, Raman in absolute wavelength) and ``pixel`` (px, the channel index, when nothing
declares an axis). :func:`signal_axis` finds the axis of a data key in an EventDescriptor.

Normalisation follows the usual XAFS convention (Athena/Larch ``pre_edge``; B. Ravel & M. Newville,
J. Synchrotron Rad. 12, 537 (2005)): E0 at the maximum of the (lightly smoothed) first derivative,
a straight line fitted to the pre-edge region and one fitted to the post-edge region, edge step =
post(E0) - pre(E0), normalised mu = (mu - pre(E)) / step.

:class:`Preprocessor` applies the same steps to pages of spectra during a run (one E0 per run,
vectorised line fits), plus an optional energy window, first derivative and repair of isolated
non-finite channels, as configured per consumer by :class:`PreprocessParams`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
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


AxisKind = Literal["energy", "two_theta", "q", "d", "wavelength", "pixel"]

#: Units each axis kind is published in.
AXIS_UNITS: dict[str, str] = {"energy": "eV", "two_theta": "deg", "q": "1/angstrom", "d": "angstrom",
                              "wavelength": "nm", "pixel": "px"}

#: Units converted to the kind's published units on reading (factor to multiply by).
_TO_PUBLISHED: dict[str, dict[str, float]] = {
    "energy": {"ev": 1.0, "kev": 1e3},
    "two_theta": {"deg": 1.0, "degree": 1.0, "degrees": 1.0},
    "q": {"1/angstrom": 1.0, "1/a": 1.0, "a^-1": 1.0, "angstrom^-1": 1.0, "1/nm": 0.1, "nm^-1": 0.1},
    "d": {"angstrom": 1.0, "a": 1.0, "nm": 10.0},
    "wavelength": {"nm": 1.0, "angstrom": 0.1, "a": 0.1, "um": 1e3},
}


def axis_kind_of(name: str) -> str | None:
    """Axis kind a configuration key or ``dims`` name denotes by its ending (``xas_energy`` ->
    ``energy``, ``det_tth`` / ``two_theta`` -> ``two_theta``, ``*_q`` -> ``q``, ``*_d`` /
    ``d_spacing`` -> ``d``, ``*wavelength`` -> ``wavelength``), or None."""
    n = name.lower()
    if n.endswith("energy"):
        return "energy"
    if n.endswith(("tth", "two_theta", "2theta")):
        return "two_theta"
    if n == "q" or n.endswith("_q"):
        return "q"
    if n == "d" or n.endswith(("_d", "d_spacing")):
        return "d"
    if n.endswith("wavelength"):
        return "wavelength"
    return None


@dataclass(frozen=True)
class SignalAxis:
    """The axis of a spectrum's channels.

    Attributes:
        kind: one of :data:`AXIS_UNITS`; values: float64 ``(n_channels,)`` in ``units``;
        units: the kind's published units; source: where it came from (configuration key,
            ``config``, or ``channel index``).
    """

    kind: str
    values: np.ndarray
    units: str
    source: str


def signal_axis(descriptor: Mapping[str, Any], data_key: str, n_channels: int, key: str | None = None,
                kind: str | None = None) -> SignalAxis | None:
    """Find the signal axis of ``data_key`` in an EventDescriptor.

    Looks in ``descriptor["configuration"][device]["data"]`` (ophyd's ``kind="config"`` signals)
    for, in order: ``key`` when given; the name in the data key's ``dims`` (event-model ``DataKey``)
    or a key ending in ``_<dim>``; else the first key whose ending names an axis kind
    (:func:`axis_kind_of`). Only values with ``n_channels`` entries count. Units come from the
    device's ``data_keys[name]["units"]`` when present (``keV`` becomes eV, ``1/nm`` 1/angstrom, ...).

    Args:
        kind: force the axis kind (config ``axis_kind``) instead of guessing it from the name.

    Returns:
        the axis, or None when nothing matches (the caller falls back to ``pixel``).

    Raises:
        ValueError: a units string the kind cannot be converted from.
    """
    dims = [str(d) for d in ((descriptor.get("data_keys", {}).get(data_key) or {}).get("dims") or ())]
    found = []
    for device in (descriptor.get("configuration") or {}).values():
        data = device.get("data") or {}
        meta = device.get("data_keys") or {}
        for name, value in data.items():
            try:
                arr = np.asarray(value, dtype=np.float64).ravel()
            except (TypeError, ValueError):
                continue
            if arr.shape != (n_channels,):
                continue
            if key:
                rank = 0 if name == key else None
            elif any(name == d or name.endswith("_" + d) for d in dims):
                rank = 1
            else:
                rank = 2 if axis_kind_of(name) else None
            if rank is not None:
                found.append((rank, name, arr, (meta.get(name) or {}).get("units")))
    if not found:
        return None
    _, name, arr, units = min(found, key=lambda f: f[0])
    kind = kind or axis_kind_of(name) or next((axis_kind_of(d) for d in dims if axis_kind_of(d)), None) or "pixel"
    published = AXIS_UNITS[kind]
    if units and kind in _TO_PUBLISHED:
        factor = _TO_PUBLISHED[kind].get(str(units).strip().lower().replace("å", "angstrom").replace(" ", ""))
        if factor is None:
            raise ValueError(f"axis {name!r} has units {units!r}, not convertible to {published} for a {kind} axis")
        arr = arr * factor
    return SignalAxis(kind, arr, published, name)


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

    pre_sel, post_sel = _fit_range(energy, e0, *pre, at_start=True), _fit_range(energy, e0, *post, at_start=False)
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


class PreprocessParams(BaseModel):
    """Per-run preprocessing of spectra, shared by the spectral consumers (``params.preprocess``).

    Order: non-finite repair -> edge normalisation (on the full axis, so the pre-/post-edge fit
    ranges may lie outside the analysed window) -> energy window -> first derivative.
    """

    model_config = ConfigDict(extra="forbid")

    energy_key: str | None = None
    """Configuration key holding the signal axis; default: the key named by the data key's ``dims``,
    else any ``*energy``, ``*_tth``/``*two_theta``, ``*_q``, ``*_d``, ``*wavelength`` key of matching
    length (see :func:`signal_axis`). (The name is kept from when only energy axes existed.)"""
    axis_kind: AxisKind | None = None
    """Kind of the signal axis; default: from the key's name (``pixel`` when there is no axis)."""
    energy_range: tuple[float, float] | None = None
    """First and last channel value (in the kind's units: eV for energy) of an evenly spaced axis,
    used when the descriptor carries no axis; its kind is ``axis_kind`` (default energy)."""
    normalize: Literal["auto", "none", "pre_edge", "edge", "edge_step", "max", "area", "l2"] = "auto"
    """Per spectrum: ``pre_edge`` subtracts the pre-edge line, ``edge``/``edge_step`` also divides by
    the edge step (absorption spectra on an energy axis only); ``max``, ``area`` (integral over the
    axis) and ``l2`` divide by that. ``auto``: ``none`` on energy axes (absorption spectra are often
    normalised upstream; choose ``edge_step`` for raw mu), ``max`` on every other kind."""
    e0: float | None = None
    """Edge energy (eV) for the whole run; default: found on the mean of the first page of spectra."""
    pre_edge: tuple[float, float] = (-150.0, -30.0)
    """Pre-edge fit range relative to E0, eV."""
    pre_edge_degree: Literal[0, 1] = 1
    """1: straight pre-edge line (K-edge XAFS convention); 0: constant offset, for short pre-edge
    ranges where a fitted slope would be extrapolated far (soft X-ray L edges, STXM)."""
    post_edge: tuple[float, float] = (50.0, 300.0)
    """Post-edge fit range relative to E0, eV."""
    energy_window: tuple[float, float] | None = None
    """Analyse only channels with axis values in ``[lo, hi]`` (eV for energy, deg for 2-theta, ...)."""
    derivative: bool = False
    """Analyse the first derivative d(mu)/dE (per eV) instead of mu."""
    max_nonfinite_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Spectra with at most this fraction of non-finite channels are repaired by linear interpolation;
    others are skipped and counted (reason ``nonfinite``)."""

    @model_validator(mode="after")
    def _ordered(self) -> PreprocessParams:
        for name in ("pre_edge", "post_edge", "energy_window", "energy_range"):
            lo_hi = getattr(self, name)
            if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{name} must be (low, high) with low < high")
        return self


def _line_fits(energy: np.ndarray, y: np.ndarray, sel: np.ndarray, degree: int = 1) -> np.ndarray:
    """Least-squares lines (``degree`` 1) or constants (0, slope 0) through ``y[:, sel]`` for every
    row at once: ``(n, 2)`` (slope, offset)."""
    if degree == 0:
        return np.stack([np.zeros(len(y)), y[:, sel].mean(axis=1)], axis=1)
    a = np.stack([energy[sel], np.ones(int(sel.sum()))], axis=1)
    return np.linalg.lstsq(a, y[:, sel].T, rcond=None)[0].T


def _fit_range(energy: np.ndarray, e0: float, lo: float, hi: float, at_start: bool) -> np.ndarray:
    sel = (energy >= e0 + lo) & (energy <= e0 + hi)
    if sel.sum() < 3:  # short scan: use the first / last tenth of the channels (as normalize_edge)
        n = max(3, len(energy) // 10)
        sel = np.zeros(len(energy), dtype=bool)
        sel[:n] = at_start
        sel[-n:] = not at_start
    return sel


def repair_nonfinite(x: np.ndarray, max_fraction: float) -> np.ndarray:
    """Fill non-finite channels by linear interpolation in rows with at most ``max_fraction`` of them.

    Args:
        x: float ``(n, c)``; modified in place.
        max_fraction: rows with more non-finite channels are left as they are.

    Returns:
        bool ``(n,)``: rows that are all finite afterwards.
    """
    ok = np.isfinite(x).all(axis=1)
    if ok.all():
        return ok
    bad = ~np.isfinite(x)
    counts = bad.sum(axis=1)
    fixable = np.flatnonzero((counts > 0) & (counts <= max_fraction * x.shape[1]) & (counts < x.shape[1] - 1))
    idx = np.arange(x.shape[1])
    for i in fixable:
        good = ~bad[i]
        x[i, bad[i]] = np.interp(idx[bad[i]], idx[good], x[i, good])
    return np.isfinite(x).all(axis=1)


class Preprocessor:
    """Applies :class:`PreprocessParams` to pages of spectra, the same way for every page of a run.

    Edge normalisation is vectorised: one E0 for the run (configured, or found once on the mean of
    the first usable page with :func:`find_e0`), then per-spectrum straight lines fitted to the
    pre- and post-edge ranges (Athena/Larch ``pre_edge`` convention, as :func:`normalize_edge`),
    so the cost per spectrum is constant.

    Args:
        params: the preprocessing parameters.
        energy: float64 ``(c,)`` axis values of the raw channels (eV for ``kind="energy"``), or None
            when the run has no axis (then the axis is the channel index, kind ``pixel``).
        kind: the axis kind (:data:`AXIS_UNITS`).

    Raises:
        ValueError: edge normalisation on an axis that is not energy, or a window that selects
            fewer than 3 channels.
    """

    def __init__(self, params: PreprocessParams, energy: np.ndarray | None, n_channels: int, kind: str = "energy"):
        self.params = params
        self.kind = kind if energy is not None else "pixel"
        mode = params.normalize
        if mode == "auto":
            mode = "none" if self.kind == "energy" else "max"
        self.mode = "edge" if mode == "edge_step" else mode
        """Normalisation applied: ``none``, ``pre_edge``, ``edge``, ``max``, ``area`` or ``l2``."""
        self.drop_reason = "no_edge" if self.mode == "edge" else "no_signal"
        """Skip reason for spectra the normalisation cannot divide (non-positive step, max, area, norm)."""
        if self.mode in ("pre_edge", "edge") and self.kind != "energy":
            raise ValueError(f"edge-step normalisation ({params.normalize}) is for absorption spectra on an energy "
                             f"axis; this run's axis is {self.kind}: use none, max, area or l2")
        self.raw_axis = np.arange(n_channels, dtype=np.float64) if energy is None else np.asarray(energy, dtype=np.float64)
        self.raw_energy = self.raw_axis if self.kind == "energy" else None
        if self.raw_energy is None and self.mode in ("pre_edge", "edge"):
            raise ValueError("edge normalisation needs an energy axis; none found in the descriptor")
        self.window = np.ones(n_channels, dtype=bool)
        if params.energy_window is not None:
            lo, hi = params.energy_window
            self.window = (self.raw_axis >= lo) & (self.raw_axis <= hi)
            if self.window.sum() < 3:
                raise ValueError(f"window {lo}-{hi} selects {int(self.window.sum())} channels")
        self.full_window = bool(self.window.all())
        """No channel is cut (the window is the whole axis): pages are not re-indexed."""
        self.axis = self.raw_axis[self.window]
        """Values of the analysed channels ``(n_out,)`` in the axis kind's units."""
        self.energy = None if self.raw_energy is None else self.axis
        self.e0 = params.e0

    @property
    def n_out(self) -> int:
        """Channels per preprocessed spectrum."""
        return int(self.window.sum())

    def __call__(self, x: np.ndarray, e0: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Preprocess a page.

        Args:
            x: float ``(n, c)`` raw spectra.
            e0: edge energy (eV) of the run's edge normalisation, when known (a consumer keeps it
                in a buffer); else :attr:`e0`, found on the first page that needs it.

        Returns:
            ``(y, ok, no_edge)``: ``y`` float64 ``(n, n_out)`` (rows where ``ok`` is False are
            undefined), ``ok`` bool ``(n,)`` usable rows, ``no_edge`` bool ``(n,)`` rows dropped
            because their edge step was not positive (``normalize="edge"`` only).
        """
        x = np.array(x, dtype=np.float64)
        ok = repair_nonfinite(x, self.params.max_nonfinite_fraction)
        no_edge = np.zeros(len(x), dtype=bool)
        if e0 is not None:
            self.e0 = e0
        if self.mode in ("pre_edge", "edge") and ok.any():
            x, no_edge = self._normalize(x, ok)
            ok &= ~no_edge
        y = x if self.full_window else x[:, self.window]
        if self.mode in ("max", "area", "l2"):
            scale = self.signal_scale(np.where(ok[:, None], y, 0.0))
            no_edge = ok & ~(scale > 0)
            ok &= ~no_edge
            y = y / np.where(scale > 0, scale, 1.0)[:, None]
        if self.params.derivative:
            y = np.gradient(y, self.axis, axis=1)
        return y, ok, no_edge

    def signal_scale(self, y: np.ndarray) -> np.ndarray:
        """Per-row divisor ``(n,)`` of the ``max`` / ``area`` / ``l2`` normalisation of analysed
        spectra ``y`` ``(n, n_out)`` (``area``: trapezoid integral over the axis, absolute spacing);
        the maximum for the other modes. Also scales learned components the same way."""
        if self.mode == "area":
            return np.abs(np.trapezoid(y, self.axis, axis=1))
        if self.mode == "l2":
            return np.linalg.norm(y, axis=1)
        return y.max(axis=1)

    def _normalize(self, x: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e = self.raw_energy
        if self.e0 is None:
            self.e0 = find_e0(e, x[ok].mean(axis=0))
        safe = np.where(ok[:, None], x, 0.0)
        pre, step = edge_lines(e, safe, self.e0, self.params.pre_edge, self.params.post_edge,
                               self.params.pre_edge_degree)
        out = safe - (pre[:, :1] * e + pre[:, 1:])
        no_edge = np.zeros(len(x), dtype=bool)
        if self.mode == "edge":
            no_edge = ok & ~(step > 0)
            out /= np.where(step > 0, step, 1.0)[:, None]
        return out, no_edge

    def edge_step(self, y: np.ndarray, e0: float) -> np.ndarray:
        """Edge step ``(n,)`` of preprocessed, non-derivative spectra ``y`` ``(n, n_out)`` at ``e0``
        (eV), with this run's fit ranges on the analysed channels. Linear in ``y``: the step of a
        mixture is the abundance-weighted sum of its components' steps."""
        p = self.params
        return edge_lines(self.energy, y, e0, p.pre_edge, p.post_edge, p.pre_edge_degree)[1]


def edge_lines(energy: np.ndarray, y: np.ndarray, e0: float, pre: tuple[float, float],
               post: tuple[float, float], pre_degree: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pre-edge lines and edge steps of many spectra at once.

    Args:
        energy: ``(c,)`` eV; y: ``(n, c)``; e0: eV; pre, post: fit ranges relative to ``e0`` (eV),
            replaced by the first / last tenth of the channels where fewer than 3 fall inside;
        pre_degree: 1 for a pre-edge line, 0 for a constant.

    Returns:
        ``(pre-edge lines (n, 2) as (slope, offset), edge steps (n,))``.
    """
    pre_sel = _fit_range(energy, e0, *pre, at_start=True)
    post_sel = _fit_range(energy, e0, *post, at_start=False)
    pre_line = _line_fits(energy, y, pre_sel, pre_degree)
    post_line = _line_fits(energy, y, post_sel)
    step = (post_line[:, 0] - pre_line[:, 0]) * e0 + post_line[:, 1] - pre_line[:, 1]
    return pre_line, step
