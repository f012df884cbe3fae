"""Partial results of per-batch partitions of mergeable consumers, and how the daemon folds them
in (the ``executor.partitions`` path of :mod:`beamlens.daemon.executors`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from beamlens.consumers.base import Buffers


@dataclass
class Partial:
    """The partial result of one batch processed by a fresh instance of a mergeable consumer
    elsewhere (a Dask worker): its buffers with one nav row per distinct nav index of the batch.

    Attributes:
        rows: int64 ``(m,)`` the run's nav indices of the partial's nav rows (sorted, distinct).
        arrays: buffer name -> array; nav buffers ``(m, *extra_shape)``, sig and single buffers
            whole.
        skipped: reason -> points the consumer reported skipped (counted on the daemon).
        ask_results: what ``process`` returned (True: call ``results()`` after the merge).
    """

    rows: np.ndarray
    arrays: dict[str, np.ndarray]
    skipped: dict[str, int] = field(default_factory=dict)
    ask_results: bool = False


def merge_partial(consumer: Any, partial: Partial, rows: np.ndarray | None = None) -> bool:
    """Fold ``partial`` into ``consumer``'s buffers with the consumer's own :meth:`merge` (the
    contract's rule: partial results of disjoint parts combine into the sequential result): the
    nav rows ``rows`` (default ``partial.rows``; the run table shifts them when the window rolled)
    of every nav buffer and the whole sig/single buffers form ``dest``, the partial ``src``; what
    the merge wrote is put back. Returns ``partial.ask_results``.

    Raises:
        ValueError: the partial's buffers do not match the consumer's (another run's layout).
    """
    rows = partial.rows if rows is None else rows
    keep = slice(None) if rows is partial.rows else rows >= 0
    rows = rows[keep]
    buffers = consumer.buffers
    dest, src = {}, {}
    for name, spec in buffers.specs.items():
        if name not in partial.arrays:
            continue
        if spec.kind == "nav":
            dest[name], src[name] = buffers[name][rows], partial.arrays[name][keep]
        else:
            dest[name], src[name] = buffers[name], partial.arrays[name]
    specs = {n: buffers.specs[n] for n in dest}
    consumer.merge(Buffers(dest, specs), Buffers(src, specs))
    for name, spec in specs.items():
        if spec.kind == "nav":
            buffers[name][rows] = dest[name]
    for reason, n in partial.skipped.items():
        consumer.run.skipped(reason, n)
    return bool(partial.ask_results)
