"""Where consumers' per-batch stages run: the daemon's own pool (``executor.kind: local``, the
default) or a Dask distributed cluster (``kind: dask``, :mod:`beamlens.daemon.executors.dask`).

The seam is :attr:`beamlens.daemon.pool.JobPool.stage_executor`: None for the local pool, or an
object with ``submit(job, complete)``, ``cancel(job)``, ``limit``, ``partitions`` (names of the
mergeable consumers whose ``process`` runs there too, as per-batch partitions) and ``close()``. Everything else
(ordering of staged results, ``process`` on the router thread, failure counting) stays in the run
table, so both executors give the same results.

Partitions: a mergeable consumer without a stage that is named in ``executor.partitions`` has
each batch processed by a fresh instance on a worker (its partial buffers: :class:`Partial`), and
the daemon folds each partial into the run's instance with the consumer's ``merge`` as it arrives
(:func:`merge_partial`), then ``results()``; the run's final result is the sequential one (the
contract's merge property, tested per consumer with ``tests/partitions.py``).
"""
from __future__ import annotations

from typing import Any

from .partials import Partial, merge_partial

__all__ = ["Partial", "merge_partial", "stage_executor"]


def stage_executor(config: Any) -> Any:
    """The stage executor for ``config`` (an :class:`~beamlens.daemon.config.ExecutorConfig`):
    None for ``local``; a connected :class:`~beamlens.daemon.executors.dask.DaskStageExecutor` for
    ``dask``.

    Raises:
        ImportError: ``kind: dask`` without the ``dask`` extra (``pip install beamlens[dask]``).
        OSError: the scheduler cannot be reached within ``submit_timeout_s``.
    """
    if config.kind == "local":
        return None
    from .dask import DaskStageExecutor

    return DaskStageExecutor(config)
