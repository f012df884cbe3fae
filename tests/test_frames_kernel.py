"""The fused statistics kernel equals plain numpy on the same frames, whatever the dtype and batching."""
from __future__ import annotations

import numpy as np
import pytest

from beamlens.consumers.kernels import frame_sum_max


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int16", "float32", "float64"])
def test_sum_max_matches_numpy(dtype):
    rng = np.random.default_rng(1)
    if np.dtype(dtype).kind == "f":
        frames = rng.normal(100, 30, (5, 31, 17)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        frames = rng.integers(info.min, info.max, (5, 31, 17), dtype=dtype, endpoint=True)
    total, maximum = frame_sum_max(frames)
    flat = frames.reshape(5, -1)
    exact = flat.astype(np.float64).sum(axis=1) if frames.dtype.kind == "f" else flat.astype(object).sum(axis=1).astype(np.float64)
    np.testing.assert_allclose(total, exact, rtol=1e-6 if frames.dtype.kind == "f" else 0)
    np.testing.assert_array_equal(maximum, flat.max(axis=1).astype(np.float64))


def test_batching_does_not_change_results():
    frames = np.random.default_rng(2).integers(0, 4096, (12, 64, 48), dtype=np.uint16)
    whole = frame_sum_max(frames)
    parts = [frame_sum_max(frames[i:i + 5]) for i in range(0, 12, 5)]
    for k in range(2):
        np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))


def test_non_contiguous_and_large_uint32_sums_are_exact():
    frames = np.full((2, 600, 600), np.iinfo(np.uint32).max, dtype=np.uint32)[:, ::2, ::3]
    total, _ = frame_sum_max(frames)
    assert total[0] == float(300 * 200 * (2**32 - 1))


def test_rejects_empty_frames():
    with pytest.raises(ValueError):
        frame_sum_max(np.zeros((2, 0), dtype=np.uint16))
