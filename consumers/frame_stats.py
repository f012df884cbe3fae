"""``frame_stats``: per-frame total, maximum and mean of detector frames, as maps.

The frame-path counterpart of :mod:`beamlens.consumers.stats` (same buffers, so a page shows both
the same way): for a 4D-STEM scan ``total`` is the bright+dark-field integrated intensity map, for an
X-ray raster scan the transmitted/scattered counts map. One fused pass per frame
(:func:`beamlens.consumers.kernels.frame_sum_max`); the maps equal
``frames.reshape(n, -1).sum(axis=1)`` (etc.) computed with numpy on the same frames, whatever the
batching.
"""
from __future__ import annotations

import numpy as np

from .base import BadData, BufferSpec, Consumer, ConsumerParams, NotApplicable, SeriesInfo
from .kernels import frame_sum_max


class FrameStatsParams(ConsumerParams):
    units: str = "counts"
    """Units of the pixel values, published with the maps."""


class FrameStatsConsumer(Consumer):
    """Maps of total, max and mean per scan point, one detector frame per point.

    Input: frames ``(n, *sig_shape)`` of an integer or float dtype. Output (``nav``, float64):
    ``total`` (sum over the frame), ``max``, ``mean`` (total / pixels). Frames outside the scan
    (position -1) are skipped and counted under ``outside_scan``.
    """

    name = "frame_stats"
    Params = FrameStatsParams
    params: FrameStatsParams
    inputs = "frames"

    def series(self, info: SeriesInfo) -> None:
        if not info.sig_shape or np.dtype(info.dtype or "V").kind not in "uif":
            raise NotApplicable(f"frames of shape {info.sig_shape} and dtype {info.dtype!r} cannot be reduced")
        self.n_pixels = int(np.prod(info.sig_shape))

    def result_buffers(self) -> list[BufferSpec]:
        u = self.params.units
        return [
            BufferSpec("total", "nav", units=u, description="sum of each detector frame"),
            BufferSpec("max", "nav", units=u, description="maximum pixel of each detector frame"),
            BufferSpec("mean", "nav", units=u, description="mean pixel value of each detector frame"),
        ]

    def frames(self, frames: np.ndarray, positions: np.ndarray, info: SeriesInfo) -> None:
        if frames.shape[1:] != tuple(info.sig_shape):
            raise BadData("wrong_shape", f"frames of shape {frames.shape[1:]} in a series of {info.sig_shape}")
        inside = positions >= 0
        self.run.skipped("outside_scan", int((~inside).sum()))
        if not inside.all():
            frames, positions = frames[inside], positions[inside]
        if not len(positions):
            return
        total, maximum = frame_sum_max(frames)
        self.results.total[positions] = total
        self.results.max[positions] = maximum
        self.results.mean[positions] = total / self.n_pixels
