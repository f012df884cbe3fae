"""Compiled per-frame reductions (numba, ``nogil``: they run in parallel with 0MQ receive threads).

:func:`frame_sum_max` is the fused single-pass statistics kernel of the frame path: it reads each
frame once and produces its sum and maximum together, where numpy needs two passes and a widening
reduction (``sum(dtype=uint64)``) that runs at about a third of memory bandwidth
(``shared/reference/performance.md`` B5). Integer frames are summed exactly in 64-bit integers,
floats in float64.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _sum_max(frames, zero, total, maximum):  # pragma: no cover - compiled
    for i in range(frames.shape[0]):
        f = frames[i]
        s = zero
        m = f[0]
        for j in range(f.shape[0]):
            v = f[j]
            s += v
            if v > m:
                m = v
        total[i] = s
        maximum[i] = m


def frame_sum_max(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum and maximum of each frame, in one pass over the data.

    Args:
        frames: ``(n, *sig_shape)``, any integer or float dtype, C-contiguous or not (non-contiguous
            input is copied once), with at least one pixel per frame.

    Returns:
        ``(total, maximum)``, float64 ``(n,)`` each. Integer sums are exact up to 2**53 before the
        conversion to float64. NaN pixels make the total NaN and are ignored by the maximum.

    Raises:
        ValueError: for frames with no pixels or a non-numeric dtype.
    """
    n = frames.shape[0]
    flat = np.ascontiguousarray(frames).reshape(n, -1)
    if flat.shape[1] == 0:
        raise ValueError("frames have no pixels")
    kind = flat.dtype.kind
    if kind not in "uif":
        raise ValueError(f"cannot reduce frames of dtype {flat.dtype}")
    zero = np.uint64(0) if kind == "u" else np.int64(0) if kind == "i" else np.float64(0.0)
    total = np.empty(n, dtype=np.uint64 if kind == "u" else np.int64 if kind == "i" else np.float64)
    maximum = np.empty(n, dtype=flat.dtype)
    _sum_max(flat, zero, total, maximum)
    return total.astype(np.float64), maximum.astype(np.float64)
