"""Consumers that misbehave on purpose, for fault-injection tests (importable as
``fault_consumers:Flaky`` from a test config: the tests folder is on sys.path). Written against the
consumer contract (:mod:`beamlens.consumers.base`): each takes the run's first signal it is
offered and declares its state as buffers."""
from __future__ import annotations

import threading
import time

import numpy as np
from pydantic import Field

from beamlens.consumers.base import Batch, BufferSpec, Consumer, ConsumerParams, NotApplicable, SignalInfo


class FirstSignal(Consumer):
    """Takes the first signal offered (any kind), refuses the rest."""

    def signal(self, info: SignalInfo) -> list[BufferSpec]:
        if getattr(self, "key", None) is not None:
            raise NotApplicable(f"already taking {self.key!r}")
        self.key = info.name
        return self.buffer_specs(info)

    def buffer_specs(self, info: SignalInfo) -> list[BufferSpec]:
        return []


class FlakyParams(ConsumerParams):
    every: int = Field(10, ge=1)


class Flaky(FirstSignal):
    """Raises on every ``every``-th batch; otherwise marks the points it saw."""

    name = "flaky"
    Params = FlakyParams
    params: FlakyParams

    def buffer_specs(self, info):
        return [BufferSpec("seen", "nav"), BufferSpec("batches", "single", (1,), dtype="int64", private=True)]

    def process(self, batch, staged=None):
        b = self.buffers
        b.batches[0] += 1
        if b.batches[0] % self.params.every == 0:
            raise RuntimeError(f"deliberate failure on batch {b.batches[0]}")
        b.seen[batch.nav_index] = 1.0


class SleepyParams(ConsumerParams):
    seconds_per_page: float = 0.02


class Sleepy(FirstSignal):
    """Sleeps on every batch: a consumer far slower than the data."""

    name = "sleepy"
    Params = SleepyParams
    params: SleepyParams

    spans: list[tuple[float, float]] = []
    """(monotonic start, end) of every sleep, for tests that reason about when the router hung."""

    def process(self, batch, staged=None):
        t0 = time.monotonic()
        time.sleep(self.params.seconds_per_page)
        Sleepy.spans.append((t0, time.monotonic()))


class Counting(FirstSignal):
    """A running sum per point and a count of the points seen, both buffers (checkpoint/resume tests)."""

    name = "counting"

    def buffer_specs(self, info):
        return [BufferSpec("total", "nav"), BufferSpec("events", "single", (1,), dtype="int64", private=True, merge="sum")]

    def process(self, batch: Batch, staged=None):
        x = np.asarray(batch.data, dtype=np.float64).reshape(len(batch), -1)
        self.buffers.total[batch.nav_index] = x.sum(axis=1)
        self.buffers.events[0] += len(batch)


class SlowFinishParams(ConsumerParams):
    fit_s: float = Field(2.0, ge=0)
    """How long the final fit runs on the daemon's pool, s."""
    data_key: str | None = None
    """Only this signal (default: the first offered)."""


class SlowFinish(FirstSignal):
    """A consumer whose final fit (submitted in ``finish``) runs far longer than the router's
    stall timeout: ``total`` per point as it goes, ``fitted`` (the sum of all totals) only when the
    final fit is installed. ``release`` ends every running fit at once (test teardown)."""

    name = "slow_finish"
    Params = SlowFinishParams
    params: SlowFinishParams
    release = threading.Event()
    fits_started: list[float] = []

    def signal(self, info):
        if self.params.data_key not in (None, info.name):
            raise NotApplicable(f"not {self.params.data_key!r}")
        return super().signal(info)

    def buffer_specs(self, info):
        return [BufferSpec("total", "nav"), BufferSpec("fitted", "single", (1,))]

    def process(self, batch: Batch, staged=None):
        self.buffers.total[batch.nav_index] = np.asarray(batch.data, dtype=np.float64).reshape(len(batch), -1).sum(axis=1)

    def finish(self):
        if "total" in self.buffers:
            self.run.submit(self._fit, self.buffers.total.copy(), then=self._install)

    def _fit(self, total: np.ndarray) -> float:
        SlowFinish.fits_started.append(time.monotonic())
        SlowFinish.release.wait(self.params.fit_s)
        return float(np.nansum(total))

    def _install(self, value: float) -> None:
        self.buffers.fitted[0] = value


class StagedSum(FirstSignal):
    """A consumer with a per-batch stage on the pool (frame sums, as an inference would be): the
    stage computes each point's sum off the router thread, ``process`` writes it. For no-lost-point
    tests on open-ended series whose buffers grow while stages are in flight."""

    name = "staged_sum"
    has_stage = True

    def buffer_specs(self, info):
        return [BufferSpec("total", "nav"), BufferSpec("points", "single", (1,), dtype="int64", merge="sum")]

    def stage(self, batch: Batch) -> np.ndarray:
        return np.asarray(batch.data, dtype=np.float64).reshape(len(batch), -1).sum(axis=1)

    def process(self, batch: Batch, staged=None):
        self.buffers.total[batch.nav_index] = staged
        self.buffers.points[0] += len(batch)


class OrderedStageParams(ConsumerParams):
    fail_every: int = Field(0, ge=0)
    """Raise in the stage of every ``fail_every``-th batch (0: never)."""


class OrderedStage(FirstSignal):
    """A stage whose batches finish out of order (later ones sleep less); ``process`` records the
    order it is called in (``order``, per run uid), which must be batch order."""

    name = "ordered_stage"
    Params = OrderedStageParams
    params: OrderedStageParams
    has_stage = True
    order: dict[str, list[int]] = {}

    def buffer_specs(self, info):
        return [BufferSpec("seen", "nav")]

    def stage(self, batch: Batch) -> int:
        first = int(batch.seq_num[0])
        if self.params.fail_every and first % self.params.fail_every == 0:
            raise RuntimeError(f"deliberate stage failure at seq_num {first}")
        time.sleep(0.002 * (5 - first % 5))
        return first

    def process(self, batch: Batch, staged=None):
        assert staged == int(batch.seq_num[0])
        OrderedStage.order.setdefault(self.run.uid, []).extend(batch.seq_num.tolist())
        self.buffers.seen[batch.nav_index] = 1.0


class GreedyParams(ConsumerParams):
    mib: float = Field(4096, gt=0)


class Greedy(FirstSignal):
    """Declares one ``single`` buffer of ``mib`` MiB (memory-budget tests)."""

    name = "greedy"
    Params = GreedyParams
    params: GreedyParams

    def buffer_specs(self, info):
        return [BufferSpec("hoard", "single", (int(self.params.mib * 2**20 / 8),))]
