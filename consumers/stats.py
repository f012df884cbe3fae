"""``stats``: per-point total, maximum and mean of a spectrum or frame, as maps.

The simplest consumer, and the reference for the interface: its maps must equal
``values.sum(axis=sig_axes)`` (etc.) computed with numpy on the same data, whatever the batching.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import BufferSpec, Consumer, ConsumerParams, NotApplicable, finite_rows, first_array_key, stack_rows


class StatsParams(ConsumerParams):
    data_key: str | None = None
    """Data key to reduce; default: the first inline array key (1-D spectrum or 2-D frame)."""
    units: str = ""
    """Units of the data values (e.g. ``"counts"``), published with the maps."""


class StatsConsumer(Consumer):
    """Maps of total, max and mean per scan point.

    Input: the data key's values, ``(n_events, *sig_shape)``, any real dtype (summed as float64).
    Output (``nav``, float64): ``total``, ``max``, ``mean``. Points with non-finite values are
    skipped and counted under ``nonfinite``.
    """

    name = "stats"
    Params = StatsParams
    params: StatsParams

    def descriptor(self, doc: Mapping[str, Any]) -> None:
        self.key = self.params.data_key or first_array_key(doc, ndim=(1, 2))
        if self.key not in doc["data_keys"]:
            raise NotApplicable(f"data key {self.key!r} not in the primary descriptor")
        self.sig_shape = tuple(doc["data_keys"][self.key].get("shape") or ())

    def result_buffers(self) -> list[BufferSpec]:
        u = self.params.units
        return [
            BufferSpec("total", "nav", units=u, description=f"sum of {self.key} over the signal"),
            BufferSpec("max", "nav", units=u, description=f"maximum of {self.key}"),
            BufferSpec("mean", "nav", units=u, description=f"mean of {self.key}"),
        ]

    def event_page(self, doc: Mapping[str, Any], positions: np.ndarray) -> None:
        x = stack_rows(doc["data"][self.key], self.sig_shape)
        ok = finite_rows(x) & (positions >= 0)
        self.run.skipped("nonfinite", int((~finite_rows(x)).sum()))
        x, pos = x[ok].reshape(int(ok.sum()), -1), positions[ok]
        self.results.total[pos] = x.sum(axis=1)
        self.results.max[pos] = x.max(axis=1, initial=-np.inf)
        self.results.mean[pos] = x.mean(axis=1) if x.shape[1] else np.nan
