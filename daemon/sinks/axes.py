"""Scan axes of a run in motor units, for run files, derived documents and Tiled.

Two sources, in this order:

1. **Motor readings** in the raw run's events (``data[<motor>]`` for each name in RunStart
   ``motors``), placed on the map with the event's ``seq_num`` like every result
   (:func:`beamlens.daemon.placement.flat_positions`). This is what the motors really read, and the
   only source that is right for relative plans (``rel_grid_scan``, ``rel_scan``), whose RunStart
   holds offsets from a position it does not record.
2. **The RunStart's plan pattern** (``bluesky.plan_patterns``), when no readings arrived:

   - ``outer_product`` (``grid_scan``): ``args = [m1, start, stop, num, m2, start, stop, num, snake, ...]``:
     bluesky puts a snake flag after every motor but the first (9 args for two motors); the older
     form without flags (``4 * n`` args) is read too.
   - ``inner_product`` (``scan``): ``args = [m1, start, stop, m2, start, stop, ...]`` and ``num``.
   - ``inner_list_product`` (``list_scan``): ``args = [m1, [p0, p1, ...], m2, [...], ...]``.

   Relative plans (``plan_name`` starting with ``rel_``) are skipped: their offsets are not positions.

A map of ``ndim`` axes driven by ``ndim`` motors (grid) gets one axis per dimension: the mean
reading along the other dimensions. A one-dimensional map driven by several motors at once
(``scan``, ``list_scan``) gets one axis per motor, all on dimension 0 (NeXus auxiliary axes).
Anything else falls back to point indices ``scan_dim_<i>`` (unit ``""``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..placement import flat_positions


@dataclass
class Axis:
    """One axis of a map or spectrum: ``values`` ``(n,)`` float64 in ``units`` on map dimension ``dim``."""

    name: str
    values: np.ndarray
    units: str = ""
    dim: int = 0


def motor_names(start_doc: Mapping[str, Any]) -> list[str]:
    """RunStart ``motors`` as strings (bluesky writes motor names; anything else is dropped)."""
    motors = start_doc.get("motors") or []
    if not isinstance(motors, Sequence) or isinstance(motors, str):
        return []
    return [m for m in motors if isinstance(m, str) and m]


class MotorReadings:
    """Motor readings of one raw run, gathered from its event pages (router thread).

    Args:
        start_doc: the raw RunStart (its ``motors`` are followed).
        nav_shape: the map shape; ``(0,)`` for unknown length.
        snaking: per-axis snake flags.
        max_points: readings beyond this flat position are ignored (bounds memory on hostile seq_nums).
    """

    def __init__(self, start_doc: Mapping[str, Any], nav_shape: tuple[int, ...], snaking: tuple[bool, ...],
                 max_points: int = 10_000_000):
        self.motors = motor_names(start_doc)
        self.nav_shape, self.snaking, self.max_points = nav_shape, snaking, max_points
        self.values: dict[str, np.ndarray] = {}
        self.units: dict[str, str] = {}

    def descriptor(self, doc: Mapping[str, Any]) -> None:
        for key, dk in (doc.get("data_keys") or {}).items():
            if key in self.motors and isinstance(dk, Mapping) and dk.get("units"):
                self.units.setdefault(key, str(dk["units"]))

    def event_page(self, doc: Mapping[str, Any]) -> None:
        data = doc.get("data") or {}
        present = [m for m in self.motors if m in data]
        if not present:
            return
        positions = flat_positions(np.asarray(doc["seq_num"]), self.nav_shape, self.snaking)
        ok = (positions >= 0) & (positions < self.max_points)
        if not ok.any():
            return
        top = int(positions[ok].max()) + 1
        for motor in present:
            try:
                vals = np.asarray(data[motor], dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                continue
            if vals.shape != positions.shape:
                continue
            arr = self.values.get(motor)
            if arr is None or len(arr) < top:
                size = max(top, int(np.prod(self.nav_shape)) if self.nav_shape != (0,) else top)
                grown = np.full(size, np.nan)
                if arr is not None:
                    grown[: len(arr)] = arr
                self.values[motor] = arr = grown
            arr[positions[ok]] = vals[ok]


def _from_readings(readings: MotorReadings, nav_shape: tuple[int, ...], units: Mapping[str, str]) -> list[Axis]:
    n = int(np.prod(nav_shape))
    motors = [m for m in readings.motors if m in readings.values]
    if not motors or motors != readings.motors:
        return []
    flat = {}
    for m in motors:
        v = np.full(n, np.nan)
        have = readings.values[m][:n]
        v[: len(have)] = have
        flat[m] = v
    if len(nav_shape) == len(motors):
        axes = []
        for i, m in enumerate(motors):
            grid = flat[m].reshape(nav_shape)
            other = tuple(k for k in range(len(nav_shape)) if k != i)
            with np.errstate(invalid="ignore"):
                counts = np.sum(np.isfinite(grid), axis=other) if other else np.isfinite(grid).astype(int)
                sums = np.nansum(grid, axis=other) if other else np.nan_to_num(grid)
                values = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
            axes.append(Axis(m, values, units.get(m, ""), i))
        return axes
    if len(nav_shape) == 1:
        return [Axis(m, flat[m], units.get(m, ""), 0) for m in motors]
    return []


def _number(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"not a finite number: {x!r}")
    return float(x)


def _count(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not 0 < x <= 100_000_000:
        raise ValueError(f"not a point count: {x!r}")
    return int(x)


def _from_pattern(start_doc: Mapping[str, Any], nav_shape: tuple[int, ...], motors: list[str],
                  units: Mapping[str, str]) -> list[Axis]:
    if str(start_doc.get("plan_name", "")).startswith("rel_"):
        return []
    pattern = start_doc.get("plan_pattern")
    pargs = start_doc.get("plan_pattern_args") or {}
    if not isinstance(pargs, Mapping):
        return []
    args = list(pargs.get("args") or [])
    m = len(motors)
    if pattern == "outer_product" and m == len(nav_shape):
        if len(args) == 4 + 5 * (m - 1):  # bluesky: a snake flag after every motor but the first
            chunks = [args[0:4]] + [args[4 + 5 * j: 8 + 5 * j] for j in range(m - 1)]
        elif len(args) == 4 * m:
            chunks = [args[4 * j: 4 * j + 4] for j in range(m)]
        else:
            return []
        axes = [Axis(motors[i], np.linspace(_number(c[1]), _number(c[2]), _count(c[3])), units.get(motors[i], ""), i)
                for i, c in enumerate(chunks)]
        return axes if [len(a.values) for a in axes] == list(nav_shape) else []
    if len(nav_shape) != 1 or not m:
        return []
    n = nav_shape[0]
    if pattern == "inner_product" and len(args) == 3 * m:
        num = _count(pargs.get("num"))
        if num != n:
            return []
        return [Axis(motors[j], np.linspace(_number(args[3 * j + 1]), _number(args[3 * j + 2]), n), units.get(motors[j], ""))
                for j in range(m)]
    if pattern == "inner_list_product" and len(args) == 2 * m:
        axes = []
        for j in range(m):
            points = args[2 * j + 1]
            if not isinstance(points, Sequence) or len(points) != n:
                return []
            axes.append(Axis(motors[j], np.array([_number(p) for p in points]), units.get(motors[j], "")))
        return axes
    return []


def scan_axes(start_doc: Mapping[str, Any], nav_shape: tuple[int, ...], motor_units: Mapping[str, str],
              readings: MotorReadings | None = None) -> list[Axis]:
    """Scan axes of a run (see the module docstring for the rules and their order).

    Args:
        start_doc: the raw RunStart.
        nav_shape: the map shape the results are published in.
        motor_units: units by motor name, from the primary descriptor's data keys.
        readings: motor readings gathered from the run's events, if any.

    Returns:
        axes in motor units; point indices ``scan_dim_<i>`` when no motor axis can be derived.
        Never raises on malformed RunStart content (it falls back to indices).
    """
    units = dict(motor_units)
    measured: list[Axis] = []
    if readings is not None:
        units = {**readings.units, **units}
        measured = _from_readings(readings, nav_shape, units)
        if measured and all(np.isfinite(a.values).all() for a in measured):
            return measured
    try:
        planned = _from_pattern(start_doc, nav_shape, motor_names(start_doc), units)
    except (TypeError, ValueError):
        planned = []
    if planned or measured:  # a run stopped early: the plan's positions, else what was read
        return planned or measured
    return [Axis(f"scan_dim_{i}", np.arange(n, dtype=np.float64), "", i) for i, n in enumerate(nav_shape)]
