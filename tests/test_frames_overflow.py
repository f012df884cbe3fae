"""Overload: policy block loses nothing (the sender waits); policy latest analyses the newest frames
and counts every frame it skipped, so processed + skipped = sent."""
from __future__ import annotations

import threading
import time

import numpy as np

from beamlens.daemon.sim.detectors import DetectorEmulator, synthetic_frames

from frame_helpers import counter, daemon_yaml, frame_source_yaml
from helpers import wait_for

SLOW = "  - {{name: slow, class: 'frame_helpers:SlowFrameConsumer', params: {{seconds_per_frame: {s}}}}}\n"


def test_block_loses_nothing_under_overload(make_daemon):
    n = 60
    with DetectorEmulator("dectris-v2", sndhwm=2) as emu:
        daemon = make_daemon(daemon_yaml(
            [frame_source_yaml("det", "dectris-v2", emu.address, overflow="block", queue_size=2, receive_hwm=2, max_batch=4)],
            SLOW.format(s=0.005)))
        t0 = time.perf_counter()
        sender = threading.Thread(target=emu.send_series, args=(synthetic_frames(n, (64, 64)),), kwargs={"n_frames": n})
        sender.start()
        wait_for(lambda: counter(daemon, "beamlens_frames_processed_total", source="det") == n, timeout=60)
        sender.join(10)
        sending = time.perf_counter() - t0
    assert sending >= n * 0.005 * 0.8  # the sender was held back by the consumer, not let run ahead
    for reason in ("overflow", "gap", "stale_series", "run_closed"):
        assert counter(daemon, "beamlens_frames_dropped_total", source="det", reason=reason) == 0
    assert counter(daemon, "beamlens_frames_received_total", source="det") == n
    run = daemon.store.summaries()[0]
    wait_for(lambda: daemon.store.summaries()[0]["status"] == "success")
    seen = daemon.store.snapshot(run["uid"], "slow", "seen").data
    np.testing.assert_array_equal(seen, np.ones(n))


def test_latest_counts_exactly_what_it_skipped(make_daemon):
    n = 100
    with DetectorEmulator("dectris-v2") as emu:
        daemon = make_daemon(daemon_yaml(
            [frame_source_yaml("det", "dectris-v2", emu.address, overflow="latest", queue_size=4)],
            SLOW.format(s=0.02)))
        emu.send_series(synthetic_frames(n, (64, 64)), n_frames=n)
        wait_for(lambda: daemon.store.summaries() and daemon.store.summaries()[0]["status"] == "success", timeout=60)
    processed = counter(daemon, "beamlens_frames_processed_total", source="det")
    skipped = counter(daemon, "beamlens_frames_dropped_total", source="det", reason="overflow")
    assert counter(daemon, "beamlens_frames_received_total", source="det") == n
    assert processed + skipped == n
    assert 0 < processed < n and skipped > 0
    assert counter(daemon, "beamlens_frames_dropped_total", source="det", reason="gap") == 0
    run = daemon.store.summaries()[0]
    assert run["frames_done"] == processed
    seen = daemon.store.snapshot(run["uid"], "slow", "seen").data
    assert np.nansum(seen) == processed
    assert seen[-1] == 1  # the newest frame is always analysed
