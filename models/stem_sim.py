"""Simulated HAADF-STEM movie of a transition-metal-dichalcogenide monolayer with moving point defects.

The lattice is the projected 2H-MoS2 (or WS2) monolayer seen along [001]: metal columns on a
triangular lattice of constant ``a`` and chalcogen (S2) columns on the second sublattice, shifted by
``(a1 + a2) / 3`` (projected metal-chalcogen distance ``a / sqrt(3)``). HAADF contrast scales roughly
as Z^1.7, so with Mo = 1 an S2 column is about 0.4 (Pennycook & Jesson, Ultramicroscopy 37, 14
(1991)); the defaults sit there. At 0.017 nm/px, MoS2's a = 0.316 nm is 18.6 px, which matches the
first Bragg ring of the real frames in ``models/data/stem_mos2_scilink`` (d100 = 16.2 px).

Defect kinds (:data:`KINDS`):

- ``heavy_dopant``: a heavier metal on a metal site (e.g. W in MoS2), brighter metal column;
- ``metal_vacancy``: an empty metal site;
- ``chalcogen_vacancy``: an empty chalcogen column (both S atoms gone, V_S2).

Dynamics (exact, so that estimators can be checked): at each frame step every defect first draws its
next kind from the row of the transition matrix ``P`` for its current kind (a Markov chain, as in
Maksov et al., npj Comput. Mater. 5, 12 (2019)); a defect that changes sublattice moves to one of the
three nearest sites of the other sublattice. A defect that keeps its kind then hops to one of its six
nearest same-sublattice sites (distance ``a``) with probability ``hop_probability[kind]``, so its
lag-1 mean squared displacement is ``p a^2`` and its diffusion coefficient (2-D random walk,
<r^2> = 4 D t) is ``D = p a^2 / (4 dt)`` px^2/s (:meth:`MovieParams.diffusion_coefficient`). A hop
onto a site closer than ``min_separation_px`` to another defect, or out of the frame's interior, is
redirected to another of the six neighbours (reflection), which keeps every hop ``a`` long and so the
lag-1 MSD exact; only when all six are blocked is the hop lost (counted in :attr:`Movie.rejected_hops`).

Imaging: Gaussian columns (probe + thermal spread), a few percent column-to-column intensity
scatter, a smooth contamination background, slow linear stage drift plus a slow wobble, scan
distortion (a sinusoidal line shift along the fast axis plus per-line jitter), Poisson shot noise at
``dose`` counts per unit column intensity, Gaussian read noise, a dark offset, rounded to uint16.
The positions in the ground truth are where each defect's column is drawn, after drift and scan
distortion, in px (row, col).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

KINDS: tuple[str, ...] = ("heavy_dopant", "metal_vacancy", "chalcogen_vacancy")
#: Sublattice of each kind: 0 metal, 1 chalcogen.
KIND_SUBLATTICE: tuple[int, ...] = (0, 0, 1)

_SAME_NEIGHBOURS = np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (1, -1), (-1, 1)])
#: Offsets (di, dj) from a metal site to its three nearest chalcogen sites, and back.
_TO_CHALCOGEN = np.array([(0, 0), (-1, 0), (0, -1)])
_TO_METAL = -_TO_CHALCOGEN


@dataclass(frozen=True)
class LatticeParams:
    """Geometry and contrast of the projected lattice.

    Attributes:
        shape: frame shape (rows, cols), px.
        lattice_px: lattice constant a (metal-metal distance), px.
        angle_deg: rotation of a1 from the +col axis, degrees.
        column_sigma_px: Gaussian sigma of a column image, px.
        metal_intensity, chalcogen_intensity: peak intensities of intact columns (metal = 1).
        dopant_intensity: peak intensity of a heavy-dopant metal column.
        column_scatter: relative standard deviation of column intensities (fixed per site).
    """

    shape: tuple[int, int] = (256, 256)
    lattice_px: float = 18.6
    angle_deg: float = 7.0
    column_sigma_px: float = 2.6
    metal_intensity: float = 1.0
    chalcogen_intensity: float = 0.42
    dopant_intensity: float = 1.8
    column_scatter: float = 0.04

    @property
    def column_spacing_px(self) -> float:
        """Nearest projected column distance (metal-chalcogen), ``a / sqrt(3)``, px."""
        return self.lattice_px / np.sqrt(3.0)

    def basis(self) -> np.ndarray:
        """Lattice vectors a1, a2 as rows of a float64 ``(2, 2)`` array in (row, col) px."""
        t = np.deg2rad(self.angle_deg)
        a = self.lattice_px
        v1 = np.array([np.sin(t), np.cos(t)]) * a
        t2 = t + np.pi / 3
        v2 = np.array([np.sin(t2), np.cos(t2)]) * a
        return np.stack([v1, v2])


@dataclass(frozen=True)
class ImagingParams:
    """Detector and instrument imperfections.

    Attributes:
        dose: mean counts at the peak of a column of intensity 1.
        background: uniform background, in column-intensity units.
        contamination: amplitude of a smooth random background (hydrocarbon contamination), same units.
        read_noise: Gaussian read-noise sigma, counts.
        offset: dark offset, counts.
        drift_px_per_frame: linear stage drift (row, col) per frame, px.
        wobble_px: amplitude of a slow sinusoidal drift on top, px.
        scan_amplitude_px: amplitude of the sinusoidal fast-axis line shift, px.
        scan_period_px: its period along the slow (row) axis, px.
        line_jitter_px: sigma of the random per-line fast-axis shift, px.
        line_gain_jitter: relative sigma of a random per-line gain (scan-line streaks).
    """

    dose: float = 20.0
    background: float = 0.2
    contamination: float = 0.08
    read_noise: float = 2.0
    offset: float = 20.0
    drift_px_per_frame: tuple[float, float] = (0.03, 0.05)
    wobble_px: float = 0.5
    scan_amplitude_px: float = 0.6
    scan_period_px: float = 90.0
    line_jitter_px: float = 0.25
    line_gain_jitter: float = 0.02


@dataclass(frozen=True)
class DynamicsParams:
    """Defect population and dynamics.

    Attributes:
        n_defects: defects in the field of view (constant).
        initial_kind_probability: probability of each kind at frame 0, ``(len(KINDS),)``.
        transition: per-frame Markov matrix ``P[i, j]`` = probability that kind i becomes kind j.
        hop_probability: per-frame probability that a defect keeping its kind hops, per kind.
        frame_time_s: time between frames, s.
        min_separation_px: hops closer than this to another defect are rejected, px.
        edge_margin_px: defects stay at least this far inside the frame (before drift), px.
    """

    n_defects: int = 12
    initial_kind_probability: tuple[float, ...] = (0.35, 0.25, 0.40)
    transition: tuple[tuple[float, ...], ...] = (
        (0.90, 0.08, 0.02),
        (0.06, 0.84, 0.10),
        (0.02, 0.06, 0.92),
    )
    hop_probability: tuple[float, ...] = (0.0, 0.05, 0.35)
    frame_time_s: float = 0.5
    min_separation_px: float = 40.0
    edge_margin_px: float = 24.0


@dataclass(frozen=True)
class MovieParams:
    """Everything that defines a simulated movie (with the seed of :class:`Movie`)."""

    lattice: LatticeParams = field(default_factory=LatticeParams)
    imaging: ImagingParams = field(default_factory=ImagingParams)
    dynamics: DynamicsParams = field(default_factory=DynamicsParams)

    def diffusion_coefficient(self) -> np.ndarray:
        """Diffusion coefficient of each kind, ``D = p a^2 / (4 dt)``, float64 ``(len(KINDS),)``, px^2/s."""
        p = np.asarray(self.dynamics.hop_probability, dtype=float)
        return p * self.lattice.lattice_px**2 / (4.0 * self.dynamics.frame_time_s)


@dataclass
class FrameTruth:
    """Exact ground truth of one frame.

    Attributes:
        frame: frame number from 0.
        ids: int64 ``(n,)`` defect identities (stable across frames).
        kinds: int64 ``(n,)`` indices into :data:`KINDS`.
        positions: float64 ``(n, 2)`` (row, col) where each defect's column is drawn, px.
        drift: float64 ``(2,)`` stage drift of this frame, px.
    """

    frame: int
    ids: np.ndarray
    kinds: np.ndarray
    positions: np.ndarray
    drift: np.ndarray


class Movie:
    """A simulated movie: iterate frames and their ground truth, one at a time, deterministically.

    Args:
        params: the movie's parameters.
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same movie.

    Raises:
        ValueError: if the transition matrix is not square with rows summing to 1, or the frame
            interior cannot hold ``n_defects`` defects ``min_separation_px`` apart.

    Example::

        movie = Movie(MovieParams(), seed=1)
        for image, truth in movie.frames(100):   # image: uint16 (rows, cols), counts
            ...
    """

    def __init__(self, params: MovieParams | None = None, seed: int = 0):
        self.params = params or MovieParams()
        self.rng = np.random.default_rng(seed)
        dyn = self.params.dynamics
        self.P = np.asarray(dyn.transition, dtype=float)
        k = len(KINDS)
        if self.P.shape != (k, k) or not np.allclose(self.P.sum(axis=1), 1.0) or (self.P < 0).any():
            raise ValueError(f"transition must be a {k}x{k} row-stochastic matrix, got {self.P.tolist()}")
        lat = self.params.lattice
        self.basis = lat.basis()
        self.inv_basis = np.linalg.inv(self.basis)
        self._sites = self._site_grid()
        self._scatter = {s: 1.0 + lat.column_scatter * self.rng.standard_normal(len(self._sites[s])) for s in (0, 1)}
        self._background = self._contamination()
        self.rejected_hops = 0
        self.accepted_hops = 0
        self.t = 0
        self._init_defects()

    # -- geometry ----------------------------------------------------------------------------
    def site_position(self, ij: np.ndarray, sub: np.ndarray) -> np.ndarray:
        """Undistorted (row, col) px of sites ``ij`` (int ``(n, 2)``) on sublattices ``sub`` (``(n,)``)."""
        frac = np.asarray(ij, dtype=float) + np.asarray(sub, dtype=float)[:, None] / 3.0
        return frac @ self.basis

    def _site_grid(self) -> dict[int, np.ndarray]:
        rows, cols = self.params.lattice.shape
        pad = 3 * self.params.lattice.lattice_px
        corners = np.array([[-pad, -pad], [-pad, cols + pad], [rows + pad, -pad], [rows + pad, cols + pad]])
        frac = corners @ self.inv_basis
        lo, hi = np.floor(frac.min(axis=0)).astype(int), np.ceil(frac.max(axis=0)).astype(int)
        i, j = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
        ij = np.stack([i.ravel(), j.ravel()], axis=1)
        out = {}
        for s in (0, 1):
            pos = self.site_position(ij, np.full(len(ij), s))
            keep = ((pos > -pad) & (pos < np.array([rows, cols]) + pad)).all(axis=1)
            out[s] = ij[keep]
        return out

    def _inside(self, pos: np.ndarray) -> np.ndarray:
        m = self.params.dynamics.edge_margin_px
        rows, cols = self.params.lattice.shape
        return (pos[..., 0] >= m) & (pos[..., 0] <= rows - m) & (pos[..., 1] >= m) & (pos[..., 1] <= cols - m)

    def _contamination(self) -> np.ndarray:
        img = self.params.imaging
        noise = self.rng.standard_normal(self.params.lattice.shape)
        sigma = min(3 * self.params.lattice.lattice_px, min(self.params.lattice.shape) / 6)
        smooth = ndimage.gaussian_filter(noise, sigma=sigma, mode="reflect")
        smooth = (smooth - smooth.mean()) / max(smooth.std(), 1e-12)
        return img.background + img.contamination * smooth

    # -- dynamics ----------------------------------------------------------------------------
    def _init_defects(self) -> None:
        dyn = self.params.dynamics
        n = dyn.n_defects
        self.ids = np.arange(n, dtype=np.int64)
        p0 = np.asarray(dyn.initial_kind_probability, dtype=float)
        self.kinds = self.rng.choice(len(KINDS), size=n, p=p0 / p0.sum())
        self.ij = np.zeros((n, 2), dtype=np.int64)
        placed: list[np.ndarray] = []
        for d in range(n):
            sub = KIND_SUBLATTICE[self.kinds[d]]
            cand = self._sites[sub]
            pos = self.site_position(cand, np.full(len(cand), sub))
            ok = self._inside(pos)
            for p in placed:
                ok &= np.hypot(*(pos - p).T) >= dyn.min_separation_px
            if not ok.any():
                raise ValueError(f"cannot place {n} defects {dyn.min_separation_px} px apart in {self.params.lattice.shape}")
            pick = self.rng.choice(np.flatnonzero(ok))
            self.ij[d] = cand[pick]
            placed.append(pos[pick])

    def _positions(self) -> np.ndarray:
        subs = np.array([KIND_SUBLATTICE[k] for k in self.kinds])
        return self.site_position(self.ij, subs)

    def _allowed(self, d: int, pos: np.ndarray) -> bool:
        others = np.delete(self._positions(), d, axis=0)
        far = len(others) == 0 or np.hypot(*(others - pos).T).min() >= self.params.dynamics.min_separation_px
        return bool(far and self._inside(pos))

    def step(self) -> None:
        """Advance the defects by one frame: kind transitions, sublattice moves, hops."""
        dyn = self.params.dynamics
        for d in range(len(self.ids)):
            old = int(self.kinds[d])
            new = int(self.rng.choice(len(KINDS), p=self.P[old]))
            s_old, s_new = KIND_SUBLATTICE[old], KIND_SUBLATTICE[new]
            if s_old != s_new:
                offsets = _TO_CHALCOGEN if s_old == 0 else _TO_METAL
                self.ij[d] = self.ij[d] + offsets[self.rng.integers(3)]
                self.kinds[d] = new
                continue
            self.kinds[d] = new
            if self.rng.random() < dyn.hop_probability[new]:
                for step in self.rng.permutation(_SAME_NEIGHBOURS):
                    target = self.ij[d] + step
                    if self._allowed(d, self.site_position(target[None], np.array([s_new]))[0]):
                        self.ij[d] = target
                        self.accepted_hops += 1
                        break
                else:
                    self.rejected_hops += 1
        self.t += 1

    # -- imaging -----------------------------------------------------------------------------
    def drift(self, t: int) -> np.ndarray:
        """Stage drift (row, col) of frame ``t``, px."""
        img = self.params.imaging
        wobble = img.wobble_px * np.array([np.sin(2 * np.pi * t / 97.0), np.cos(2 * np.pi * t / 131.0) - 1.0])
        return np.asarray(img.drift_px_per_frame) * t + wobble

    def _distort(self, pos: np.ndarray, jitter: np.ndarray) -> np.ndarray:
        img = self.params.imaging
        rows = self.params.lattice.shape[0]
        out = pos.copy()
        r = np.clip(np.round(pos[:, 0]).astype(int), 0, rows - 1)
        out[:, 1] += img.scan_amplitude_px * np.sin(2 * np.pi * pos[:, 0] / img.scan_period_px) + jitter[r]
        return out

    def render(self) -> tuple[np.ndarray, FrameTruth]:
        """Image the current state.

        Returns:
            ``(image, truth)``: image uint16 ``(rows, cols)`` in counts, and its :class:`FrameTruth`.
        """
        lat, img = self.params.lattice, self.params.imaging
        drift = self.drift(self.t)
        jitter = img.line_jitter_px * self.rng.standard_normal(lat.shape[0])
        ideal = self._background.copy()
        defect_sites = {(int(i), int(j), KIND_SUBLATTICE[k]): int(k) for (i, j), k in zip(self.ij, self.kinds)}
        for s in (0, 1):
            ij = self._sites[s]
            amp = (lat.metal_intensity if s == 0 else lat.chalcogen_intensity) * self._scatter[s]
            for idx in np.flatnonzero([(int(i), int(j), s) in defect_sites for i, j in ij]):
                kind = defect_sites[(int(ij[idx, 0]), int(ij[idx, 1]), s)]
                amp[idx] = lat.dopant_intensity * self._scatter[s][idx] if KINDS[kind] == "heavy_dopant" else 0.0
            pos = self._distort(self.site_position(ij, np.full(len(ij), s)) + drift, jitter)
            _splat(ideal, pos, amp, lat.column_sigma_px)
        ideal *= 1.0 + img.line_gain_jitter * self.rng.standard_normal(lat.shape[0])[:, None]
        counts = self.rng.poisson(np.clip(ideal, 0, None) * img.dose).astype(float)
        counts += img.offset + img.read_noise * self.rng.standard_normal(lat.shape)
        image = np.clip(np.round(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)
        truth = FrameTruth(self.t, self.ids.copy(), self.kinds.copy(),
                           self._distort(self._positions() + drift, jitter), drift)
        return image, truth

    def frames(self, n: int) -> Iterator[tuple[np.ndarray, FrameTruth]]:
        """Yield ``n`` frames ``(image, truth)``; frame 0 is the initial state."""
        for k in range(n):
            if k or self.t:
                self.step()
            yield self.render()

    def trajectories(self, n: int) -> list[FrameTruth]:
        """Ground truth of ``n`` frames without rendering them (fast; for estimator tests).

        Positions are undistorted lattice positions plus drift (no scan distortion)."""
        out = []
        for k in range(n):
            if k or self.t:
                self.step()
            out.append(FrameTruth(self.t, self.ids.copy(), self.kinds.copy(),
                                  self._positions() + self.drift(self.t), self.drift(self.t)))
        return out


def _splat(image: np.ndarray, pos: np.ndarray, amp: np.ndarray, sigma: float) -> None:
    """Add Gaussian columns of peak ``amp`` (``(n,)``) at ``pos`` (``(n, 2)`` px) to ``image`` in place."""
    h = int(np.ceil(3.5 * sigma))
    offs = np.arange(-h, h + 1)
    base = np.floor(pos).astype(int)
    frac = pos - base
    gr = np.exp(-((offs[None, :] - frac[:, :1]) ** 2) / (2 * sigma**2))  # (n, w) along rows
    gc = np.exp(-((offs[None, :] - frac[:, 1:]) ** 2) / (2 * sigma**2))
    vals = amp[:, None, None] * gr[:, :, None] * gc[:, None, :]
    rr = base[:, 0, None, None] + offs[None, :, None]
    cc = base[:, 1, None, None] + offs[None, None, :]
    rr, cc = np.broadcast_to(rr, vals.shape), np.broadcast_to(cc, vals.shape)
    ok = (rr >= 0) & (rr < image.shape[0]) & (cc >= 0) & (cc < image.shape[1])
    np.add.at(image, (rr[ok], cc[ok]), vals[ok])


def random_params(rng: np.random.Generator, shape: tuple[int, int] = (128, 128), n_defects: int | None = None) -> MovieParams:
    """Draw varied movie parameters for training: lattice 15-26 px, any rotation, column width,
    contrast, dose 4-150 counts, drift, distortion and scan-line gain noise.

    Args:
        rng: the random generator.
        shape: frame shape, px.
        n_defects: defects per frame; default 1 per 4000 to 1 per 2000 px^2.
    """
    a = rng.uniform(15.0, 26.0)
    area = shape[0] * shape[1]
    n = n_defects if n_defects is not None else int(rng.integers(area // 4000 + 1, area // 2000 + 2))
    lattice = LatticeParams(
        shape=shape, lattice_px=a, angle_deg=rng.uniform(0, 60), column_sigma_px=a * rng.uniform(0.11, 0.18),
        chalcogen_intensity=rng.uniform(0.3, 0.65), dopant_intensity=rng.uniform(1.5, 2.3),
        column_scatter=rng.uniform(0.02, 0.08))
    imaging = ImagingParams(
        dose=float(np.exp(rng.uniform(np.log(4), np.log(150)))), background=rng.uniform(0.0, 0.4),
        contamination=rng.uniform(0.0, 0.15), read_noise=rng.uniform(0.5, 4.0), offset=rng.uniform(0, 50),
        scan_amplitude_px=rng.uniform(0, 1.0), scan_period_px=rng.uniform(40, 200), line_jitter_px=rng.uniform(0, 0.4),
        line_gain_jitter=rng.uniform(0, 0.08))
    dynamics = replace(DynamicsParams(), n_defects=n, min_separation_px=1.1 * a, edge_margin_px=0.0)
    return MovieParams(lattice, imaging, dynamics)
