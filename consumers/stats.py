"""``stats``: per-point total, maximum and mean of a spectrum, a detector frame or a scalar reading,
as maps; optionally normalised by a monitor reading (I0) of the same run.

The simplest consumer, and the reference for the contract (:mod:`beamlens.consumers.base`): its
maps equal ``values.sum(axis=sig_axes)`` (etc.) computed with numpy on the same data, whatever the
batching and however the run is split and merged. Events and frames are one idea here: the first
array signal offered (an event data key, or a frame series when ``signal: frame``) is reduced;
frames go through the fused single-pass kernel (:func:`beamlens.consumers.kernels.frame_sum_max`),
exact in 64-bit integers for integer pixels.

With ``normalize_by: I0`` the consumer also takes that scalar event field and publishes
``total_norm = total / I0`` per point. The two inputs arrive in batches of their own, in either
order (frames and events travel by different transports): each is kept in a nav buffer and the
ratio is derived from the buffers in :meth:`StatsConsumer.results`, so it is the same whichever
came first.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from .base import (
    Batch, BufferSpec, Consumer, ConsumerParams, NotApplicable, SignalInfo, array_signals,
    finite_rows, main_signal,
)
from .kernels import frame_sum_max


class StatsParams(ConsumerParams):
    data_key: str | None = None
    """Event data key (or frame source name) to reduce; default: the first array signal offered."""
    signal: Literal["any", "event", "frame"] = "any"
    """Which kind of signal to take: event data keys, detector frames, or whichever comes first."""
    units: str | None = None
    """Units of the values (e.g. ``"counts"``), published with the maps; default: the data key's
    ``units``, ``"counts"`` for frames."""
    normalize_by: str | None = None
    """A scalar event data key (a monitor, I0) to divide the total by, point by point."""


class StatsConsumer(Consumer):
    """Maps of total, max and mean per scan point.

    Input: one array signal, ``(n, *sig_shape)``, any real dtype; optionally a scalar monitor.
    Output (``nav``, float64): ``total``, ``max``, ``mean`` (total / values per point); with
    ``normalize_by``, ``total_norm`` (total / monitor; NaN until both are known at a point) and the
    private ``monitor``. Points with non-finite values are skipped and counted under ``nonfinite``.
    Mergeable: every buffer is per point (``fill``), ``total_norm`` is derived.
    """

    name = "stats"
    Params = StatsParams
    params: StatsParams

    def signal(self, info: SignalInfo) -> list[BufferSpec]:
        p = self.params
        if p.normalize_by is not None and info.kind == "event" and info.name == p.normalize_by:
            if info.sig_shape != ():
                raise NotApplicable(f"normalize_by {p.normalize_by!r} has shape {info.sig_shape}, not a scalar")
            self.monitor = info.name
            return [BufferSpec("monitor", "nav", units=info.units, private=True, description=f"{info.name} per point")]
        main_signal(self, info, p.data_key)
        if p.signal not in ("any", info.kind) or not array_signals(info):
            raise NotApplicable(f"{info.kind} signal {info.name!r} of shape {info.sig_shape} is not an array to reduce")
        self.key, self.kind, self.n_values = info.name, info.kind, int(np.prod(info.sig_shape))
        u = p.units if p.units is not None else (info.units or ("counts" if info.kind == "frame" else ""))
        what = "detector frame" if info.kind == "frame" else info.name
        specs = [
            BufferSpec("total", "nav", units=u, description=f"sum of each {what}"),
            BufferSpec("max", "nav", units=u, description=f"maximum of each {what}"),
            BufferSpec("mean", "nav", units=u, description=f"mean of each {what}"),
        ]
        if p.normalize_by is not None:
            specs.append(BufferSpec("total_norm", "nav", units=f"{u}/{p.normalize_by}" if u else "", merge=None,
                                    description=f"sum of each {what} divided by {p.normalize_by}"))
        return specs

    def process(self, batch: Batch, staged: object = None) -> bool:
        b = self.buffers
        if batch.signal.name != self.key:  # the monitor
            b.monitor[batch.nav_index] = batch.data
            return True
        x = batch.data.reshape(len(batch), -1)
        ok = finite_rows(x)
        if not ok.all():
            self.run.skipped("nonfinite", int((~ok).sum()))
            x, pos = x[ok], batch.nav_index[ok]
        else:
            pos = batch.nav_index
        if not len(pos):
            return False
        if self.kind == "frame" and x.shape[1]:
            total, maximum = frame_sum_max(x)
        else:
            total, maximum = x.sum(axis=1, dtype=np.float64), x.max(axis=1, initial=-np.inf)
        b.total[pos] = total
        b.max[pos] = maximum
        b.mean[pos] = np.asarray(total, dtype=np.float64) / self.n_values if self.n_values else np.nan
        return self.params.normalize_by is not None

    def results(self) -> None:
        if "total_norm" not in self.buffers or "monitor" not in self.buffers:
            return
        b = self.buffers
        with np.errstate(divide="ignore", invalid="ignore"):
            b.total_norm[...] = np.where(b.monitor != 0, b.total / b.monitor, np.nan)


class FrameStatsParams(StatsParams):
    signal: Literal["any", "event", "frame"] = "frame"
    """Detector frames by default (see :class:`FrameStatsConsumer`)."""


class FrameStatsConsumer(StatsConsumer):
    """``frame_stats``: the name configs used before ``stats`` took frames too; ``stats`` with
    ``signal: frame`` by default (same buffers, same maps)."""

    name = "frame_stats"
    Params = FrameStatsParams
