"""The two spectral maps the simulated beamline replays.

1. :func:`stxm_map`: a real Fe L2,3-edge STXM spectral image (ALS 11.0.2.2, B. Toner & M. Marcus,
   2007; 123 energies x 150 x 150 px, 0.08 um steps), converted to optical density
   OD = -ln(I / I0). Vendored with its licence in ``daemon/sim/data/fe_l2p_stxm`` (see MANIFEST.md).
2. :func:`corroding_steel_map`: a 21 x 21 Fe K-edge XAFS map of a corroding steel cross-section
   built from real reference spectra (Hansel 2001 series, APS 13-ID-C, one beamline so one energy
   calibration): an Fe metal core, a magnetite layer and a goethite rim, with known fractions and
   Gaussian noise. Its exact fractions are the ground truth analyses are scored against.
3. :func:`reaction_path_map` and :func:`dominant_phase_map`: test maps from the same references, a
   curved four-phase reaction path (progress ordering) and a map dominated by one phase (manifold
   weighting).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np

from beamlens.consumers.spectral.preprocess import normalize_edge, resample
from beamlens.consumers.spectral.references import FE_K_DIR, read_reference

STXM_DIR = Path(str(files("beamlens.daemon.sim") / "data" / "fe_l2p_stxm"))

#: The corroding-steel phases: name -> reference file (relative to the Fe K-edge data folder).
STEEL_PHASES: dict[str, str] = {
    "Fe metal": "xasdatalibrary/Hansel2001_Fe_foil_xanes_001.xdi",
    "magnetite": "xasdatalibrary/Hansel2001_magnetite_xanes_001.xdi",
    "goethite": "xasdatalibrary/Hansel2001_goethite_xanes_003.xdi",
}


@dataclass
class SpectralMap:
    """A spectral image to replay point by point.

    Attributes:
        name: short label, used as the run's ``sample`` metadata.
        energy: float64 ``(n_channels,)``, eV.
        spectra: float32 ``(ny, nx, n_channels)``.
        x, y: float64 ``(nx,)``, ``(ny,)`` stage positions in ``units``.
        units: stage position units (``"um"`` or ``"mm"``).
        value_units: units of the spectra (``"OD"``, ``"normalized mu"``).
        fractions: ground-truth abundances ``(ny, nx, k)`` summing to 1 (simulated maps only).
        components: ground-truth component spectra ``(k, n_channels)`` (simulated maps only).
        component_names: names of the components.
        progress: ground-truth reaction progress ``(ny, nx)`` in [0, 1] (simulated maps only).
    """

    name: str
    energy: np.ndarray
    spectra: np.ndarray
    x: np.ndarray
    y: np.ndarray
    units: str
    value_units: str
    fractions: np.ndarray | None = None
    components: np.ndarray | None = None
    component_names: list[str] = field(default_factory=list)
    progress: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.spectra.shape[0], self.spectra.shape[1]

    def region(self, y: slice, x: slice) -> SpectralMap:
        """A rectangular sub-map (e.g. for a fast test scan)."""
        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[y, x]
        return SpectralMap(self.name, self.energy, self.spectra[y, x], self.x[x], self.y[y], self.units,
                           self.value_units, cut(self.fractions), self.components, self.component_names,
                           cut(self.progress))


def stxm_map() -> SpectralMap:
    """The real Fe L-edge STXM image as optical density, ``(150, 150, 123)`` float32."""
    with np.load(STXM_DIR / "toner_71214098_Fe2p_stxm_stack.npz") as z:
        counts, i0 = z["counts"], z["i0_counts"]
        energy, x, y = z["energy_eV"], z["x_um"], z["y_um"]
    od = -np.log(np.clip(counts, 1e-3, None) / i0[:, None, None])
    return SpectralMap("Fe L-edge STXM, hydrothermal plume particles (Toner & Marcus, ALS 11.0.2.2)",
                       energy.astype(np.float64), np.ascontiguousarray(od.transpose(1, 2, 0), dtype=np.float32),
                       x.astype(np.float64), y.astype(np.float64), "um", "OD")


def fe_k_references(grid: np.ndarray, phases: dict[str, str] = STEEL_PHASES) -> np.ndarray:
    """Edge-step-normalised reference spectra resampled on ``grid`` (eV): ``(k, len(grid))``."""
    out = []
    for relpath in phases.values():
        ref = read_reference(FE_K_DIR / relpath)
        mu = ref.mu if ref.normalized else normalize_edge(ref.energy, ref.mu)[0]
        out.append(resample(ref.energy, mu, grid))
    return np.array(out)


def corroding_steel_map(shape: tuple[int, int] = (21, 21), noise: float = 0.01, seed: int = 0,
                        grid: np.ndarray | None = None) -> SpectralMap:
    """A synthetic corroding-steel cross-section from real Fe K-edge references.

    Layout: distance r from the centre (0 at the centre, 1 at the edge midpoints) sets the
    reaction progress t = clip((r - 0.25) / 0.9, 0, 1); fractions follow the path
    metal (t = 0) -> magnetite (t = 0.5) -> goethite (t = 1) with linear mixing between neighbours,
    so the core is pure metal, a ring is pure magnetite and the corners are pure goethite.

    Args:
        shape: ``(ny, nx)`` points, 0.5 mm apart.
        noise: Gaussian noise sigma as a fraction of the edge step.
        seed: noise seed.
        grid: energy grid (eV); default 400 channels over 7070-7240 eV.

    Returns:
        a :class:`SpectralMap` with ``fractions``, ``components`` and ``progress`` set.
    """
    grid = np.linspace(7070.0, 7240.0, 400) if grid is None else grid
    components = fe_k_references(grid)
    ny, nx = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    r = np.hypot(yy, xx)
    t = np.clip((r - 0.25) / 0.9, 0.0, 1.0)
    # piecewise-linear path with plateaus so that every phase has pure pixels
    metal = np.clip(1 - (t - 0.0) / 0.3, 0, 1)
    goethite = np.clip((t - 0.7) / 0.3, 0, 1)
    magnetite = 1 - metal - goethite
    fractions = np.stack([metal, magnetite, goethite], axis=-1)
    return _simulated("corroding steel (simulated from Fe K-edge references)", fractions, components,
                      list(STEEL_PHASES), grid, noise, seed, t)


#: A corrosion sequence of four phases for :func:`reaction_path_map` (Hansel 2001, APS 13-ID-C).
PATH_PHASES: dict[str, str] = {
    "Fe metal": "xasdatalibrary/Hansel2001_Fe_foil_xanes_001.xdi",
    "green rust (Cl)": "xasdatalibrary/Hansel2001_greenrust_Cl_xanes_001.xdi",
    "magnetite": "xasdatalibrary/Hansel2001_magnetite_xanes_001.xdi",
    "goethite": "xasdatalibrary/Hansel2001_goethite_xanes_003.xdi",
}


def _simulated(name: str, fractions: np.ndarray, components: np.ndarray, names: list[str], grid: np.ndarray,
               noise: float, seed: int, progress: np.ndarray | None = None) -> SpectralMap:
    ny, nx = fractions.shape[:2]
    rng = np.random.default_rng(seed)
    spectra = fractions @ components + rng.normal(0.0, noise, (ny, nx, len(grid)))
    return SpectralMap(name, grid, spectra.astype(np.float32), np.arange(nx) * 0.5, np.arange(ny) * 0.5, "mm",
                       "normalized mu", fractions, components, names, progress)


def reaction_path_map(shape: tuple[int, int] = (21, 21), noise: float = 0.01, seed: int = 0,
                      width: float = 0.18, grid: np.ndarray | None = None) -> SpectralMap:
    """A map whose spectra follow a curved reaction path through four phases in sequence.

    Progress t in [0, 1] runs diagonally across the map with a sinusoidal bend (every value of t
    occurs, no plateaus). Fractions are Gaussian bumps in t centred at 0, 1/3, 2/3, 1 for
    Fe metal -> green rust -> magnetite -> goethite (``PATH_PHASES``), normalised to sum 1: the
    path turns a corner at each intermediate phase, so it is curved in spectral space.

    Args:
        shape: ``(ny, nx)``; noise: Gaussian sigma (fraction of the edge step); seed: noise seed;
        width: bump width in t; grid: energy grid (eV), default 400 channels over 7070-7240 eV.

    Returns:
        a :class:`SpectralMap` with ``fractions``, ``components`` and ``progress`` (= t) set.
    """
    grid = np.linspace(7070.0, 7240.0, 400) if grid is None else grid
    components = fe_k_references(grid, PATH_PHASES)
    ny, nx = shape
    yy, xx = np.meshgrid(np.linspace(0, 1, ny), np.linspace(0, 1, nx), indexing="ij")
    t = (xx + yy) / 2 + 0.08 * np.sin(3 * np.pi * xx) * np.sin(np.pi * yy)
    t = (t - t.min()) / (t.max() - t.min())
    centres = np.linspace(0.0, 1.0, len(PATH_PHASES))
    f = np.exp(-((t[..., None] - centres) ** 2) / (2 * width ** 2))
    f /= f.sum(axis=-1, keepdims=True)
    return _simulated("curved corrosion path (simulated from Fe K-edge references)", f, components,
                      list(PATH_PHASES), grid, noise, seed, t)


def dominant_phase_map(shape: tuple[int, int] = (21, 21), dominant: float = 0.9, noise: float = 0.01,
                       seed: int = 0, grid: np.ndarray | None = None) -> SpectralMap:
    """A map where one phase (magnetite) covers most points: a fraction ``dominant`` of the points
    (the first rows) is pure magnetite, the rest random mixtures of Fe metal, magnetite and
    goethite (Dirichlet(0.5, 0.5, 0.5) fractions). For showing what manifold weighting changes.
    """
    grid = np.linspace(7070.0, 7240.0, 400) if grid is None else grid
    components = fe_k_references(grid)
    ny, nx = shape
    n = ny * nx
    n_dom = int(round(dominant * n))
    f = np.zeros((n, 3))
    f[:n_dom, 1] = 1.0
    f[n_dom:] = np.random.default_rng(seed + 1000).dirichlet([0.5, 0.5, 0.5], n - n_dom)
    return _simulated("magnetite-dominated map (simulated from Fe K-edge references)", f.reshape(ny, nx, 3),
                      components, list(STEEL_PHASES), grid, noise, seed)
