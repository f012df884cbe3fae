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


def defects_movie_daemon(make_daemon, n_frames: int, seed: int = 5, outputs: str = ""):
    """A daemon running ``defects`` on a simulated microscope movie of ``n_frames`` (array-1.0 over
    ZeroMQ), returned once every frame is processed, with the movie's ground truth; ``outputs``:
    YAML appended to the configuration (an ``outputs:`` section)."""
    from beamlens.daemon.sim.microscope import SimulatedMicroscope
    from helpers import wait_for

    with SimulatedMicroscope(n_frames=n_frames, rate_hz=None, seed=seed) as scope:
        daemon = make_daemon(daemon_yaml(
            [frame_source_yaml("stem", "array-1.0", scope.address)],
            consumers="  - {name: defects, class: defects, params: {fit_after: 8}}\n",
            # the simulator renders each frame as it sends it: on a loaded machine beside the network
            # a frame can take longer than the 0.25 s default, which would close the series early
            router="{series_quiet_s: 5.0}") + outputs)
        scope.start()
        scope.join(60)
        wait_for(lambda: counter(daemon, "beamlens_frames_processed_total", source="stem") == n_frames, timeout=120)
        # frames are counted when handed over; the consumer's stage may still be running on the pool
        wait_for(lambda: frames_analysed(daemon) == n_frames, timeout=20)
        return daemon, list(scope.truth)


def frames_analysed(daemon) -> int:
    """Frames of the newest run with a defect count in the ``defects`` consumer's ``total`` map."""
    runs = daemon.store.summaries()
    if not runs:
        return 0
    try:
        return int(np.isfinite(daemon.store.snapshot(runs[0]["uid"], "defects", "total").data).sum())
    except KeyError:
        return 0


class GatedMovie:
    """A simulated microscope movie (array-1.0 over a real ZeroMQ PUSH socket on 127.0.0.1) sent
    frame by frame when the test says so, each send waiting until the daemon has processed the
    frame: a movie that streams exactly as slowly as a test needs, without sleeping.

    ``announce``: put ``number_frames_expected`` in the headers (the run then closes at the last
    frame); without it the series is end-less and closes after ``router.series_quiet_s``.
    """

    def __init__(self, n_frames: int, seed: int = 5, announce: bool = True):
        from beamlens.daemon.sim.microscope import SimulatedMicroscope

        self.scope = SimulatedMicroscope(n_frames=n_frames, rate_hz=None, seed=seed)
        self.address = self.scope.address
        self.announce = announce
        self.frames = [image for image, _ in self.scope.movie.frames(n_frames)]
        self.sent = 0

    def send(self, daemon: Daemon, n: int, source: str = "stem", timeout: float = 60.0) -> None:
        """Send the next ``n`` frames, one at a time, each once the previous one is processed."""
        import json

        from beamlens.daemon.sim.microscope import array10_header
        from helpers import wait_for

        for _ in range(n):
            index, image = self.sent, self.frames[self.sent]
            if self.announce:
                self.scope.send_frame(index, image)
            else:
                header = array10_header(image, index, source="beamlens-sim-stem", series_id=self.scope.series_id,
                                        frame_time_s=self.scope.frame_time_s)
                self.scope.socket.send_multipart([json.dumps(header).encode(), np.ascontiguousarray(image, dtype="<u2")])
            self.sent += 1
            wait_for(lambda: counter(daemon, "beamlens_frames_processed_total", source=source) >= self.sent,
                     timeout=timeout)

    def close(self) -> None:
        self.scope.close()

    def __enter__(self) -> GatedMovie:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
