"""``trends``: declared figures trended across points, runs and restarts, with Gaussian-process
forecasts of when each will cross its threshold.

Each declared series (:class:`SeriesConfig`) names an event data key of the primary stream as its
value (``key: primary/capacity``) and another one, ``seq_num`` or ``time`` as its x
(``x: primary/cycle``); or (``reads: store``) a series another consumer writes to the trend store,
``features/mean_particle_area`` with the x it stored (the cycle): consumers never read one another,
so the store is the seam; trends takes the run's frame signals as the trigger, reads the run's new
stored points after each batch (list it after the writer: consumers see a batch in config order)
and at :meth:`TrendsConsumer.finish`. The x may also be a numeric data key of another named stream
(``x: baseline/cycle``): one x per run, the first reading of that stream (bluesky's
``SupplementalData(baseline=[...])`` reads it at run start), given to every point of the run; the
consumer opts in to those signals (``streams = ("*",)``, :attr:`~beamlens.consumers.base.SignalInfo.stream`).
Values of other streams are refused at config time: values are per point of the scan.

A daemon metric is a series too (``key: metric/<metric name>``, optionally with a label matcher
``metric/beamlens_reconstruction_error_ratio{consumer="unmixing"}``, :func:`~beamlens.consumers.trend_store.parse_metric_key`):
the ``metric/`` prefix makes it one (``reads: metric``, set from the prefix). Consumers never read the
daemon's registry; the daemon samples it every ``sample_every_s`` into the trend store (its
``metric_trends`` module, run ``metrics:<start id>``, x = the sample's Unix time), and this consumer
reads the samples back from there. A metric spans runs, so such a series is ``scope: all`` with
``x: time`` (both the defaults there; anything else is refused), its x, ``crossing`` and
``horizon`` are Unix times and ``remaining`` and ``alert_within`` seconds (``horizon``: seconds
ahead of the newest sample). It takes the first signal of every run as its trigger: after each
batch of a run it took (at most once per second per series, a cheap check for new samples) and at
:meth:`TrendsConsumer.finish` it refits on the newest ``window`` samples. Its forecast therefore
moves while runs are routed, and stands still between runs.
Every point (an event with both readings) is stored in the trend store
(:mod:`beamlens.consumers.trend_store`, one SQLite file, by default
``<state.directory>/trends.sqlite``: the daemon validates params with its state directory as
context, :func:`~beamlens.consumers.trend_store.default_store`),
and after each new point the series is regressed with :class:`~beamlens.consumers.trend_model.TrendModel`
(the paper's SE kernel, MinMax-normalised y, optional log x, a window of the last ``window`` points,
hyper-parameters re-optimised every ``refit_every`` points and kept in a private buffer in between).

Two scopes: ``run`` — the series is this run's points (a cell's capacity check-ups in one run);
with ``prior: earlier_runs`` the earlier runs of the same series in the store (earlier cells) give a
population prior (:func:`~beamlens.consumers.trend_model.learn_prior`), learned on the daemon's pool
when the run starts, never from the run itself. ``all`` — the series spans runs (a detector's dark
level run after run, an electrode imaged once per cycle): every stored point of the key.

Published buffers, per series ``<name>``: ``<name>_x``, ``<name>_value`` (nav: the run's points),
``<name>_forecast`` (single ``(5, n_grid)``: x, mean, lower, upper = mean ∓ 2σ, threshold; value
units; drawn on the live page with the points),
``<name>_points`` (single ``(2, window)``: the x and value conditioned on, NaN-padded); for all
series together ``threshold``, ``prior_runs`` (earlier runs in the prior, 0: none), ``crossing``, ``crossing_pessimistic``, ``crossing_optimistic``
(single ``(n_series,)``, x units, ``inf`` when not within the horizon; the first two exported as
``beamlens_forecast_crossing{series=...}`` and ``beamlens_forecast_crossing_pessimistic{...}``),
``remaining`` (crossing minus the latest x) and ``alert_within`` (the series' ``alert_within``),
exported as ``beamlens_forecast_remaining`` / ``beamlens_forecast_alert_within`` for the shipped
``ForecastCrossesThreshold`` alert.
Not mergeable (refits depend on the order of points).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .base import Batch, Buffers, BufferSpec, Consumer, ConsumerParams, NotApplicable, SignalInfo
from .trend_model import EARLY_REFITS, Prior, TrendModel, learn_prior
from .trend_store import METRIC_PREFIX, TrendStore, check_series_key, default_store

N_GRID = 200
SAMPLE_EVERY_S = 30.0
"""Default ``sample_every_s`` of a metric series, s."""
METRIC_REFRESH_S = 1.0
"""A metric series looks for new samples in the store at most this often per consumer, s."""


class ForecastConfig(BaseModel):
    """How one series is forecast (shared by the trends and features consumers)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_]{1,40}$", description="label of the series (buffers, gauges)")
    threshold: float | None = Field(None, description="forecast the crossing of this value")
    direction: Literal["below", "above"] = "below"
    log_x: bool = False
    window: int = Field(50, ge=2, le=2000)
    refit_every: int = Field(5, ge=1)
    horizon: float | None = Field(None, description="forecast up to this x (default: the prior's extent, "
                                                    "else twice the window's span ahead)")
    alert_within: float | None = Field(None, gt=0, description="the ForecastCrossesThreshold alert fires when the "
                                                               "forecast crossing is this close ahead (x units)")


class SeriesConfig(ForecastConfig):
    """One trended series of event data keys (threshold after ``relative_to_first``)."""

    key: str = Field(description="value: 'primary/<data key>', or with reads: store another consumer's stored "
                                 "result ('features/mean_particle_area'); also the trend-store series key")
    reads: Literal["events", "store", "metric"] = Field(
        "events", description="events: the key is an event data key of the run; store: a series another consumer "
                              "writes to the trend store (the features consumer's 'features/<feature>'), x as it "
                              "stored it (the cycle); list trends after that consumer; metric: set by a "
                              "'metric/<name>{label=\"value\"}' key, samples of a daemon metric")
    x: str = Field("seq_num", description="'primary/<data key>', 'seq_num' or 'time' (Unix s); "
                                          "'<stream>/<data key>' of another stream (baseline/cycle): the run's first "
                                          "reading there, for all its points; reads: store: 'stored' (the default "
                                          "there) or '<stream>/<data key>' (scope run)")
    relative_to_first: bool = Field(False, description="divide each run's values by its first (capacity retention)")
    scope: Literal["run", "all"] = "run"
    prior: Literal["earlier_runs", "none"] = Field("earlier_runs", description="scope run: learn a prior from earlier runs")
    min_prior_runs: int = Field(3, ge=2, description="earlier runs needed for a prior")
    prior_floor: float | None = Field(None, description="prior fitted on earlier points not past this value; "
                                                        "default threshold -/+ 0.25 of the value range")
    sample_every_s: float | None = Field(None, ge=0.05, le=86400.0,
                                         description="metric series: the daemon samples the metric this often "
                                                     f"(default {SAMPLE_EVERY_S:g} s)")

    @model_validator(mode="after")
    def _keys(self) -> SeriesConfig:
        check_series_key(self.key)
        if self.key.startswith(METRIC_PREFIX) or self.reads == "metric":
            return self._metric()
        if self.sample_every_s is not None:
            raise ValueError("sample_every_s: only a metric series (key: metric/<name>) is sampled")
        head, _, tail = self.key.partition("/")
        if self.reads == "store":
            if not head or not tail:
                raise ValueError(f"key {self.key!r}: a stored series is '<consumer>/<result>' (features/mean_particle_area)")
            if self.x_stream is not None:
                if self.scope != "run":
                    raise ValueError(f"x {self.x!r}: a stored series with its x from another stream needs scope: run "
                                     "(other runs' stored points carry their writer's x)")
                return self
            if self.x not in ("seq_num", "stored"):
                raise ValueError("x: a series read from the trend store has the x its writer stored (x: stored) "
                                 "or one of another stream ('baseline/cycle')")
            self.x = "stored"
            return self
        if head != "primary" or not tail:
            # the daemon offers consumers the data keys of the primary stream only (daemon/signals.py)
            raise ValueError(f"key {self.key!r}: a value is an event data key of the primary stream "
                             "('primary/<data key>'), a consumer result through the trend store (reads: store) or "
                             "a daemon metric the daemon samples into the store ('metric/<metric name>'); "
                             "other streams (baseline/...) give x only (x: baseline/cycle)")
        xhead, _, xtail = self.x.partition("/")
        if self.x not in ("seq_num", "time") and (not xhead or not xtail):
            raise ValueError("x must be 'seq_num', 'time', 'primary/<data key>' or '<stream>/<data key>'")
        return self

    def _metric(self) -> SeriesConfig:
        """Checks and defaults of a metric series (see the module docstring)."""
        if not self.key.startswith(METRIC_PREFIX):
            raise ValueError(f"key {self.key!r}: reads: metric needs a key 'metric/<metric name>'")
        if self.reads == "store":
            raise ValueError(f"key {self.key!r}: a 'metric/' key is a daemon metric (reads: metric), not a stored "
                             "consumer result")
        self.reads = "metric"
        given = self.model_fields_set
        if "scope" in given and self.scope != "all":
            raise ValueError("scope: a metric series spans runs and daemon restarts (scope: all)")
        if "x" in given and self.x not in ("time", "stored"):
            raise ValueError(f"x {self.x!r}: a metric series' x is the sample's Unix time (x: time)")
        if self.relative_to_first:
            raise ValueError("relative_to_first: a metric series has no first point of a run to divide by")
        self.scope, self.x = "all", "time"
        if self.sample_every_s is None:
            self.sample_every_s = SAMPLE_EVERY_S
        return self

    @property
    def value_key(self) -> str | None:
        return self.key.split("/", 1)[1] if self.reads == "events" else None

    @property
    def x_key(self) -> str | None:
        return self.x.split("/", 1)[1] if self.x.startswith("primary/") else None

    @property
    def x_stream(self) -> str | None:
        """The stream of an x read from another stream than primary (``baseline``), else None."""
        head, _, tail = self.x.partition("/")
        return head if tail and head != "primary" else None


class TrendsParams(ConsumerParams):
    series: list[SeriesConfig] = Field(min_length=1, max_length=32)
    store: Path | Literal[False] | None = Field(
        None, description="trend-store file; default (null): <state.directory>/trends.sqlite when the daemon has a "
                          "state directory; false: no history across runs")

    @model_validator(mode="after")
    def _unique(self, info: ValidationInfo) -> TrendsParams:
        names = [s.name for s in self.series]
        if len(set(names)) != len(names):
            raise ValueError(f"series names must be unique (got {names})")
        unset = self.store is None
        self.store = default_store(self.store, info.context)
        stored = [s.name for s in self.series if s.reads in ("store", "metric")]
        if self.store is None and stored:
            raise ValueError(f"store: series {stored} read the trend store (reads: store, or a metric the daemon "
                             "samples into it), which defaults to <state.directory>/trends.sqlite; set "
                             "state.directory or store: <file>")
        if self.store is None and unset and info.context is not None:
            across = [s.name for s in self.series if s.scope == "all"]
            if across:
                raise ValueError(f"store: series {across} (scope all) span runs and need the trend store, which "
                                 "defaults to <state.directory>/trends.sqlite; set state.directory or store: <file>")
        return self


def forecast_specs(cfgs: Sequence[ForecastConfig]) -> list[BufferSpec]:
    """The buffers of forecasts of ``cfgs``: per series ``<name>_forecast`` (single ``(5, N_GRID)``:
    x, mean, lower, upper, threshold — the live page draws it with the points), ``<name>_points`` (single ``(2, window)``), private ``<name>_theta`` and
    ``<name>_since``; for all together ``threshold``, ``prior_runs``, ``crossing``,
    ``crossing_pessimistic``, ``crossing_optimistic``, ``remaining``, ``alert_within``
    (single ``(n,)``, gauges labelled by series name where bound to a metric)."""
    specs = []
    for s in cfgs:
        specs += [BufferSpec(f"{s.name}_forecast", "single", extra_shape=(5, N_GRID), merge=None,
                             description=f"{s.name} forecast: x, mean, lower, upper (mean -/+ 2 sigma), threshold"),
                  BufferSpec(f"{s.name}_points", "single", extra_shape=(2, s.window), merge=None,
                             description=f"{s.name} points the forecast is conditioned on: x, value"),
                  BufferSpec(f"{s.name}_theta", "single", extra_shape=(16,), private=True, merge=None,
                             description="log hyper-parameters of the last refit"),
                  BufferSpec(f"{s.name}_since", "single", extra_shape=(1,), private=True, merge=None,
                             description="points since the last refit")]
    n, names = len(cfgs), tuple(s.name for s in cfgs)
    specs += [BufferSpec("threshold", "single", extra_shape=(n,), merge=None, description="threshold of each series"),
              BufferSpec("prior_runs", "single", extra_shape=(n,), merge=None,
                         description="earlier runs the forecast's prior was learned from (0: none)"),
              BufferSpec("crossing", "single", extra_shape=(n,), merge=None, metric="forecast_crossing", labels=names,
                         description="forecast x where the mean reaches the threshold (inf: not within the horizon)"),
              BufferSpec("crossing_pessimistic", "single", extra_shape=(n,), merge=None,
                         metric="forecast_crossing_pessimistic", labels=names,
                         description="forecast x where the pessimistic 2-sigma bound reaches the threshold"),
              BufferSpec("crossing_optimistic", "single", extra_shape=(n,), merge=None,
                         description="forecast x where the optimistic 2-sigma bound reaches the threshold"),
              BufferSpec("remaining", "single", extra_shape=(n,), merge=None, metric="forecast_remaining",
                         labels=names, description="crossing minus the latest x (x units)"),
              BufferSpec("alert_within", "single", extra_shape=(n,), merge=None, metric="forecast_alert_within",
                         labels=names, description="alert when the crossing is this close ahead (x units)")]
    return specs


def count_points(buffers: Buffers, cfg: ForecastConfig, n: int) -> None:
    """Count ``n`` new points of ``cfg`` towards its next refit."""
    since = buffers[f"{cfg.name}_since"]
    since[0] = np.nan_to_num(since[0]) + n


def update_forecast(buffers: Buffers, cfgs: Sequence[ForecastConfig], s: ForecastConfig, x: np.ndarray,
                    y: np.ndarray, prior: Prior | None = None, horizon: float | None = None) -> None:
    """Fit ``(x, y)`` (float ``(n,)``, x increasing) of series ``s`` and write its forecast buffers
    (:func:`forecast_specs`): hyper-parameters re-optimised once ``refit_every`` points were
    counted since the last refit (:func:`count_points`), at every point of a short series
    (fewer than ``EARLY_REFITS * refit_every`` points) or when none are saved, else the saved ones
    (``<name>_theta``); with a prior, its fixed hyper-parameters. Fewer than 2 points: only the
    threshold is written. ``horizon`` (x units) overrides the series' ``horizon``."""
    b, i = buffers, [t.name for t in cfgs].index(s.name)
    b.threshold[i] = np.nan if s.threshold is None else s.threshold
    b.alert_within[i] = np.nan if s.alert_within is None else s.alert_within
    if len(x) < 2:
        return
    model = TrendModel(log_x=s.log_x, window=s.window, refit_every=s.refit_every, prior=prior)
    theta = b[f"{s.name}_theta"]
    n_theta = len(model.kernel.theta)
    since = b[f"{s.name}_since"]
    optimise = prior is None and (np.isnan(theta[0]) or since[0] >= s.refit_every
                                  or len(x) < EARLY_REFITS * s.refit_every)
    if prior is None and not optimise:
        model.kernel = model.kernel.clone_with_theta(theta[:n_theta])
    model.set_data(x, y, optimise=optimise)
    if optimise:
        theta[:] = np.nan
        theta[:n_theta] = model.kernel_.theta
        since[0] = 0
    horizon = horizon if horizon is not None else s.horizon if s.horizon is not None else model.horizon()
    f = model.forecast(np.linspace(float(model.x[0]), max(horizon, float(model.x[-1])), N_GRID))
    b[f"{s.name}_forecast"][...] = np.stack([f.x, f.mean, f.lower, f.upper, np.full(N_GRID, b.threshold[i])])
    pts = b[f"{s.name}_points"]
    pts[...] = np.nan
    pts[0, :len(model.x)], pts[1, :len(model.y)] = model.x, model.y
    if s.threshold is not None:
        c = model.crossing(s.threshold, s.direction, horizon=horizon)
        b.crossing[i], b.crossing_pessimistic[i], b.crossing_optimistic[i] = c.mean, c.pessimistic, c.optimistic
        b.remaining[i] = c.mean - float(x[-1])
    b.prior_runs[i] = 0 if prior is None else prior.n_series  # last: readers wait on it


class TrendsConsumer(Consumer):
    """See the module docstring."""

    name = "trends"
    Params = TrendsParams
    params: TrendsParams
    mergeable = False
    streams = ("*",)  # x of a series may be a data key of any named stream (baseline/cycle)
    refresh_s = METRIC_REFRESH_S

    def __init__(self, params, run):
        super().__init__(params, run)
        self.taken: set[str] = set()
        self.priors: dict[str, Prior | None] = {}
        self._store: TrendStore | None = None
        self.metric_series = [s for s in params.series if s.reads == "metric"]
        self.trigger: str | None = None
        """The signal taken only as the trigger of the metric series (the run's first offered)."""
        self._metric_checked: dict[str, float] = {}  # series name -> monotonic time of the last check

    @property
    def store(self) -> TrendStore | None:
        if self._store is None and self.params.store is not None:
            self._store = TrendStore(self.params.store)
        return self._store

    def signal(self, info: SignalInfo) -> list[BufferSpec]:
        try:
            self._applicable(info)
        except NotApplicable:
            if not self.metric_series or self.taken:
                raise
            self.trigger = info.name  # any first signal: metric series refresh on the run's batches
        first = not self.taken
        self.taken.add(info.name)
        if not first:
            return []
        specs = []
        for s in self.params.series:
            if s.reads == "metric":  # no points of the run: samples come from the store
                specs.append(BufferSpec(f"{s.name}_seen", "single", extra_shape=(1,), private=True, merge=None,
                                        description="newest trend-store row id of the samples read"))
                continue
            specs += [BufferSpec(f"{s.name}_x", "nav", description=f"x ({s.x}) of {s.key}"),
                      BufferSpec(f"{s.name}_value", "nav", description=s.key),
                      BufferSpec(f"{s.name}_stored", "nav", private=True, description="1 once in the trend store")]
            if s.x_stream:
                specs.append(BufferSpec(f"{s.name}_run_x", "single", extra_shape=(1,), private=True, merge=None,
                                        description=f"the run's x: first reading of {s.x}"))
            if s.scope == "run" and s.prior == "earlier_runs" and self.store is not None:
                self.priors[s.name] = None
                self.run.submit(self._learn_prior, s, then=lambda prior, s=s: self._install_prior(s, prior))
        specs += forecast_specs(self.params.series)
        return specs

    def _applicable(self, info: SignalInfo) -> None:
        """Raise :class:`NotApplicable` unless ``info`` is a value, x or trigger of a declared series."""
        stored = any(s.reads == "store" for s in self.params.series)
        if info.kind == "frame" and stored:
            pass  # the trigger of stored series: the frames their writer (features) analyses
        elif info.kind == "event" and info.stream != "primary":
            if info.name not in {s.x for s in self.params.series if s.x_stream} or info.sig_shape != ():
                raise NotApplicable(f"{info.name!r} is not the x of a declared series")
        elif info.kind != "event" or info.sig_shape != ():
            raise NotApplicable(f"{info.kind} signal {info.name!r} is not a scalar event reading")
        else:
            wanted = {s.value_key for s in self.params.series} | {s.x_key for s in self.params.series if s.x_key}
            if info.name not in wanted - {None}:
                raise NotApplicable(f"{info.name!r} is not a value or x of a declared series")

    # -- priors (on the daemon's pool) ---------------------------------------------------------
    def _learn_prior(self, s: SeriesConfig) -> Prior | None:
        runs = self.store.runs(s.key, exclude_run=self.run.uid)
        series = [(r.x, self._relative(s, r.value)) for r in runs if len(r.x) >= 2]
        if len(series) < s.min_prior_runs:
            return None
        floor = s.prior_floor
        if floor is None and s.threshold is not None:
            ally = np.concatenate([y for _, y in series])
            span = float(np.nanmax(ally) - np.nanmin(ally))
            floor = s.threshold - 0.25 * span if s.direction == "below" else s.threshold + 0.25 * span
        try:
            return learn_prior(series, log_x=s.log_x, floor=floor, direction=s.direction)
        except ValueError as exc:
            self.log.warning("series %s: no prior from %d earlier runs (%s)", s.name, len(series), exc)
            return None

    def _install_prior(self, s: SeriesConfig, prior: Prior | None) -> None:
        self.priors[s.name] = prior
        if prior is not None:
            self.log.info("series %s: prior from %d earlier runs", s.name, prior.n_series)
            if f"{s.name}_x" in self.buffers:  # not yet allocated when the job ran inline in signal()
                self._update(s)

    @staticmethod
    def _relative(s: SeriesConfig, y: np.ndarray) -> np.ndarray:
        if not s.relative_to_first or not len(y) or not y[0]:
            return y
        return y / y[0]

    # -- points --------------------------------------------------------------------------------
    def process(self, batch: Batch, staged: object = None) -> bool:
        changed = self._read_metrics() if self.metric_series else False
        if batch.signal.name == self.trigger:
            return changed
        if batch.signal.kind == "frame":
            return self._read_stored() or changed
        if batch.signal.stream != "primary":
            return self._run_x(batch) or changed
        b = self.buffers
        pos = batch.nav_index
        values = batch.data.astype(np.float64)
        touched = []
        for s in self.params.series:
            if s.reads != "events":
                continue
            if batch.signal.name == s.value_key:
                b[f"{s.name}_value"][pos] = values
            if batch.signal.name == s.x_key:
                b[f"{s.name}_x"][pos] = values
            if s.x in ("seq_num", "time") and batch.signal.name == s.value_key:
                b[f"{s.name}_x"][pos] = batch.seq_num if s.x == "seq_num" else batch.time
            if s.x_stream and batch.signal.name == s.value_key:
                b[f"{s.name}_x"][pos] = b[f"{s.name}_run_x"][0]  # NaN until the stream's reading arrives
            if self._store_new(s, pos):
                touched.append(s)
        for s in touched:
            self._update(s)
        return bool(touched) or changed

    def _store_new(self, s: SeriesConfig, pos: np.ndarray) -> bool:
        """Store the points of ``s`` at nav ``pos`` that have both readings now and were not
        stored yet; count them towards the next refit. Returns whether there were any."""
        b = self.buffers
        new = pos[np.isfinite(b[f"{s.name}_x"][pos]) & np.isfinite(b[f"{s.name}_value"][pos])
                  & np.isnan(b[f"{s.name}_stored"][pos])]
        if not len(new):
            return False
        if self.store is not None:
            self.store.add(s.key, self.run.uid, new + 1, b[f"{s.name}_x"][new], b[f"{s.name}_value"][new])
        b[f"{s.name}_stored"][new] = 1.0
        count_points(b, s, len(new))
        return True

    def _run_x(self, batch: Batch) -> bool:
        """A reading of another stream (``nav_index``: the event's index in that stream): the
        first finite one becomes the run's x of the series that read it, given to the points
        already there. Returns whether a series gained points."""
        b, touched = self.buffers, []
        order = np.argsort(batch.seq_num, kind="stable")
        values = batch.data.astype(np.float64)[order]
        finite = values[np.isfinite(values)]
        for s in self.params.series:
            if s.x != batch.signal.name or not len(finite) or np.isfinite(b[f"{s.name}_run_x"][0]):
                continue
            b[f"{s.name}_run_x"][0] = finite[0]
            touched.append(s)
            if s.reads == "store":
                continue
            pos = np.flatnonzero(np.isfinite(b[f"{s.name}_value"]))
            b[f"{s.name}_x"][pos] = finite[0]
            self._store_new(s, pos)
        changed = any(s.reads == "store" for s in touched) and self._read_stored()
        for s in touched:
            if s.reads != "store":
                self._update(s)
        return bool(changed or any(s.reads != "store" for s in touched))

    def _read_stored(self) -> bool:
        """Copy this run's new points of the stored series (``reads: store``) from the trend store
        into their nav buffers (at seq - 1, as the writer numbered them) and refit those that
        changed. Returns whether any did."""
        b, touched = self.buffers, []
        for s in self.params.series:
            if s.reads != "store":
                continue
            seq, x, y = self.store.points(s.key, self.run.uid)
            if s.x_stream:
                run_x = b[f"{s.name}_run_x"][0]
                if not np.isfinite(run_x):
                    continue  # until the stream's reading arrives (then _run_x reads them)
                x = np.full(len(seq), run_x)
            pos = seq - 1
            keep = (pos >= 0) & (pos < len(b[f"{s.name}_x"]))
            pos, x, y = pos[keep], x[keep], y[keep]
            new = np.isnan(b[f"{s.name}_stored"][pos])
            if new.any():
                b[f"{s.name}_x"][pos[new]], b[f"{s.name}_value"][pos[new]] = x[new], y[new]
                b[f"{s.name}_stored"][pos[new]] = 1.0
                count_points(b, s, int(new.sum()))
                touched.append(s)
        for s in touched:
            self._update(s)
        return bool(touched)

    def _read_metrics(self, force: bool = False) -> bool:
        """Refit the metric series with new samples in the trend store (each looked at most once
        per ``refresh_s``, :data:`METRIC_REFRESH_S`, unless ``force``). Returns whether any had new
        samples."""
        now, touched = time.monotonic(), []
        for s in self.metric_series:
            if not force and now - self._metric_checked.get(s.name, -math.inf) < self.refresh_s:
                continue
            self._metric_checked[s.name] = now
            seen = self.buffers[f"{s.name}_seen"]  # a buffer: checkpointed with the run
            last, n = self.store.new_points(s.key, 0 if np.isnan(seen[0]) else int(seen[0]))
            if n:
                seen[0] = last
                count_points(self.buffers, s, n)
                touched.append(s)
        for s in touched:
            self._update(s)
        return bool(touched)

    def finish(self) -> None:
        if any(s.reads == "store" for s in self.params.series) and self.buffers:
            self._read_stored()  # points the writer stored after the last frame reached us
        if self.metric_series and self.buffers:
            self._read_metrics(force=True)

    def _points(self, s: SeriesConfig) -> tuple[np.ndarray, np.ndarray]:
        b = self.buffers
        if s.scope == "all" and self.store is not None:
            # a metric: only the newest window of samples (row ids grow with the sample time)
            runs = self.store.runs(s.key, limit=s.window) if s.reads == "metric" else self.store.runs(s.key)
            if s.reads == "metric" and not runs:
                return np.empty(0), np.empty(0)
            if runs:
                x = np.concatenate([r.x for r in runs])
                y = np.concatenate([r.value for r in runs])
                o = np.argsort(x, kind="stable")
                return x[o], y[o]
        ok = np.isfinite(b[f"{s.name}_x"]) & np.isfinite(b[f"{s.name}_value"])
        idx = np.nonzero(ok)[0]  # nav order = arrival order of this run's points
        x, y = b[f"{s.name}_x"][idx], self._relative(s, b[f"{s.name}_value"][idx])
        o = np.argsort(x, kind="stable")
        return x[o], y[o]

    def _update(self, s: SeriesConfig) -> None:
        """Fit the series' points and write its forecast buffers (daemon thread)."""
        x, y = self._points(s)
        ahead = s.horizon + float(x[-1]) if s.reads == "metric" and s.horizon is not None and len(x) else None
        update_forecast(self.buffers, self.params.series, s, x, y, self.priors.get(s.name), horizon=ahead)

    def stop(self, doc) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


__all__ = ["SeriesConfig", "TrendsConsumer", "TrendsParams"]
