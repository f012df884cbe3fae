"""Where a scan point lands in the map: seq_num -> flat nav index.

Follows bluesky's grid conventions (``bluesky.callbacks.mpl_plotting.LiveGrid`` and
``bluesky.plan_patterns``): the RunStart of a ``grid_scan`` carries ``shape`` (slowest axis first) and
``snaking`` (one bool per axis); event ``seq_num`` counts from 1 in acquisition order. An axis with
``snaking[k]`` true runs backwards on every other pass, i.e. when the number of completed passes
``(seq_num - 1) // prod(shape[k:])`` is odd (``bluesky.utils.snake_cyclers``; for a 2-D scan: odd
rows are flipped). Without a ``shape`` the map is one-dimensional in seq_num order,
with length ``num_points`` when the RunStart gives it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def nav_shape_from_start(start: Mapping[str, Any]) -> tuple[int, ...]:
    """Scan shape of a run from its RunStart: ``shape`` if present and positive, else
    ``(num_points,)``, else ``(0,)`` (unknown length, grows as events arrive)."""
    shape = start.get("shape")
    if isinstance(shape, Sequence) and shape and all(isinstance(n, int) and n > 0 for n in shape):
        return tuple(int(n) for n in shape)
    num = start.get("num_points")
    if isinstance(num, int) and num > 0:
        return (num,)
    return (0,)


def snaking_from_start(start: Mapping[str, Any], ndim: int) -> tuple[bool, ...]:
    """``snaking`` from the RunStart, padded with False to ``ndim`` axes."""
    snaking = start.get("snaking") or ()
    flags = [bool(s) for s in list(snaking)[:ndim]]
    return tuple(flags + [False] * (ndim - len(flags)))


def flat_positions(seq_nums: np.ndarray, shape: tuple[int, ...], snaking: tuple[bool, ...]) -> np.ndarray:
    """Map event seq_nums to flat C-order indices of a map of ``shape``.

    Args:
        seq_nums: int array ``(n,)``, 1-based as in Event documents.
        shape: scan shape; ``(0,)`` for unknown length (index = seq_num - 1).
        snaking: per-axis snake flags, ``len(snaking) == len(shape)``.

    Returns:
        int64 array ``(n,)``; ``-1`` where a seq_num is < 1 or beyond the scan shape.
    """
    idx = np.asarray(seq_nums, dtype=np.int64) - 1
    if shape == (0,):
        return np.where(idx >= 0, idx, -1)
    size = int(np.prod(shape))
    valid = (idx >= 0) & (idx < size)
    safe = np.where(valid, idx, 0)
    multi = list(np.unravel_index(safe, shape))
    for axis in range(1, len(shape)):
        if snaking[axis]:
            # how many times this axis has been restarted so far (bluesky.utils.snake_cyclers)
            restarts = safe // int(np.prod(shape[axis:]))
            multi[axis] = np.where(restarts % 2 == 1, shape[axis] - 1 - multi[axis], multi[axis])
    flat = np.ravel_multi_index(multi, shape)
    return np.where(valid, flat, -1).astype(np.int64)
