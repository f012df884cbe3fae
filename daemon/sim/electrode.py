"""Simulated SEM cross-sections of a cycled battery electrode, with the exact ground truth of each.

The picture follows the electrode study in ``../shared/science.md`` §3 (SiO–graphite anodes imaged
in cross-section after N charge cycles): active-material particles (bright) in pore space (dark),
under a surface layer (the SEI / electrolyte-decomposition layer, mid grey) along the top edge.
With the cycle number the particles shrink, crack (a crack of at least 2 px splits a particle into
two regions) and fill with small internal pores, and the surface layer thickens — the trends the
study reads from its images. Grey levels: pore ``pore_level``, layer ``layer_level``, particle
``particle_level``, plus Gaussian noise of ``noise`` grey levels (uint8 frames).

Ground truth (:class:`ElectrodeTruth`) is computed from the generator's own phase map with the same
definitions the ``features`` consumer uses (:func:`beamlens.consumers.features.phase_features`): void = pore
phase, particles = 4-connected regions of the particle phase of at least ``min_particle_px``
pixels, pores = 4-connected void regions of at least ``min_pore_px`` pixels (their mean equivalent
diameter), layer thickness = layer area / frame width.

Example::

    gen = ElectrodeGenerator(seed=1)
    image, truth = gen.frame(cycle=200)       # uint8 (256, 256), ElectrodeTruth
    with ElectrodeMicroscope(gen) as sem:     # array-1.0 over ZeroMQ, one series per cycle
        sem.send_cycle(200)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from skimage.draw import disk, line

from beamlens.consumers.features import LAYER, PARTICLE, PORE, phase_features


@dataclass(frozen=True)
class ElectrodeTruth:
    """Exact features of one simulated frame (areas in µm², lengths in µm, at ``pixel_size_um``)."""

    cycle: int
    void_area: float
    void_fraction: float
    mean_particle_area: float
    particle_count: int
    surface_layer_area: float
    surface_layer_thickness: float
    mean_pore_diameter: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class ElectrodeGenerator:
    """Cross-sections of one electrode at successive cycles (the same particles, aged).

    Args:
        shape: frame shape ``(rows, cols)``, px.
        pixel_size_um: µm per px (reported with the truth and in the frame header).
        n_particles: particles placed (non-overlapping, at least 3 px apart).
        radius_px: ``(min, max)`` particle radius at cycle 0, px.
        layer_px: surface-layer thickness at cycle 0 and its growth per sqrt(cycle), px.
        shrink_per_log_cycle: relative radius loss per unit of ``log1p(cycle / 100)``.
        crack_cycles: cycle at which each particle may crack is drawn from ``Exp(crack_cycles)``.
        pores_per_100_cycles: internal pores per particle and 100 cycles (radius 1.5–3 px).
        noise: Gaussian noise, grey levels.
        seed: random seed (placement, cracks, pores, noise are all reproducible).
    """

    def __init__(self, shape: tuple[int, int] = (256, 256), pixel_size_um: float = 0.05, n_particles: int = 60,
                 radius_px: tuple[float, float] = (10.0, 18.0), layer_px: tuple[float, float] = (6.0, 0.6),
                 shrink_per_log_cycle: float = 0.05, crack_cycles: float = 600.0, pores_per_100_cycles: float = 0.4,
                 noise: float = 12.0, pore_level: float = 40.0, layer_level: float = 120.0,
                 particle_level: float = 200.0, seed: int = 0):
        self.shape, self.pixel_size_um = tuple(shape), float(pixel_size_um)
        self.layer_px, self.shrink, self.pores_rate = layer_px, shrink_per_log_cycle, pores_per_100_cycles
        self.noise, self.levels = noise, (pore_level, particle_level, layer_level)
        self.seed = seed
        rng = np.random.default_rng(seed)
        rows, cols = self.shape
        top = layer_px[0] + layer_px[1] * math.sqrt(2000) + 4  # particles stay below the thickest layer
        placed: list[tuple[float, float, float]] = []
        for _ in range(50_000):
            if len(placed) >= n_particles:
                break
            r = rng.uniform(*radius_px)
            cy, cx = rng.uniform(top + r, rows - r - 1), rng.uniform(r + 1, cols - r - 1)
            if all(math.hypot(cy - y, cx - x) > r + q + 3 for y, x, q in placed):
                placed.append((cy, cx, r))
        self.particles = placed
        self.crack_at = rng.exponential(crack_cycles, len(placed))
        self.crack_angle = rng.uniform(0, math.pi, len(placed))
        # internal pores: fixed positions (relative to the centre) revealed one by one with cycle
        self.pore_offsets = [(rng.uniform(0, 0.6, 64), rng.uniform(0, 2 * math.pi, 64), rng.uniform(1.5, 3.0, 64),
                              np.sort(rng.exponential(100.0 / max(pores_per_100_cycles, 1e-9), 64).cumsum()))
                             for _ in placed]
        self.layer_wave = rng.uniform(0, 2 * math.pi, 3)

    def phases(self, cycle: int) -> np.ndarray:
        """The true phase map at ``cycle`` (uint8 ``(rows, cols)``: PORE/PARTICLE/LAYER)."""
        rows, cols = self.shape
        out = np.full(self.shape, PORE, dtype=np.uint8)
        scale = max(0.3, 1.0 - self.shrink * math.log1p(cycle / 100.0))
        for i, (cy, cx, r0) in enumerate(self.particles):
            r = r0 * scale
            out[disk((cy, cx), r, shape=self.shape)] = PARTICLE
            dist, ang, pr, when = self.pore_offsets[i]
            for d, a, p in zip(dist[when <= cycle], ang[when <= cycle], pr[when <= cycle]):
                out[disk((cy + d * r * math.sin(a), cx + d * r * math.cos(a)), min(p, 0.3 * r), shape=self.shape)] = PORE
            if cycle >= self.crack_at[i]:
                t = self.crack_angle[i]
                dy, dx = math.sin(t) * (r + 2), math.cos(t) * (r + 2)
                for off in (-1, 0, 1):  # a 3-px wide crack through the centre
                    oy, ox = off * math.cos(t), -off * math.sin(t)
                    rr, cc = line(int(round(cy - dy + oy)), int(round(cx - dx + ox)),
                                  int(round(cy + dy + oy)), int(round(cx + dx + ox)))
                    keep = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
                    out[rr[keep], cc[keep]] = PORE
        # the surface layer: a band along the top whose lower edge waves a little
        thick = self.layer_px[0] + self.layer_px[1] * math.sqrt(max(cycle, 0))
        x = np.arange(cols)
        edge = thick + 1.5 * np.sin(2 * math.pi * x / cols * 2 + self.layer_wave[0]) + \
            0.8 * np.sin(2 * math.pi * x / cols * 5 + self.layer_wave[1])
        out[np.arange(rows)[:, None] < edge[None, :]] = LAYER
        return out

    def image(self, phases: np.ndarray, cycle: int) -> np.ndarray:
        """A noisy uint8 SEM-like image of a phase map (noise seeded by ``seed`` and ``cycle``)."""
        rng = np.random.default_rng((self.seed, int(cycle)))
        grey = np.choose(phases, self.levels).astype(np.float64)
        grey += rng.normal(0.0, self.noise, grey.shape)
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)

    def truth(self, phases: np.ndarray, cycle: int, **kw) -> ElectrodeTruth:
        """The exact features of a phase map (see :func:`phase_features`; ``kw``: its size limits)."""
        f = phase_features(phases, self.pixel_size_um, **kw)
        return ElectrodeTruth(cycle=int(cycle), particle_count=int(f.pop("particle_count")), **f)

    def frame(self, cycle: int) -> tuple[np.ndarray, ElectrodeTruth]:
        """``(uint8 image (rows, cols), truth)`` at ``cycle``."""
        p = self.phases(cycle)
        return self.image(p, cycle), self.truth(p, cycle)


class ElectrodeMicroscope:
    """Sends an electrode's cross-section once per cycle over ZeroMQ (PUSH, bound on 127.0.0.1),
    each as its own array-1.0 series of one frame (``series_id`` per cycle,
    ``number_frames_expected: 1``) with ``cycle`` and ``pixel_size_um`` in the header, keeping the
    ground truth of each (:attr:`truth`).

    Args:
        generator: the electrode (default ``ElectrodeGenerator()``).
        address: where to bind; ``tcp://127.0.0.1:0`` picks a free port.
        source: the header's ``source`` field.
    """

    def __init__(self, generator: ElectrodeGenerator | None = None, address: str = "tcp://127.0.0.1:0",
                 source: str = "sem"):
        import zmq

        self.generator = generator or ElectrodeGenerator()
        self.source = source
        self.socket = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 2000)
        self.socket.bind(address)
        self.address: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.truth: list[ElectrodeTruth] = []

    def send_cycle(self, cycle: int) -> ElectrodeTruth:
        """Send the cross-section at ``cycle`` as a one-frame series; returns its truth."""
        import json

        image, truth = self.generator.frame(cycle)
        header = {"htype": "array-1.0", "shape": list(image.shape), "type": "uint8", "frame": 0, "endianness": "little",
                  "encoding": "", "source": self.source, "series_id": f"{self.source}-cycle-{cycle}",
                  "number_frames_expected": 1, "cycle": int(cycle), "pixel_size_um": self.generator.pixel_size_um}
        self.socket.send_multipart([json.dumps(header).encode(), np.ascontiguousarray(image)], copy=False)
        self.truth.append(truth)
        return truth

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> ElectrodeMicroscope:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
