"""Where consumers' per-batch stages run: the daemon's own pool (``executor.kind: local``, the
default) or a Dask distributed cluster (``kind: dask``, :mod:`beamlens.daemon.executors.dask`).

The seam is :attr:`beamlens.daemon.pool.JobPool.stage_executor`: None for the local pool, or an
object with ``submit(job, complete)``, ``cancel(job)``, ``limit`` and ``close()``. Everything else
(ordering of staged results, ``process`` on the router thread, failure counting) stays in the run
table, so both executors give the same results.
"""
from __future__ import annotations

from typing import Any


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
