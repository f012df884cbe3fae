"""Frame sources in the daemon: config (formats, socket type, bind/connect, loopback), PUB/SUB with the
daemon bound, and isolation: a failing frame consumer is counted and quarantined, the others go on."""
from __future__ import annotations

import numpy as np
import pytest

from beamlens.daemon.config import ConfigError, load_config
from beamlens.daemon.sim.detectors import DetectorEmulator, synthetic_frames

from frame_helpers import counter, daemon_yaml, frame_source_yaml
from helpers import wait_for


def test_config_defaults_and_errors_name_the_yaml_path():
    config = load_config(text="sources: {frames: [{name: eiger, format: dectris-v1}]}", environ={})
    (src,) = config.sources.frames
    assert (src.address, src.socket, src.mode, src.overflow) == ("tcp://127.0.0.1:9999", "pull", "connect", "block")
    with pytest.raises(ConfigError) as err:
        load_config(text="""
sources:
  frames:
    - {name: a, format: dectris-v2, mode: bind, address: 'tcp://0.0.0.0:31001'}
    - {name: b, format: hdf5-files}
    - {name: c, format: array-1.0, topic: x}
""", environ={})
    paths = [p for p, _ in err.value.errors]
    assert paths[0].startswith("sources.frames[0]") and "exposes the daemon" in err.value.errors[0][1]
    assert paths[1] == "sources.frames[1]"
    assert paths[2].startswith("sources.frames[2]") and "topic" in err.value.errors[2][1]


def test_pub_sub_with_the_daemon_bound(make_daemon):
    daemon = make_daemon(daemon_yaml([frame_source_yaml("cam", "array-1.0", "tcp://127.0.0.1:0", socket="sub",
                                                        mode="bind")]))
    address = daemon.frame_sources[0].address
    with DetectorEmulator("array-1.0", address, socket_type="pub", bind=False) as emu:
        probe = np.zeros((4, 4), dtype=np.uint16)
        # PUB drops everything before the subscription has propagated (slow joiner): probe first
        wait_for(lambda: emu.send_series([probe]) and counter(daemon, "beamlens_frames_received_total", source="cam") > 0)
        frames = list(synthetic_frames(8, (32, 32)))
        emu.send_series(frames, source="cam1")
        wait_for(lambda: any(r["frames_done"] == 8 for r in daemon.store.summaries()))
    run = next(r for r in daemon.store.summaries() if r["frames_done"] == 8)
    assert run["uid"].startswith("cam-cam1-")
    np.testing.assert_array_equal(daemon.store.snapshot(run["uid"], "fs", "max").data, [f.max() for f in frames])


def test_failing_frame_consumer_is_quarantined_and_the_others_go_on(make_daemon):
    consumers = "  - {name: fs, class: frame_stats}\n  - {name: bad, class: 'frame_helpers:FailingFrameConsumer'}\n"
    with DetectorEmulator("dectris-v1") as emu:
        daemon = make_daemon(daemon_yaml([frame_source_yaml("det", "dectris-v1", emu.address, max_batch=1)], consumers,
                                         router="{max_failures_per_run: 3}"))
        frames = list(synthetic_frames(10, (16, 16)))
        emu.send_series(frames, n_frames=10)
        wait_for(lambda: daemon.store.summaries() and daemon.store.summaries()[0]["status"] == "success")
    run = daemon.store.summaries()[0]
    assert run["consumers"]["bad"]["quarantined"] and run["consumers"]["bad"]["failures"] == 3
    assert counter(daemon, "beamlens_consumer_failures_total", consumer="bad") == 3
    np.testing.assert_array_equal(daemon.store.snapshot(run["uid"], "fs", "total").data, [f.sum() for f in frames])
