"""Metrics that alerts can rely on, checked over a real HTTP scrape of a running daemon:

- every counter an alert reads with ``increase()`` is exported at 0 for its known labels before
  anything happens, so a consumer that fails and is quarantined within one scrape shows up as an
  increase (promtool cases for the rule side are in configs/prometheus/beamlens_rules_test.yml);
- a frame source reports ``beamlens_source_connected`` 1 while its detector is there and 0 when the
  detector goes away (so BeamlensSourceDisconnected can fire for a dead detector).
"""
from __future__ import annotations

from beamlens.daemon.metrics import FRAME_DROP_REASONS, QUARANTINE_REASONS
from beamlens.daemon.sim.detectors import DetectorEmulator, synthetic_frames

from frame_helpers import daemon_yaml, frame_source_yaml
from helpers import scrape, wait_for


def test_counters_are_exported_at_zero_before_anything_happens(make_daemon):
    consumers = "  - {name: fs, class: frame_stats}\n  - {name: bad, class: 'frame_helpers:FailingFrameConsumer'}\n"
    with DetectorEmulator("dectris-v1") as emu:
        daemon = make_daemon(daemon_yaml([frame_source_yaml("det", "dectris-v1", emu.address, max_batch=1)], consumers,
                                         router="{max_failures_per_run: 3}"))
        before = scrape(daemon.http.url)
        for consumer in ("fs", "bad"):
            assert before[("beamlens_consumer_failures_total", (("consumer", consumer),))] == 0
            for reason in QUARANTINE_REASONS:
                assert before[("beamlens_consumers_quarantined_total", (("consumer", consumer), ("reason", reason)))] == 0
        for reason in FRAME_DROP_REASONS:
            assert before[("beamlens_frames_dropped_total", (("reason", reason), ("source", "det")))] == 0
        assert before[("beamlens_runs_total", (("exit_status", "success"),))] == 0
        # a burst between two scrapes: 3 failures and the quarantine
        emu.send_series(list(synthetic_frames(10, (16, 16))), n_frames=10)
        wait_for(lambda: daemon.store.summaries() and daemon.store.summaries()[0]["status"] == "success")
        after = scrape(daemon.http.url)
    assert after[("beamlens_consumer_failures_total", (("consumer", "bad"),))] == 3
    assert after[("beamlens_consumers_quarantined_total", (("consumer", "bad"), ("reason", "failures")))] == 1
    assert after[("beamlens_consumer_failures_total", (("consumer", "fs"),))] == 0


def test_frame_source_reports_connected_while_the_detector_is_there(make_daemon):
    emu = DetectorEmulator("dectris-v2")
    daemon = make_daemon(daemon_yaml([frame_source_yaml("det", "dectris-v2", emu.address, mode="connect")]))
    key = ("beamlens_source_connected", (("source", "det"),))
    try:
        wait_for(lambda: scrape(daemon.http.url).get(key) == 1.0, timeout=30, interval=0.1)
    finally:
        emu.close()
    wait_for(lambda: scrape(daemon.http.url).get(key) == 0.0, timeout=30, interval=0.1)


def test_unreachable_detector_is_reported_disconnected(make_daemon):
    emu = DetectorEmulator("dectris-v2")
    address = emu.address
    emu.close()  # nothing listens there any more
    daemon = make_daemon(daemon_yaml([frame_source_yaml("det", "dectris-v2", address, mode="connect")]))
    assert scrape(daemon.http.url)[("beamlens_source_connected", (("source", "det"),))] == 0.0
