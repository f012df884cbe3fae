"""Finishing runs off the router loop, background work on the daemon's pool, and frame-only series
that end without saying so:

- a final fit far longer than ``stall_timeout_s`` (the "20-minute final fit", scaled: 20 x the
  stall timeout) keeps ``/health/live`` at 200 and the systemd watchdog fed, the router routes
  another run meanwhile, and the run goes ``finishing`` -> ``success`` with the fit installed;
- an array-1.0 series (no end message) that stops sending closes its frame-only run within
  ``series_quiet_s`` + 1 s (real ZMQ sockets);
- an open-ended series of 5,000 frames analysed by a consumer whose stage runs on the pool while
  the nav buffers grow loses no point.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from beamlens.daemon.documents import Document
from beamlens.daemon.sim.detectors import DetectorEmulator, synthetic_frames
from fault_consumers import SlowFinish
from frame_helpers import counter, daemon_yaml, frame_source_yaml
from helpers import http_get, map_run_documents, wait_for

STALL_S = 0.3
FIT_S = 20 * STALL_S


@pytest.fixture
def slow_fits():
    SlowFinish.release.clear()
    SlowFinish.fits_started.clear()
    yield
    SlowFinish.release.set()  # no fit outlives its test


def submit_run(daemon, spectra, key=None):
    docs = map_run_documents(spectra)
    if key is not None:  # the same run with its spectra under another data key
        for name, doc in docs:
            if name == "descriptor":
                doc["data_keys"][key] = doc["data_keys"].pop("xas_spectrum")
                doc["object_keys"] = {"xas": [key]}
            elif name == "event":
                doc["data"][key] = doc["data"].pop("xas_spectrum")
                doc["timestamps"][key] = doc["timestamps"].pop("xas_spectrum")
    for name, doc in docs:
        daemon.router.submit(Document(name, doc, "test", time.time()))
    return docs[0][1]["uid"]


def test_long_final_fit_keeps_the_daemon_live_and_the_run_finishing_until_installed(make_daemon, notify_socket,
                                                                                    slow_fits):
    daemon = make_daemon(f"""
router: {{stall_timeout_s: {STALL_S}, finish_timeout_s: 60, pool_workers: 2}}
consumers:
  - {{name: stats, class: stats}}
  - {{name: slow, class: "fault_consumers:SlowFinish", params: {{fit_s: {FIT_S}, data_key: xas_spectrum}}}}
""")
    wait_for(lambda: any(m == "READY=1" for _, m in notify_socket))
    spectra = np.random.default_rng(1).random((12, 8))
    uid = submit_run(daemon, spectra)
    wait_for(lambda: SlowFinish.fits_started, timeout=10)
    fit_started = SlowFinish.fits_started[0]
    status, body, _ = http_get(f"{daemon.http.url}/api/runs/{uid}")
    assert status == 200 and json.loads(body)["status"] == "finishing"
    assert daemon.store.get(uid).status == "finishing"

    other = submit_run(daemon, spectra[:5], key="roi_spectrum")  # the router keeps routing while the fit runs
    assert daemon.store.wait_finished(other, 10) and daemon.store.get(other).status == "success"
    assert daemon.store.get(uid).status == "finishing"

    live = []
    while daemon.store.get(uid).status == "finishing" and time.monotonic() - fit_started < FIT_S + 30:
        live.append(http_get(f"{daemon.http.url}/health/live")[0])
        time.sleep(0.05)  # sampling interval of the probe, not a wait for a condition
    fit_done = time.monotonic()
    assert fit_done - fit_started >= FIT_S - 0.1  # the fit really ran longer than 20 stall timeouts
    assert live and set(live) == {200}
    pings = [t for t, m in notify_socket if m == "WATCHDOG=1" and fit_started < t < fit_done]
    assert len(pings) >= FIT_S / 0.1 * 0.25  # fed throughout (a ping every 0.1 s; a quarter allows a loaded machine)
    assert max(np.diff([fit_started, *pings, fit_done])) < 20 * STALL_S / 4

    assert daemon.store.wait_finished(uid, 10)
    run = daemon.store.get(uid)
    assert run.status == "success"
    slot = next(s for s in run.slots if s.name == "slow")
    np.testing.assert_allclose(slot.arrays["fitted"][0], spectra.sum())
    m = daemon.metrics.registry.get_sample_value
    assert m("beamlens_consumer_jobs_total", {"consumer": "slow", "method": "submit", "outcome": "ok"}) == 1
    assert m("beamlens_consumer_processing_seconds_count", {"consumer": "slow", "method": "submit"}) == 1
    assert m("beamlens_consumer_processing_seconds_sum", {"consumer": "slow", "method": "submit"}) >= FIT_S


def test_finish_timeout_cancels_late_jobs_and_closes_the_run(make_daemon, slow_fits):
    daemon = make_daemon("""
router: {finish_timeout_s: 0.5, pool_workers: 1}
consumers:
  - {name: slow, class: "fault_consumers:SlowFinish", params: {fit_s: 30}}
""")
    uid = submit_run(daemon, np.ones((3, 4)))
    assert daemon.store.wait_finished(uid, 10)
    run = daemon.store.get(uid)
    assert run.status == "success" and np.isnan(run.slots[0].arrays["fitted"][0])  # closed with what was installed
    assert daemon.metrics.registry.get_sample_value(
        "beamlens_limit_actions_total", {"limit": "finish_timeout", "action": "cancelled"}) == 1


def test_array10_series_that_stops_sending_closes_within_quiet_period(make_daemon):
    quiet = 0.5
    with DetectorEmulator("array-1.0") as emu:
        daemon = make_daemon(daemon_yaml([frame_source_yaml("cam", "array-1.0", emu.address)],
                                         router=f"{{series_quiet_s: {quiet}}}"))
        frames = list(synthetic_frames(7, (12, 10), seed=2))
        emu.send_series(frames)
        wait_for(lambda: counter(daemon, "beamlens_frames_processed_total", source="cam") == 7)
        last_frame = time.monotonic()
        (run,) = daemon.store.runs()
        assert daemon.store.wait_finished(run.uid, quiet + 5)
        closed = time.monotonic()
    assert closed - last_frame <= quiet + 1.0
    assert run.status == "success" and run.frames_done == 7
    assert daemon.metrics.registry.get_sample_value("beamlens_runs_open") == 0
    np.testing.assert_array_equal(daemon.store.snapshot(run.uid, "fs", "total").data,
                                  [f.astype(np.float64).sum() for f in frames])


def test_open_ended_series_with_a_pool_stage_loses_no_point(make_daemon):
    n = 5000
    with DetectorEmulator("array-1.0") as emu:
        daemon = make_daemon(daemon_yaml(
            [frame_source_yaml("cam", "array-1.0", emu.address)],
            consumers="  - {name: staged, class: 'fault_consumers:StagedSum'}\n  - {name: fs, class: stats, "
                      "params: {signal: frame}}\n",
            router="{series_quiet_s: 1.0, pool_workers: 2}"))
        written: list[int] = []  # the sinks hear of every point the stage's process wrote
        daemon.router.listeners.append(
            lambda name, run, doc: written.extend(doc["seq_num"]) if name == "results" and doc["consumer"] == "staged"
            else None)
        frames = list(synthetic_frames(n, (8, 8), seed=3))
        emu.send_series(frames)
        wait_for(lambda: counter(daemon, "beamlens_frames_processed_total", source="cam") == n, timeout=120)
        (run,) = daemon.store.runs()
        assert daemon.store.wait_finished(run.uid, 30)
    assert run.status == "success" and run.frames_done == n and run.nav_capacity >= n > 1024  # it grew
    expected = np.array([f.astype(np.float64).sum() for f in frames])
    staged = next(s for s in run.slots if s.name == "staged")
    assert staged.arrays["points"][0] == n
    assert sorted(written) == list(range(1, n + 1))
    np.testing.assert_array_equal(daemon.store.snapshot(run.uid, "staged", "total").data, expected)
    np.testing.assert_array_equal(daemon.store.snapshot(run.uid, "fs", "total").data, expected)
    assert daemon.metrics.registry.get_sample_value(
        "beamlens_consumer_jobs_total", {"consumer": "staged", "method": "stage", "outcome": "ok"}) > 0


def test_frames_after_a_pause_longer_than_quiet_open_a_new_run_not_dropped(make_daemon):
    from beamlens.daemon.sim.detectors import array10_messages

    quiet = 0.3
    with DetectorEmulator("array-1.0") as emu:
        daemon = make_daemon(daemon_yaml([frame_source_yaml("cam", "array-1.0", emu.address)],
                                         router=f"{{series_quiet_s: {quiet}}}"))
        frames = list(synthetic_frames(6, (6, 5), seed=4))
        messages = list(array10_messages(frames))  # one series: frame numbers 0..5
        for parts in messages[:3]:
            emu.socket.send_multipart(parts, copy=False)
        wait_for(lambda: daemon.store.runs() and daemon.store.runs()[0].status == "success")
        (first,) = daemon.store.runs()
        for parts in messages[3:]:  # the camera goes on after a pause longer than series_quiet_s
            emu.socket.send_multipart(parts, copy=False)
        wait_for(lambda: counter(daemon, "beamlens_frames_processed_total", source="cam") == 6)
        wait_for(lambda: len(daemon.store.runs()) == 2 and daemon.store.runs()[0].status == "success")
    assert first.frames_done == 3 and daemon.store.runs()[0].frames_done == 3
    assert counter(daemon, "beamlens_frames_dropped_total", source="cam", reason="stale_series") == 0


def test_dectris_series_whose_end_never_comes_closes_incomplete_after_its_grace(make_daemon):
    """A frame-only DECTRIS series that loses its end message (an aborted acquisition) closes,
    whatever the format, after max(series_quiet_s, series_end_grace_s, 2 frame times) of silence,
    as ``incomplete``: it neither stays open until run_timeout_s nor is cut between slow frames."""
    quiet, grace = 0.3, 1.0
    with DetectorEmulator("dectris-v2") as emu:
        daemon = make_daemon(daemon_yaml([frame_source_yaml("det", "dectris-v2", emu.address)],
                                         router=f"{{series_quiet_s: {quiet}, series_end_grace_s: {grace}}}"))
        frames = list(synthetic_frames(5, (12, 10), seed=3))
        messages = list(emu.messages(frames, n_frames=8))  # 8 announced, 5 sent, no end message
        for parts in messages[:-1]:
            emu.send_raw(parts)
        wait_for(lambda: counter(daemon, "beamlens_frames_processed_total", source="det") == 5)
        last_frame = time.monotonic()
        (run,) = daemon.store.runs()
        assert daemon.store.wait_finished(run.uid, grace + 5)
        closed = time.monotonic()
    assert closed - last_frame <= grace + 1.0
    assert run.status == "incomplete" and run.frames_done == 5
    assert daemon.metrics.registry.get_sample_value("beamlens_runs_open") == 0
