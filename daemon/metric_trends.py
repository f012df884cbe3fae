"""Samples of the daemon's own Prometheus metrics into the trend store, for trends series keyed
``metric/<metric name>{<label matcher>}`` (:mod:`beamlens.consumers.trends`).

Consumers never read the daemon's registry (layering), so the daemon writes the samples where the
``trends`` consumer reads series that span runs: the trend store
(:mod:`beamlens.consumers.trend_store`). :func:`metric_series` collects the metric series of the
configured ``trends`` consumers; :func:`metric_key_errors` checks at start that each names a gauge
or counter sample the registry has (``consumers[<i>].params.series[<j>].key`` otherwise);
:class:`MetricSampler` reads each one every ``sample_every_s`` on its own thread (never the router's)
and stores ``(x = Unix time, value)`` under run ``metrics:<uuid of this daemon start>`` with an
increasing ``seq``, so the history survives restarts and ``kill -9`` like every stored series.

A sample is read with the PromQL-style equality matcher of the key
(:func:`~beamlens.consumers.trend_store.parse_metric_key`): exactly one sample of that name whose
labels include all the matcher's must exist, and its value must be finite; otherwise nothing is
stored and ``beamlens_metric_samples_skipped_total{series, reason}`` counts it (``no_match``,
``ambiguous``, ``not_finite``). A failure of the store (disk full, locked) is counted in
``beamlens_internal_errors_total{component="metric_trends"}`` and the next sample is tried on time.
A counter is trended as its raw value, which restarts from 0 with the daemon.

Source followed: prometheus_client's ``CollectorRegistry.collect()`` / ``restricted_registry()``
(https://prometheus.github.io/client_python/), Prometheus' data model for names and labels
(https://prometheus.io/docs/concepts/data_model/).
"""
from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from beamlens.consumers.trend_store import TrendStore, parse_metric_key
from beamlens.consumers.trends import TrendsParams

from .config import Config, ConfigError, consumer_params
from .isolation import RateLimitedLog, guarded
from .metrics import Metrics

log = logging.getLogger(__name__)

SKIP_REASONS = ("no_match", "ambiguous", "not_finite")
SAMPLEABLE_TYPES = ("gauge", "counter")


@dataclass(frozen=True)
class MetricSeries:
    """One metric the daemon samples into one trend store.

    Attributes:
        key: the series key (``metric/<name>{...}``), also the store's series key.
        name: the Prometheus sample name (a counter's with ``_total``).
        labels: the equality matcher, ``((label, value), ...)``.
        every_s: sampling interval, s (the smallest of the series that declare this key).
        store: the trend-store file.
        path: YAML path of the first declaring key (``consumers[0].params.series[1].key``).
    """

    key: str
    name: str
    labels: tuple[tuple[str, str], ...]
    every_s: float
    store: Path
    path: str


def metric_series(config: Config) -> list[MetricSeries]:
    """The metric series of the enabled ``trends`` consumers of ``config``, one per (store, key)."""
    found: dict[tuple[Path, str], MetricSeries] = {}
    for i, c in enumerate(config.consumers):
        if not c.enabled:
            continue
        params = consumer_params(c.resolve(), c.params, config)
        if not isinstance(params, TrendsParams):
            continue
        for j, s in enumerate(params.series):
            if s.reads != "metric" or params.store is None:
                continue
            name, labels = parse_metric_key(s.key)
            k = (Path(params.store), s.key)
            prev = found.get(k)
            every = s.sample_every_s if prev is None else min(prev.every_s, s.sample_every_s)
            found[k] = MetricSeries(s.key, name, labels, float(every), Path(params.store),
                                    prev.path if prev else f"consumers[{i}].params.series[{j}].key")
    return list(found.values())


def sample_names(registry: CollectorRegistry) -> dict[str, str]:
    """``{sample name: type}`` of the registry's gauges and counters (counters as ``<name>_total``,
    the name ``/metrics`` shows)."""
    out = {}
    for family in registry.collect():
        if family.type == "gauge":
            out[family.name] = "gauge"
        elif family.type == "counter":
            out[f"{family.name}_total"] = "counter"
    return out


def metric_key_errors(series: list[MetricSeries], registry: CollectorRegistry) -> list[tuple[str, str]]:
    """``(yaml_path, message)`` for each series whose metric is not a gauge or counter of ``registry``."""
    names = sample_names(registry)
    errors = []
    for s in series:
        if s.name not in names:
            near = sorted(n for n in names if n.startswith("beamlens_") and s.name.split("_")[1:2] == n.split("_")[1:2])
            errors.append((s.path, f"{s.name!r} is not a gauge or counter of this daemon's /metrics"
                                   + (f" (similar: {', '.join(near[:5])})" if near else "")))
    return errors


def check_metric_names(config: Config, registry: CollectorRegistry | None = None,
                       source: str = "<config>") -> list[MetricSeries]:
    """The metric series of ``config`` (:func:`metric_series`), checked against ``registry`` (the
    daemon's; by default a fresh :class:`~beamlens.daemon.metrics.Metrics` registry, which has
    every metric the daemon exports: ``beamlens check-config``); ``source`` names the config in
    the error.

    Raises:
        ConfigError: a series names no gauge or counter of the registry, with its YAML path.
    """
    series = metric_series(config)
    errors = metric_key_errors(series, registry if registry is not None else Metrics().registry)
    if errors:
        raise ConfigError(source, errors)
    return series


def read_sample(registry: CollectorRegistry, name: str, labels: tuple[tuple[str, str], ...]) -> float | str:
    """The value of the one sample ``name`` whose labels include ``labels``, or the skip reason
    (:data:`SKIP_REASONS`) when none, several or a non-finite one match."""
    matches = [sample.value for family in registry.restricted_registry([name]).collect()
               if family.type in SAMPLEABLE_TYPES for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels)]
    if not matches:
        return "no_match"
    if len(matches) > 1:
        return "ambiguous"
    value = float(matches[0])
    return value if math.isfinite(value) else "not_finite"


class MetricSampler:
    """Samples ``series`` from ``metrics.registry`` into their trend stores on its own thread.

    Args:
        series: what to sample (:func:`metric_series`).
        metrics: the daemon's metrics (registry read; skips and internal errors counted there).
        clock: Unix time of a sample, s (tests may pass their own).
    """

    def __init__(self, series: list[MetricSeries], metrics: Metrics, clock=time.time):
        self.series = series
        self.metrics = metrics
        self.clock = clock
        self.run_uid = f"metrics:{uuid.uuid4()}"
        self._seq = itertools.count(1)
        self._stores: dict[Path, TrendStore] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rlog = RateLimitedLog(log)
        if series:
            metrics.internal_errors.labels("metric_trends")
        for s in series:
            for reason in SKIP_REASONS:
                metrics.metric_samples_skipped.labels(s.key, reason)

    def sample(self, s: MetricSeries) -> bool:
        """Read ``s`` once and store it; False (counted) when skipped.

        Raises:
            TrendStoreError, sqlite3.Error: the store cannot be opened or written.
        """
        value = read_sample(self.metrics.registry, s.name, s.labels)
        if isinstance(value, str):
            self.metrics.metric_samples_skipped.labels(s.key, value).inc()
            self.rlog.log(logging.WARNING, f"{s.key}:{value}", "metric series %s: sample skipped (%s)", s.key, value)
            return False
        store = self._stores.get(s.store)
        if store is None:
            store = self._stores[s.store] = TrendStore(s.store)
        now = self.clock()
        store.add(s.key, self.run_uid, [next(self._seq)], [now], [value], timestamp=now)
        return True

    def _loop(self) -> None:
        due = [time.monotonic()] * len(self.series)
        while not self._stop.is_set():
            now = time.monotonic()
            for i, s in enumerate(self.series):
                if now >= due[i]:
                    due[i] = now + s.every_s
                    guarded("metric_trends", self._count_internal, self.rlog, self.sample, s)
            self._stop.wait(max(0.0, min(due) - time.monotonic()))

    def _count_internal(self, component: str) -> None:
        self.metrics.internal_errors.labels(component).inc()

    @property
    def thread(self) -> threading.Thread | None:
        """The sampling thread while running (a vital thread of the daemon)."""
        return self._thread

    def start(self) -> None:
        if self.series and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="beamlens-metric-trends", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for store in self._stores.values():
            store.close()
        self._stores.clear()
