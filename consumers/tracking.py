"""Frame-to-frame tracking of point defects, with per-class diffusion coefficients and the class
transition matrix (Maksov et al., npj Comput. Mater. 5, 12 (2019), trajectories and Markov analysis).

Linking: detections of consecutive frames are assigned one-to-one by minimum total displacement
(``scipy.optimize.linear_sum_assignment``); pairs further apart than ``max_displacement_px`` are not
linked, and unlinked detections start new tracks. Frames that do not follow the previous one
(dropped frames) start all tracks afresh.

Drift: the median displacement of all links of a frame (when it has at least three) is taken as the
stage drift and subtracted; most defects are immobile, so the median is robust to the hops.

Diffusion: for links whose two ends have the same class ``k``, the lag-1 mean squared displacement
estimator ``D_k = sum |dr|^2 / (4 n_k dt)`` (2-D random walk, <r^2> = 4 D t), unbiased for a random
walk (localisation noise sigma adds ``sigma^2 / dt``). The estimator ``(var x + var y) / (4 N dt)``
used in the authors' port is not used: for a 2-D Brownian trajectory of N steps it returns about D/6.

Transitions: ``C[i, j]`` counts links from class i to class j; the transition matrix is C with rows
normalised (the maximum-likelihood estimate of a Markov chain pooled over trajectories; the authors'
notebook averages per-trajectory matrices instead, which weights short trajectories as much as long ones).

State: everything the tracker keeps (the previous frame's detections, the link sums and counts, the
transition counts, the next track id) lives in arrays named by :meth:`DefectTracker.specs`, held in
a mapping the caller owns: the ``defects`` consumer passes its declared (private) buffers, so a
checkpoint holds the tracker and a fresh tracker over the restored buffers continues exactly; a
standalone tracker allocates its own. The tracker keeps no reference to an array across calls.
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import numpy as np
from scipy.optimize import linear_sum_assignment

from .base import BufferSpec

#: Detections of one frame kept for linking to the next when no capacity is given.
DEFAULT_CAPACITY = 256


class DefectTracker:
    """Incremental tracker and statistics over a mapping of state arrays.

    Args:
        n_classes: number of defect classes (labels ``0 .. n_classes - 1``; ``-1`` = unclassified,
            linked but left out of the statistics).
        max_displacement_px: largest displacement between consecutive frames that is linked, px.
        frame_time_s: time between consecutive frames, s.
        state: the arrays of :meth:`specs` (by name, e.g. a consumer's ``Buffers``), already
            initialised by :meth:`reset` or restored; default: fresh arrays of ``capacity``.
        capacity: detections of a frame kept for linking to the next one when ``state`` is not
            given (with ``state``: the length of its ``track_prev_pos``). Detections beyond it still
            get track ids but are not linked to the next frame.

    Raises:
        ValueError: for a non-positive ``max_displacement_px`` or ``frame_time_s``, or ``state``
            arrays whose shapes do not fit ``n_classes``.
    """

    def __init__(self, n_classes: int, max_displacement_px: float, frame_time_s: float,
                 state: MutableMapping[str, np.ndarray] | Mapping[str, np.ndarray] | None = None,
                 capacity: int = DEFAULT_CAPACITY):
        if max_displacement_px <= 0 or frame_time_s <= 0:
            raise ValueError("max_displacement_px and frame_time_s must be positive")
        self.n_classes = n_classes
        self.max_displacement = float(max_displacement_px)
        self.dt = float(frame_time_s)
        if state is None:
            state = {s.name: s.allocate(0) for s in self.specs(n_classes, capacity)}
            self.reset(state)
        elif state["track_transitions"].shape != (n_classes, n_classes):
            raise ValueError(f"tracker state of {state['track_transitions'].shape[0]} classes, not {n_classes}")
        self.state = state

    @staticmethod
    def specs(n_classes: int, capacity: int) -> list[BufferSpec]:
        """The tracker's state as private ``single`` buffers (names ``track_*``).

        Args:
            n_classes: number of classes K.
            capacity: detections of one frame kept for linking to the next.

        Returns:
            specs of ``track_prev_frame`` (float64 ``(1,)``, NaN before the first frame),
            ``track_prev_n`` (int64 ``(1,)``), ``track_prev_pos`` (float64 ``(capacity, 2)``, px),
            ``track_prev_cls`` and ``track_prev_ids`` (int64 ``(capacity,)``), ``track_next_id``
            (int64 ``(1,)``), ``track_transitions`` (int64 ``(K, K)``), ``track_sum_sq`` (float64
            ``(K,)``, px^2) and ``track_steps`` (int64 ``(K,)``).
        """
        k, n = n_classes, capacity
        return [
            BufferSpec("track_prev_frame", "single", (1,), description="frame index of the previous frame (NaN: none)", private=True),
            BufferSpec("track_prev_n", "single", (1,), "int64", description="detections of the previous frame kept", private=True),
            BufferSpec("track_prev_pos", "single", (n, 2), units="px", description="row, col of the previous frame's detections", private=True),
            BufferSpec("track_prev_cls", "single", (n,), "int64", description="class of the previous frame's detections", private=True),
            BufferSpec("track_prev_ids", "single", (n,), "int64", description="track id of the previous frame's detections", private=True),
            BufferSpec("track_next_id", "single", (1,), "int64", description="next track id", private=True),
            BufferSpec("track_transitions", "single", (k, k), "int64", description="links from class i to class j", private=True),
            BufferSpec("track_sum_sq", "single", (k,), units="px^2", description="sum of squared same-class link displacements", private=True),
            BufferSpec("track_steps", "single", (k,), "int64", description="same-class links", private=True),
        ]

    @staticmethod
    def reset(state: MutableMapping[str, np.ndarray] | Mapping[str, np.ndarray]) -> None:
        """Set freshly allocated state arrays (floats NaN, integers 0) to "no frame yet", in place."""
        state["track_prev_frame"][...] = np.nan
        state["track_sum_sq"][...] = 0.0
        for name in ("track_prev_n", "track_prev_cls", "track_prev_ids", "track_next_id", "track_transitions",
                     "track_steps"):
            state[name][...] = 0

    # -- views of the state --------------------------------------------------------------------
    @property
    def prev_frame(self) -> int | None:
        """Index of the previous frame, or None (before the first frame, or to break all tracks)."""
        f = float(self.state["track_prev_frame"][0])
        return None if np.isnan(f) else int(f)

    @prev_frame.setter
    def prev_frame(self, frame: int | None) -> None:
        self.state["track_prev_frame"][0] = np.nan if frame is None else frame

    @property
    def transitions(self) -> np.ndarray:
        """int64 ``(n_classes, n_classes)``: links from class i to class j."""
        return self.state["track_transitions"]

    @property
    def sum_sq(self) -> np.ndarray:
        """float64 ``(n_classes,)``: sum of squared drift-corrected same-class displacements, px^2."""
        return self.state["track_sum_sq"]

    @property
    def steps(self) -> np.ndarray:
        """int64 ``(n_classes,)``: same-class links behind each diffusion coefficient."""
        return self.state["track_steps"]

    # -- the work -----------------------------------------------------------------------------
    def update(self, frame: int, positions: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Add one frame's detections.

        Args:
            frame: frame index (consecutive frames differ by 1).
            positions: float ``(n, 2)`` (row, col), px.
            classes: int ``(n,)`` class of each detection (``-1`` unclassified).

        Returns:
            int64 ``(n,)`` track id of each detection.
        """
        s = self.state
        positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        classes = np.asarray(classes, dtype=np.int64)
        n_prev = int(s["track_prev_n"][0])
        prev_pos, prev_cls, prev_ids = s["track_prev_pos"][:n_prev], s["track_prev_cls"][:n_prev], s["track_prev_ids"][:n_prev]
        ids = np.empty(len(positions), dtype=np.int64)
        linked = np.zeros(len(positions), dtype=bool)
        prev_frame = self.prev_frame
        if prev_frame is not None and frame == prev_frame + 1 and n_prev and len(positions):
            d = np.hypot(*(positions[:, None, :] - prev_pos[None, :, :]).transpose(2, 0, 1))
            cost = np.where(d <= self.max_displacement, d, 1e9)
            rows, cols = linear_sum_assignment(cost)
            ok = d[rows, cols] <= self.max_displacement
            rows, cols = rows[ok], cols[ok]
            ids[rows] = prev_ids[cols]
            linked[rows] = True
            self._accumulate(positions[rows] - prev_pos[cols], prev_cls[cols], classes[rows])
        next_id = int(s["track_next_id"][0])
        n_new = int((~linked).sum())
        ids[~linked] = np.arange(next_id, next_id + n_new)
        s["track_next_id"][0] = next_id + n_new
        keep = min(len(positions), len(s["track_prev_pos"]))
        s["track_prev_pos"][:keep] = positions[:keep]
        s["track_prev_cls"][:keep] = classes[:keep]
        s["track_prev_ids"][:keep] = ids[:keep]
        s["track_prev_n"][0] = keep
        self.prev_frame = frame
        return ids

    def _accumulate(self, disp: np.ndarray, before: np.ndarray, after: np.ndarray) -> None:
        if len(disp) >= 3:
            disp = disp - np.median(disp, axis=0)
        valid = (before >= 0) & (after >= 0) & (before < self.n_classes) & (after < self.n_classes)
        np.add.at(self.transitions, (before[valid], after[valid]), 1)
        same = valid & (before == after)
        np.add.at(self.sum_sq, before[same], (disp[same] ** 2).sum(axis=1))
        np.add.at(self.steps, before[same], 1)

    def diffusion(self) -> np.ndarray:
        """Per-class diffusion coefficient by the lag-1 MSD estimator, float64 ``(n_classes,)``,
        px^2/s; NaN for a class with no same-class link yet."""
        return diffusion(self.sum_sq, self.steps, self.dt)

    def transition_matrix(self) -> np.ndarray:
        """Row-normalised transition counts, float64 ``(n_classes, n_classes)``; NaN rows for
        classes never seen at the start of a link."""
        return transition_matrix(self.transitions)


def diffusion(sum_sq: np.ndarray, steps: np.ndarray, dt: float) -> np.ndarray:
    """Lag-1 MSD diffusion coefficients ``sum_sq / (4 steps dt)``, float64 ``(K,)``, px^2/s (NaN
    where ``steps`` is 0), from float64 ``(K,)`` sums of squared displacements (px^2), int
    ``(K,)`` link counts and the frame time ``dt`` (s)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(steps > 0, sum_sq / (4.0 * np.maximum(steps, 1) * dt), np.nan)


def transition_matrix(transitions: np.ndarray) -> np.ndarray:
    """Row-normalised int ``(K, K)`` transition counts, float64 ``(K, K)``; NaN rows where a row
    has no count."""
    rows = transitions.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, transitions / np.maximum(rows, 1), np.nan)
