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
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


class DefectTracker:
    """Incremental tracker and statistics.

    Args:
        n_classes: number of defect classes (labels ``0 .. n_classes - 1``; ``-1`` = unclassified,
            linked but left out of the statistics).
        max_displacement_px: largest displacement between consecutive frames that is linked, px.
        frame_time_s: time between consecutive frames, s.

    Raises:
        ValueError: for a non-positive ``max_displacement_px`` or ``frame_time_s``.
    """

    def __init__(self, n_classes: int, max_displacement_px: float, frame_time_s: float):
        if max_displacement_px <= 0 or frame_time_s <= 0:
            raise ValueError("max_displacement_px and frame_time_s must be positive")
        self.n_classes = n_classes
        self.max_displacement = float(max_displacement_px)
        self.dt = float(frame_time_s)
        self.transitions = np.zeros((n_classes, n_classes), dtype=np.int64)
        self.sum_sq = np.zeros(n_classes)
        self.steps = np.zeros(n_classes, dtype=np.int64)
        self.next_id = 0
        self.prev_frame: int | None = None
        self.prev_pos = np.empty((0, 2))
        self.prev_cls = np.empty(0, dtype=np.int64)
        self.prev_ids = np.empty(0, dtype=np.int64)

    def update(self, frame: int, positions: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Add one frame's detections.

        Args:
            frame: frame index (consecutive frames differ by 1).
            positions: float ``(n, 2)`` (row, col), px.
            classes: int ``(n,)`` class of each detection (``-1`` unclassified).

        Returns:
            int64 ``(n,)`` track id of each detection.
        """
        positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        classes = np.asarray(classes, dtype=np.int64)
        ids = np.empty(len(positions), dtype=np.int64)
        linked = np.zeros(len(positions), dtype=bool)
        if self.prev_frame is not None and frame == self.prev_frame + 1 and len(self.prev_pos) and len(positions):
            d = np.hypot(*(positions[:, None, :] - self.prev_pos[None, :, :]).transpose(2, 0, 1))
            cost = np.where(d <= self.max_displacement, d, 1e9)
            rows, cols = linear_sum_assignment(cost)
            ok = d[rows, cols] <= self.max_displacement
            rows, cols = rows[ok], cols[ok]
            ids[rows] = self.prev_ids[cols]
            linked[rows] = True
            self._accumulate(positions[rows] - self.prev_pos[cols], self.prev_cls[cols], classes[rows])
        n_new = int((~linked).sum())
        ids[~linked] = np.arange(self.next_id, self.next_id + n_new)
        self.next_id += n_new
        self.prev_frame, self.prev_pos, self.prev_cls, self.prev_ids = frame, positions, classes, ids
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
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.steps > 0, self.sum_sq / (4.0 * np.maximum(self.steps, 1) * self.dt), np.nan)

    def transition_matrix(self) -> np.ndarray:
        """Row-normalised transition counts, float64 ``(n_classes, n_classes)``; NaN rows for
        classes never seen at the start of a link."""
        rows = self.transitions.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(rows > 0, self.transitions / np.maximum(rows, 1), np.nan)
