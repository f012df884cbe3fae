"""Frame runs reach the sinks as event runs do: a simulated microscope movie (array-1.0 over a real
ZeroMQ socket on 127.0.0.1) through the shipped defects network, with its post-processing in the
background as in the demo, into derived documents (a real bluesky 0MQ Proxy and RemoteDispatcher),
Prometheus gauges (real HTTP scrape) and run files (h5py).

The movie is sent frame by frame (:class:`frame_helpers.GatedMovie`), each frame once the daemon
has processed the one before, so a test sees the run *while* it streams without timing anything.
"""
from __future__ import annotations

import json
import time

import h5py
import numpy as np
import pytest
from event_model import DocumentNames, schema_validators

from frame_helpers import GatedMovie, counter, daemon_yaml, frame_source_yaml
from helpers import http_get, scrape, wait_for
from test_documents_sink import Collector, events_of

DEFECTS = "  - {name: defects, class: defects, params: {fit_after: 8}}\n"  # background post-processing (the default)


@pytest.fixture
def collector(proxy):
    c = Collector(proxy.out_address, proxy.in_address)
    yield c
    c.close()


def frame_run(daemon):
    (run,) = daemon.store.runs()
    return run


def test_derived_events_of_a_frame_run_arrive_while_it_streams(proxy, make_daemon, collector):
    n = 16
    with GatedMovie(n) as movie:
        daemon = make_daemon(daemon_yaml([frame_source_yaml("stem", "array-1.0", movie.address)], consumers=DEFECTS)
                             + f'outputs:\n  documents: {{enabled: true, address: "{proxy.in_address}", '
                               'prefix: beamlens, event_interval_s: 0}\n')
        movie.send(daemon, 6)
        run = frame_run(daemon)
        assert run.status == "open"

        def primary_events():
            by_run = [docs for docs in collector.runs().values() if docs[0][1]["original_run_uid"] == run.uid]
            if not by_run:
                return []
            descriptors = {d["name"]: d for name, d in by_run[0] if name == "descriptor"}
            return events_of(by_run[0], descriptors["primary"]) if "primary" in descriptors else []

        # while the movie goes on, the first frames' derived events arrive, carrying their results
        # (written by the consumer's worker after the router announced the frames, not NaN)
        def first_frames_published() -> bool:
            if {e["seq_num"] for e in primary_events()} >= set(range(1, 7)):
                return True
            if movie.sent < n - 1:
                movie.send(daemon, 1)  # the next frame's notification publishes what was written since
            return False
        wait_for(first_frames_published, timeout=60, interval=0)
        assert run.status == "open" and movie.sent < n, "the events came only at the end of the run"
        total = daemon.store.snapshot(run.uid, "defects", "total").data
        during = {e["seq_num"]: e["data"]["total"] for e in primary_events()}
        assert all(np.isfinite(v) for v in during.values()), during
        for seq in range(1, 7):
            assert during[seq] == total[seq - 1]

        movie.send(daemon, n - movie.sent)  # the announced count arrives: the run stops
        assert daemon.store.wait_finished(run.uid, 30)
    wait_for(lambda: any(docs[-1][0] == "stop" for docs in collector.runs().values()), timeout=30)

    for name, doc in collector.docs:
        schema_validators[DocumentNames[name]].validate(doc)
    events = primary_events()
    assert sorted(e["seq_num"] for e in events) == list(range(1, n + 1)), "every frame once"
    total = daemon.store.snapshot(run.uid, "defects", "total").data
    counts = daemon.store.snapshot(run.uid, "defects", "counts").data
    for e in events:
        assert e["data"]["nav_index"] == e["seq_num"] - 1
        assert e["data"]["total"] == total[e["seq_num"] - 1] and np.isfinite(e["data"]["total"])
        np.testing.assert_array_equal(e["data"]["counts"], counts[e["seq_num"] - 1])


@pytest.mark.parametrize("announce", [True, False], ids=["announced_count", "quiet"])
def test_a_single_frame_series_closes_and_exports_its_defect_gauges(make_daemon, tmp_path, announce):
    """One frame, too few defects to fit the classes before the run ends: the run closes (at its
    announced count, or ``series_quiet_s`` after the frame for an end-less array-1.0 series), the
    gauges and the run file hold that frame's defects."""
    quiet_s = 0.5
    with GatedMovie(1, announce=announce) as movie:
        daemon = make_daemon(daemon_yaml([frame_source_yaml("stem", "array-1.0", movie.address)],
                                         consumers="  - {name: defects, class: defects}\n",
                                         router=f"{{series_quiet_s: {quiet_s}}}")
                             + f'outputs:\n  files: {{enabled: true, directory: "{tmp_path}"}}\n')
        movie.send(daemon, 1)
        processed = time.time()
        run = frame_run(daemon)
        assert daemon.store.wait_finished(run.uid, 30)
    assert run.status == "success" and run.frames_done == 1
    assert run.closed - processed <= quiet_s + 1.0
    total = daemon.store.snapshot(run.uid, "defects", "total").data
    counts = daemon.store.snapshot(run.uid, "defects", "counts").data
    assert total.shape == (1,) and total[0] > 0 and counts[0].sum() == total[0]

    metrics = scrape(daemon.http.url)
    per_class = {dict(labels)["index"]: v for (name, labels), v in metrics.items()
                 if name == "beamlens_defects" and ("consumer", "defects") in labels}
    assert per_class == {str(i): counts[0][i] for i in range(3)}
    density = metrics[("beamlens_defect_density_per_square_pixel", (("consumer", "defects"), ("index", "0")))]
    assert density == total[0] / (256 * 256)
    assert metrics[("beamlens_runs_open", ())] == 0

    wait_for(lambda: len(daemon.files.written) == 1, timeout=30)
    with h5py.File(daemon.files.written[0], "r") as f:
        assert f["entry/exit_status"][()].decode() == "success"
        np.testing.assert_array_equal(f["entry/defects/total/data"][()], total)
        np.testing.assert_array_equal(f["entry/defects/counts/data"][()], counts)


def test_the_last_frames_results_reach_the_api_digests_while_the_run_is_open(make_daemon):
    """The live page's feed re-examines an open run after its last frame: the last batch, written
    by the consumer's worker after the router's notification, changes the digests it publishes."""
    with GatedMovie(8) as movie:
        daemon = make_daemon(daemon_yaml([frame_source_yaml("stem", "array-1.0", movie.address)], consumers=DEFECTS,
                                         router="{series_quiet_s: 120}"))
        movie.send(daemon, 5)  # 5 of 8 announced: the run stays open, no further notification comes
        run = frame_run(daemon)

        def page_shows_every_frame() -> bool:  # the state the HTTP server's push loop published
            state = daemon.feed.state
            key = (run.uid, "defects", "total")
            total = daemon.store.snapshot(run.uid, "defects", "total").data
            return key in state.digests and np.isfinite(total[:5]).all() and \
                state.digests[key] == daemon.store.digest(run.uid, "defects", "total", 2**30)
        wait_for(page_shows_every_frame, timeout=30)
        assert run.status == "open"
        status, body, _ = http_get(f"{daemon.http.url}/api/runs/{run.uid}/defects/total.json")
        assert status == 200 and None not in json.loads(body)["data"][:5]
        assert counter(daemon, "beamlens_frames_processed_total", source="stem") == 5
