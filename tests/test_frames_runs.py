"""Run correlation with a real RunEngine: a series sent during a Bluesky run lands in that run, each frame
in the map pixel of its frame number (RunStart shape and snaking); without a run, a series becomes a
frame-only run labelled by its series id; frames of a superseded series are dropped and counted."""
from __future__ import annotations

import json

import numpy as np
import pytest

from beamlens.daemon.sim.detectors import DetectorEmulator, raster_series_plan, synthetic_frames

from frame_helpers import counter, daemon_yaml, frame_source_yaml
from helpers import http_get, subscribe, wait_for

SHAPE = (3, 4)


def expected_map(frames: list[np.ndarray], shape: tuple[int, int], snake: bool) -> np.ndarray:
    """Frame k of a (rows, cols) raster: row k // cols; odd rows reversed when snaking."""
    out = np.full(shape, np.nan)
    for k, f in enumerate(frames):
        row, col = divmod(k, shape[1])
        if snake and row % 2:
            col = shape[1] - 1 - col
        out[row, col] = f.astype(np.float64).sum()
    return out


@pytest.mark.parametrize("fmt", ["dectris-v1", "dectris-v2", "array-1.0"])
def test_series_attach_to_their_runs_in_the_right_pixels(proxy, beamline, make_daemon, fmt):
    n = SHAPE[0] * SHAPE[1]
    with DetectorEmulator(fmt) as emu:
        daemon = make_daemon(daemon_yaml([frame_source_yaml("det", fmt, emu.address)], bluesky=proxy.out_address,
                                         router="{series_end_grace_s: 2}"))
        subscribe(daemon, proxy)
        runs = []
        for k, snake in enumerate([True, False]):
            frames = list(synthetic_frames(n, (20, 30), seed=k))
            (uid,) = beamline.RE(raster_series_plan(emu, frames, SHAPE, snake=snake, series=k + 1,
                                                    run_seen=lambda u: daemon.store.get(u) is not None))
            runs.append((uid, frames, snake))
            wait_for(lambda: counter(daemon, "beamlens_frames_processed_total", source="det") == n * (k + 1))
    for uid, frames, snake in runs:
        wait_for(lambda: daemon.store.get(uid).status != "open")
        summary = daemon.store.get(uid).summary()
        assert summary["frames_done"] == n and summary["nav_shape"] == list(SHAPE)
        status, body, _ = http_get(f"{daemon.http.url}/api/runs/{uid}/fs/total.json")
        assert status == 200
        got = json.loads(body)
        assert got["shape"] == list(SHAPE)
        np.testing.assert_array_equal(np.array(got["data"], dtype=float), expected_map(frames, SHAPE, snake))
    assert counter(daemon, "beamlens_frame_series_total", source="det", attached="yes") == 2
    assert counter(daemon, "beamlens_frame_series_total", source="det", attached="no") == 0


def test_series_without_run_is_a_frame_only_run_and_stale_frames_are_counted(make_daemon):
    with DetectorEmulator("dectris-v2") as emu:
        daemon = make_daemon(daemon_yaml([frame_source_yaml("det", "dectris-v2", emu.address)]))
        first = list(synthetic_frames(6, (16, 16), seed=1))
        messages = list(emu.messages(first, series=1, n_frames=6))
        for parts in messages[:4]:  # start + 3 images, then the detector re-arms without an end
            emu.socket.send_multipart(parts)
        second = list(synthetic_frames(5, (16, 16), seed=2))
        for parts in list(emu.messages(second, series=2, n_frames=5))[:3]:  # start + 2 images
            emu.socket.send_multipart(parts)
        emu.socket.send_multipart(messages[4])  # a late image of series 1
        for parts in list(emu.messages(second, series=2, n_frames=5))[3:]:
            emu.socket.send_multipart(parts)
        wait_for(lambda: len(daemon.store.summaries()) == 2 and daemon.store.summaries()[0]["status"] == "success")
    newest, oldest = daemon.store.summaries()
    assert oldest["status"] == "incomplete" and oldest["frames_done"] == 3 and oldest["nav_shape"] == [6]
    assert newest["uid"].startswith("det-emu-2-") and newest["plan_name"] == "frame_series"
    assert newest["frames_done"] == 5 and newest["nav_shape"] == [5]
    assert counter(daemon, "beamlens_frames_dropped_total", source="det", reason="stale_series") == 1
    total = daemon.store.snapshot(newest["uid"], "fs", "total").data
    np.testing.assert_array_equal(total, [f.sum() for f in second])
