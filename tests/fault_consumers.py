"""Consumers that misbehave on purpose, for fault-injection tests (importable as
``fault_consumers:Flaky`` from a test config: the tests folder is on sys.path)."""
from __future__ import annotations

import time

import numpy as np
from pydantic import Field

from beamlens.consumers.base import BufferSpec, Consumer, ConsumerParams


class FlakyParams(ConsumerParams):
    every: int = Field(10, ge=1)


class Flaky(Consumer):
    """Raises on every ``every``-th EventPage; otherwise counts the points it saw."""

    name = "flaky"
    Params = FlakyParams
    params: FlakyParams

    def start(self, doc):
        self.pages = 0

    def result_buffers(self):
        return [BufferSpec("seen", "nav")]

    def event_page(self, doc, positions):
        self.pages += 1
        if self.pages % self.params.every == 0:
            raise RuntimeError(f"deliberate failure on page {self.pages}")
        self.results.seen[positions[positions >= 0]] = 1.0


class SleepyParams(ConsumerParams):
    seconds_per_page: float = 0.02


class Sleepy(Consumer):
    """Sleeps on every EventPage: a consumer far slower than the data."""

    name = "sleepy"
    Params = SleepyParams
    params: SleepyParams

    spans: list[tuple[float, float]] = []
    """(monotonic start, end) of every sleep, for tests that reason about when the router hung."""

    def event_page(self, doc, positions):
        t0 = time.monotonic()
        time.sleep(self.params.seconds_per_page)
        Sleepy.spans.append((t0, time.monotonic()))


class Counting(Consumer):
    """Keeps a running sum per point in plain attributes (checkpoint/resume tests)."""

    name = "counting"

    def start(self, doc):
        self.events = 0

    def result_buffers(self):
        return [BufferSpec("total", "nav")]

    def event_page(self, doc, positions):
        key = next(iter(doc["data"]))
        x = np.asarray(doc["data"][key], dtype=float).reshape(len(positions), -1)
        self.results.total[positions] = x.sum(axis=1)
        self.events += len(positions)
