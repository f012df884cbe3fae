"""Helpers for frame-path tests: daemon configs with frame sources, counters, test-only consumers."""
from __future__ import annotations

import time

import numpy as np

from beamlens.consumers.base import Batch, BufferSpec, Consumer, ConsumerParams, NotApplicable, SignalInfo
from beamlens.daemon.app import Daemon


def frame_source_yaml(name: str, fmt: str, address: str, **extra: object) -> str:
    opts = "".join(f", {k}: {v}" for k, v in extra.items())
    return f"    - {{name: {name}, format: {fmt}, address: '{address}'{opts}}}\n"


def daemon_yaml(sources: list[str], consumers: str = "  - {name: fs, class: frame_stats}\n",
                bluesky: str | None = None, router: str = "") -> str:
    text = "sources:\n"
    if bluesky:
        text += f"  bluesky:\n    - {{name: test, address: '{bluesky}'}}\n"
    text += "  frames:\n" + "".join(sources) + "consumers:\n" + consumers
    if router:
        text += f"router: {router}\n"
    return text


def counter(daemon: Daemon, metric: str, **labels: str) -> float:
    """Current value of a labelled counter of the daemon's registry (0 if never incremented)."""
    value = daemon.metrics.registry.get_sample_value(metric, labels)
    return 0.0 if value is None else value


class SlowParams(ConsumerParams):
    seconds_per_frame: float = 0.01


class SlowFrameConsumer(Consumer):
    """Sleeps ``seconds_per_frame`` per frame and marks which frames (positions) it saw."""

    name = "slow"
    Params = SlowParams
    params: SlowParams

    def signal(self, info: SignalInfo) -> list[BufferSpec]:
        if info.kind != "frame" or "seen" in self.buffers:
            raise NotApplicable("takes the first frame series only")
        return [BufferSpec("seen", "nav", description="1 where a frame was analysed")]

    def process(self, batch: Batch, staged: object = None) -> None:
        time.sleep(self.params.seconds_per_frame * len(batch))
        self.buffers.seen[batch.nav_index] = 1.0


class FailingFrameConsumer(Consumer):
    """Takes frame series and raises on every frame batch (isolation tests)."""

    name = "failing"

    def signal(self, info: SignalInfo) -> list[BufferSpec]:
        if info.kind != "frame":
            raise NotApplicable("frames only")
        return []

    def process(self, batch: Batch, staged: object = None) -> None:
        raise RuntimeError("deliberate failure")


def defects_movie_daemon(make_daemon, n_frames: int, seed: int = 5):
    """A daemon running ``defects`` on a simulated microscope movie of ``n_frames`` (array-1.0 over
    ZeroMQ), returned once every frame is processed, with the movie's ground truth."""
    from beamlens.daemon.sim.microscope import SimulatedMicroscope
    from helpers import wait_for

    with SimulatedMicroscope(n_frames=n_frames, rate_hz=None, seed=seed) as scope:
        daemon = make_daemon(daemon_yaml(
            [frame_source_yaml("stem", "array-1.0", scope.address)],
            consumers="  - {name: defects, class: defects, params: {fit_after: 8, background: false}}\n"))
        scope.start()
        scope.join(60)
        wait_for(lambda: counter(daemon, "beamlens_frames_processed_total", source="stem") == n_frames, timeout=120)
        return daemon, list(scope.truth)
