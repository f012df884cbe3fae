"""The bounds of :mod:`beamlens.daemon.limits` and :mod:`beamlens.daemon.isolation`, and what the
router makes of them: wire numbers, safe file names, rolling windows, retention in bytes, and a
vital thread that dies anyway."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from beamlens.daemon.app import EXIT_THREAD_DIED, Daemon
from beamlens.daemon.config import load_config
from beamlens.daemon.isolation import RateLimitedLog
from beamlens.daemon.limits import MAX_WIRE_INDEX, TokenBucket, inside, safe_stem, wire_index, wire_shape

from helpers import map_run_documents, route_in_process, wait_for


@pytest.mark.parametrize("value, expected", [
    (0, 0), (5, 5), (np.int64(7), 7), (np.uint64(2**64 - 1), None), (-1, None), (True, None), (2**70, None),
    (10**300, None), (1.0, None), (float("nan"), None), ("3", None), (None, None), (MAX_WIRE_INDEX, MAX_WIRE_INDEX)])
def test_wire_index(value, expected):
    assert wire_index(value) == expected


def test_wire_shape():
    assert wire_shape([3, 4], 100) == (3, 4)
    assert wire_shape([5000, 5000], 10**6) is None
    assert wire_shape([10**30], 10**9) is None
    assert wire_shape("ab", 100) is None


@pytest.mark.parametrize("uid", ["../x/y", "/etc/passwd", "u" * 300, "nul\x00", "", ".", "..", ".hidden", "a/b", "\udcff"])
def test_hostile_identifiers_become_hashes_inside_the_directory(tmp_path, uid):
    stem = safe_stem(uid)
    assert stem.startswith("h-") and len(stem) == 34
    assert inside(tmp_path, stem + ".ckpt").parent == tmp_path


def test_plain_uids_are_kept_and_paths_refused(tmp_path):
    uid = "0f8e3a52-7d1c-4b4e-9f53-1c2d3e4f5a6b"
    assert safe_stem(uid) == uid
    for name in ("../x", "a/b", "..", ""):
        with pytest.raises(ValueError):
            inside(tmp_path, name)


def test_token_bucket_allows_its_burst_then_refuses():
    bucket = TokenBucket(rate=0.001, burst=5)
    assert [bucket.take() for _ in range(7)] == [True] * 5 + [False] * 2
    assert all(TokenBucket(0, 1).take() for _ in range(100))  # rate 0: unlimited


def test_rate_limited_log_logs_powers_of_two(caplog):
    rlog = RateLimitedLog(logging.getLogger("test.rlog"), min_interval_s=3600)
    with caplog.at_level(logging.WARNING, "test.rlog"):
        for _ in range(100):
            rlog.log(logging.WARNING, "k", "bad message")
    assert len(caplog.records) == 7  # 1, 2, 4, 8, 16, 32, 64


CONFIG = """
consumers:
  - {name: stats, class: stats}
limits: {open_ended_max_points: 40, open_ended_chunk_points: 16, memory_budget_mib: 64}
"""


def test_open_ended_run_keeps_a_rolling_window_of_the_newest_points():
    spectra = np.random.default_rng(3).random((500, 8))
    docs = map_run_documents(spectra, page=7)
    docs[0] = ("start", {k: v for k, v in docs[0][1].items() if k != "num_points"})
    router, store, metrics = route_in_process(CONFIG, docs)
    run = store.summaries()[0]
    assert run["status"] == "success" and run["events_done"] == 500 and run["limited"] == "rolling_window"
    (n,) = run["nav_shape"]
    assert n <= 40
    total = store.snapshot(run["uid"], "stats", "total").data
    np.testing.assert_allclose(total, spectra.sum(axis=1)[run["nav_offset"]:run["nav_offset"] + n])
    assert metrics.registry.get_sample_value("beamlens_limit_actions_total",
                                             {"limit": "open_ended_max_points", "action": "rolling_window"}) == 1


def test_declared_shape_over_the_budget_is_downgraded():
    spectra = np.random.default_rng(4).random((30, 8))
    docs = map_run_documents(spectra, shape=(3000, 3000))  # 9e6 points x 3 float64 buffers = 206 MiB > 64 MiB
    router, store, metrics = route_in_process(CONFIG.replace("open_ended_max_points: 40", "open_ended_max_points: 1000"), docs)
    run = store.summaries()[0]
    assert run["limited"] == "rolling_window" and run["events_done"] == 30
    np.testing.assert_allclose(store.snapshot(run["uid"], "stats", "total").data, spectra.sum(axis=1))


def test_finished_runs_are_kept_within_keep_runs_mib():
    from beamlens.daemon.results import RunStore
    config = CONFIG + "router: {keep_runs: 100}\n"
    spectra = np.random.default_rng(5).random((1000, 8))
    docs = []
    for _ in range(6):
        docs += map_run_documents(spectra, page=100)
    router, store, _ = route_in_process(config, docs)
    one = store.get("latest").nbytes
    kept = RunStore(keep=100, keep_bytes=2.5 * one)
    for run in [store.get(s["uid"]) for s in reversed(store.summaries())]:
        kept.add(run)
    assert len(kept.summaries()) == 2 and kept.nbytes() <= 2.5 * one


class _Fatal(BaseException):
    """Beyond ``except Exception``: what kills a thread despite the isolation."""


class _Poison:
    @property
    def name(self):
        raise _Fatal("simulated interpreter-level failure")


def test_a_dead_router_thread_makes_the_daemon_unhealthy_and_exit_nonzero(tmp_path: Path):
    config = load_config(text=f"""
http: {{port: 0}}
consumers:
  - {{name: stats, class: stats}}
state: {{directory: {tmp_path / "state"}}}
limits: {{dead_thread_exit_s: 0.5}}
""", environ={})
    daemon = Daemon(config)
    code: list[int] = []
    health: list[dict] = []

    def poison() -> None:
        wait_for(lambda: daemon.router.thread is not None and daemon.router.thread.is_alive())
        from beamlens.daemon.documents import Document
        spectra = np.random.default_rng(6).random((5, 4))
        for name, doc in map_run_documents(spectra)[:-1]:  # an open run, to be checkpointed on the way out
            daemon.router.submit(Document(name, doc, "test", 0.0))
        assert daemon.router.wait_idle(30)
        threading.excepthook, previous = (lambda args: None), threading.excepthook
        try:
            daemon.router.submit(_Poison())
            wait_for(lambda: not daemon.router.thread.is_alive())
            health.append(daemon.liveness())
        finally:
            threading.excepthook = previous

    helper = threading.Thread(target=poison)
    helper.start()
    code.append(daemon.run_until_signalled())  # main thread: signal handlers
    helper.join(10)
    assert code == [EXIT_THREAD_DIED]
    assert health[0]["live"] is False and health[0]["dead_threads"] == ["beamlens-router"]
    assert len(list((tmp_path / "state").glob("*.ckpt"))) == 1


def test_frame_queue_is_bounded_in_bytes():
    from beamlens.daemon.sources.frame_queue import FrameQueue, RawMessage
    skipped: list[int] = []
    q = FrameQueue(100, "latest", skipped.append, max_bytes=250)
    for i in range(5):
        assert q.put(RawMessage([b"x" * 100], True, float(i), nbytes=100))
    assert len(q) == 2 and sum(skipped) == 3  # 100-byte images, 250 bytes at most: the oldest go
    block = FrameQueue(100, "block", max_bytes=250)
    assert block.put(RawMessage([b"x" * 200], True, 0.0, nbytes=200))
    assert not block.put(RawMessage([b"x" * 100], True, 1.0, nbytes=100), abort=lambda: True)  # would wait
    assert [m.received for m in block.get_batch(10, 0.1)] == [0.0]
    assert block.put(RawMessage([b"x" * 100], True, 1.0, nbytes=100), abort=lambda: True)


@pytest.mark.parametrize("extra", [(), (3,), (2, 2)])
def test_rolling_window_shift_equals_numpy_without_a_window_sized_temporary(extra):
    """The chunked in-place shift of a rolling window gives numpy's ``a[:-s] = a[shift:]``, for any
    shift and chunk size (chunks smaller than, equal to and larger than one point)."""
    from beamlens.daemon.results import _shift_down
    rng = np.random.default_rng(7)
    for n in (2, 7, 100, 333):
        for shift in sorted({1, 2, n // 3 or 1, n // 2 or 1, n - 1}):
            a = rng.random((n, *extra))
            expected = a[shift:].copy()
            _shift_down(a, shift, chunk_bytes=int(rng.integers(1, 400)))
            np.testing.assert_array_equal(a[:-shift], expected)
