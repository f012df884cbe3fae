"""A hostile peer on the wire, against a daemon started as users start it (``beamlens run --config``)
with a real bluesky 0MQ proxy, DECTRIS v1/v2 and array-1.0 frame sources, run files and checkpoints.

Every attack of issue 10 that the daemon's core answers (the HTTP ones are in the HTTP tests) is
replayed here, in order, against one daemon. After each: the daemon is live, the next good map run
and the next good frame series are analysed fully, its RSS stays under the memory budget plus a
fixed margin, and no file appears outside the run-file and state directories. At the end the
counters add up: events received = processed + rejected, and per frame source, image messages
received = frames processed + dropped (by reason) + rejected.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import cbor2
import numpy as np
import pytest
from event_model import compose_run

from beamlens.daemon.sim.detectors import DetectorEmulator, synthetic_frames, v2_encode
from beamlens.daemon.sim.proxy import ProxyProcess

from helpers import DaemonProcess, RawPublisher, http_get, rss_mib, scrape, wait_for, wait_for_count
from test_faults import RunWriter

BUDGET_MIB = 384
RSS_MARGIN_MIB = 400
"""Interpreter, libraries (numpy, scipy, h5py, zmq, aiohttp) and allocator slack beyond the budget."""
SPECTRA = np.random.default_rng(7).random((120, 40))
FORMATS = {"v1": "dectris-v1", "v2": "dectris-v2", "a10": "array-1.0"}

pytestmark = pytest.mark.timeout(600)


class Peer:
    """The daemon, its proxies (msgpack and JSON), the emulated detectors and a sentinel file
    outside every daemon directory."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.proxy = ProxyProcess().start()
        self.proxy_json = ProxyProcess().start()
        self.dets = {k: DetectorEmulator(fmt) for k, fmt in FORMATS.items()}
        self.sentinel = tmp / "outside" / "keep.ckpt"
        self.sentinel.parent.mkdir()
        self.sentinel.write_text("precious")
        frames = "".join(f"    - {{name: {k}, format: {fmt}, address: '{self.dets[k].address}', "
                         f"max_message_bytes: {64 * 2**20}}}\n" for k, fmt in FORMATS.items())
        config = tmp / "beamlens.yaml"
        config.write_text(f"""
log_level: INFO
http: {{port: 0}}
sources:
  bluesky:
    - {{name: test, address: "{self.proxy.out_address}"}}
    - {{name: tjson, address: "{self.proxy_json.out_address}", serializer: json}}
  frames:
{frames}consumers:
  - {{name: stats, class: stats}}
  - {{name: fs, class: frame_stats}}
router:
  run_timeout_s: 600
  series_end_grace_s: 1.0
state:
  directory: {tmp / "state"}
  checkpoint_interval_s: 0.5
outputs:
  files: {{enabled: true, directory: {tmp / "runs"}}}
limits:
  memory_budget_mib: {BUDGET_MIB}
  keep_runs_mib: 32
  frame_queue_mib: 32
  batch_max_mib: 16
  open_ended_max_points: 20000
  max_open_runs: 16
  run_starts_per_s: 20
  run_start_burst: 40
  series_starts_per_s: 20
  series_start_burst: 40
  max_data_keys: 1000
""")
        self.daemon = DaemonProcess(config)
        self.pub = RawPublisher(self.proxy.in_address)
        self.pub_json = RawPublisher(self.proxy_json.in_address)
        self.pub.ready(seen=self._probe("test"))
        self.pub_json.ready(seen=self._probe("tjson"))
        self.rss0 = rss_mib(self.daemon.proc.pid)
        self.series = 100
        self.rss_log: list[tuple[str, float]] = []

    def _probe(self, source: str):
        base = self.daemon.metric("beamlens_probes_received_total", source=source)
        return lambda nonce: self.daemon.metric("beamlens_probes_received_total", source=source) > base

    def metrics(self) -> dict:
        return scrape(self.daemon.url)

    def m(self, name: str, **labels: str) -> float:
        return self.daemon.metric(name, **labels)

    def send_json(self, name: str, text: str) -> None:
        self.pub_json.send(b" " + name.encode() + b" " + text.encode())

    def check_healthy(self) -> None:
        """Live, the next good map run and the next good series of every detector analysed fully,
        RSS within budget + margin, nothing written outside the daemon's directories."""
        assert self.daemon.proc.poll() is None, "daemon exited:\n" + "\n".join(self.daemon.lines[-40:])
        status, body, _ = http_get(self.daemon.url + "/health/live")
        assert status == 200, body
        run = RunWriter(SPECTRA)
        run.head(self.pub)
        run.events(self.pub, range(120))
        run.stop(self.pub)
        wait_for(lambda: (self.daemon.run(run.uid) or {}).get("status") == "success", timeout=60)
        summary = self.daemon.run(run.uid)
        assert summary["events_done"] == 120 and summary["consumers"]["stats"]["active"]
        status, body, _ = http_get(f"{self.daemon.url}/api/runs/{run.uid}/stats/total.json")
        assert status == 200
        for key, det in self.dets.items():
            before = self.m("beamlens_frames_processed_total", source=key)
            self.series += 1
            frames = list(synthetic_frames(5, (16, 24), seed=self.series))
            det.send_series(frames, series=self.series, **({} if key == "a10" else {"n_frames": 5}))
            wait_for(lambda: self.m("beamlens_frames_processed_total", source=key) >= before + 5, timeout=60)
        rss = rss_mib(self.daemon.proc.pid)
        self.rss_log.append((os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0], round(rss, 1)))
        assert rss < BUDGET_MIB + RSS_MARGIN_MIB
        assert self.sentinel.read_text() == "precious"
        allowed = {self.tmp / "state", self.tmp / "runs", self.tmp / "outside", self.tmp / "beamlens.yaml"}
        assert {p for p in self.tmp.iterdir()} <= allowed, sorted(self.tmp.iterdir())
        assert list((self.tmp / "outside").iterdir()) == [self.sentinel]

    def close(self) -> None:
        self.pub.close()
        self.pub_json.close()
        for det in self.dets.values():
            det.close(0)
        self.daemon.close()
        self.proxy.stop()
        self.proxy_json.stop()


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    p = Peer(tmp_path_factory.mktemp("hostile"))
    yield p
    p.close()


def v1_header(series: int, **config) -> list[bytes]:
    return [json.dumps({"htype": "dheader-1.0", "series": series, "header_detail": "basic"}).encode(),
            json.dumps({"x_pixels_in_detector": 24, "y_pixels_in_detector": 16, **config}).encode()]


def v1_frame(series: int, number: int | str, frame: np.ndarray) -> list[bytes]:
    head = '{"htype": "dimage-1.0", "series": %d, "frame": %s, "hash": ""}' % (series, number)
    return [head.encode(), json.dumps({"htype": "dimage_d-1.0", "shape": [frame.shape[1], frame.shape[0]],
                                       "type": frame.dtype.name, "encoding": "<"}).encode(),
            frame.tobytes(), b'{"htype": "dconfig-1.0"}']


def a10_frame(number: int | str, frame: np.ndarray, **extra) -> list[bytes]:
    head = json.dumps({"htype": "array-1.0", "type": frame.dtype.name, "shape": list(frame.shape), **extra})
    return [(head[:-1] + ', "frame": %s}' % number).encode(), frame.tobytes()]


FRAME = np.ones((16, 24), dtype=np.uint16)


def test_a_good_run_first(peer):
    peer.check_healthy()


def test_v1_header_announcing_1e18_frames_then_a_frame(peer):
    before = peer.m("beamlens_limit_actions_total", limit="n_frames", action="ignored")
    det = peer.dets["v1"]
    det.send_raw(v1_header(7, nimages=10**9, ntrigger=10**9))
    det.send_raw(v1_frame(7, 0, FRAME))
    det.send_raw([b'{"htype": "dseries_end-1.0", "series": 7}'])
    wait_for(lambda: peer.m("beamlens_limit_actions_total", limit="n_frames", action="ignored") == before + 1)
    peer.check_healthy()


def test_v1_header_nimages_1e8(peer):
    before = peer.m("beamlens_limit_actions_total", limit="memory_budget", action="rolling_window")
    det = peer.dets["v1"]
    det.send_raw(v1_header(8, nimages=10**8, ntrigger=1))
    det.send_raw(v1_frame(8, 0, FRAME))
    det.send_raw([b'{"htype": "dseries_end-1.0", "series": 8}'])
    wait_for(lambda: peer.m("beamlens_limit_actions_total", limit="memory_budget", action="rolling_window") > before)
    peer.check_healthy()


@pytest.mark.parametrize("number", [2**62, 2**64 + 5, 10**30])
def test_frame_numbers_near_and_beyond_int64(peer, number):
    """array-1.0 (open-ended series: the nav buffers must not follow the frame number) and
    DECTRIS v1 JSON bignums; DECTRIS v2 CBOR bignum image ids."""
    bad = {k: peer.m("beamlens_frame_decode_errors_total", source=k, reason="bad_frame_number") for k in FORMATS}
    jump = {k: peer.m("beamlens_frame_decode_errors_total", source=k, reason="frame_number_jump") for k in FORMATS}
    gap = {k: peer.m("beamlens_frames_dropped_total", source=k, reason="gap") for k in FORMATS}
    peer.dets["a10"].send_raw(a10_frame(0, FRAME))
    peer.dets["a10"].send_raw(a10_frame(number, FRAME))
    peer.dets["v1"].send_raw(v1_header(9, nimages=5, ntrigger=1))
    peer.dets["v1"].send_raw(v1_frame(9, 0, FRAME))
    peer.dets["v1"].send_raw(v1_frame(9, number, FRAME))
    peer.dets["v1"].send_raw([b'{"htype": "dseries_end-1.0", "series": 9}'])
    v2 = peer.dets["v2"]
    v2.send_raw([v2_encode({"type": "start", "series_id": 9, "image_dtype": "uint16", "image_size_x": 24,
                            "image_size_y": 16, "number_of_images": 2**70, "channels": ["t1"]})])
    array = cbor2.CBORTag(40, [[16, 24], cbor2.CBORTag(69, FRAME.tobytes())])
    for i in (0, number):
        v2.send_raw([v2_encode({"type": "image", "series_id": 9, "image_id": i, "data": {"t1": array}})])
    v2.send_raw([v2_encode({"type": "end", "series_id": 9})])

    def rejected(k):
        return (peer.m("beamlens_frame_decode_errors_total", source=k, reason="bad_frame_number") - bad[k]
                + peer.m("beamlens_frame_decode_errors_total", source=k, reason="frame_number_jump") - jump[k])
    wait_for(lambda: all(rejected(k) == 1 for k in FORMATS))
    for k in FORMATS:
        assert peer.m("beamlens_frames_dropped_total", source=k, reason="gap") == gap[k]
    peer.check_healthy()


def test_frame_gap_of_1e18_is_not_counted(peer):
    gap = peer.m("beamlens_frames_dropped_total", source="v1", reason="gap")
    det = peer.dets["v1"]
    det.send_raw(v1_header(10, nimages=3, ntrigger=1))
    for n in (0, 10**18, 2):  # a jump, then the series goes on: one gap frame (1), not 1e18
        det.send_raw(v1_frame(10, n, FRAME))
    det.send_raw([b'{"htype": "dseries_end-1.0", "series": 10}'])
    peer.check_healthy()
    assert peer.m("beamlens_frames_dropped_total", source="v1", reason="gap") == gap + 1


@pytest.mark.parametrize("uid", ["u" * 300, "nul\x00uid", "../x/y", "../outside/keep", "/tmp/beamlens-abs-uid"])
def test_hostile_uids_stay_inside_their_directories(peer, uid):
    runs = peer.m("beamlens_runs_total", exit_status="success")
    bundle = compose_run(uid=uid, metadata={"plan_name": "count"})
    stop = bundle.compose_stop()
    before = set((peer.tmp / "state").glob("*.ckpt"))
    peer.pub.publish("start", bundle.start_doc)
    wait_for(lambda: set((peer.tmp / "state").glob("*.ckpt")) - before)  # the open run is checkpointed
    peer.pub.publish("stop", stop)
    wait_for(lambda: peer.m("beamlens_runs_total", exit_status="success") > runs)
    peer.check_healthy()
    assert not Path("/tmp/beamlens-abs-uid.ckpt").exists()
    assert all(p.parent == peer.tmp / "state" for p in (peer.tmp / "state").rglob("*"))
    assert all(p.parent == peer.tmp / "runs" for p in (peer.tmp / "runs").rglob("*"))


def test_json_runstop_with_num_events_10_to_the_3999(peer):
    missing = peer.m("beamlens_events_missing_total")
    bundle = compose_run(metadata={"plan_name": "count"})
    desc = bundle.compose_descriptor(name="primary", data_keys={"x": {"source": "s", "dtype": "number", "shape": []}})
    peer.send_json("start", json.dumps(bundle.start_doc))
    peer.send_json("descriptor", json.dumps(desc.descriptor_doc))
    peer.send_json("event", json.dumps(desc.compose_event(data={"x": 1.0}, timestamps={"x": 0.0})))
    stop = bundle.compose_stop()
    text = json.dumps({**stop, "num_events": {"primary": 0}}).replace('"primary": 0', '"primary": 1' + "0" * 3999)
    peer.send_json("stop", text)
    try:
        wait_for(lambda: peer.m("beamlens_bad_messages_total", source="tjson", reason="bad_num_events") == 1)
    except AssertionError:
        print("\n".join(peer.daemon.lines[-30:]), {k: v for k, v in peer.metrics().items() if "bad" in k[0] or "received" in k[0]})
        raise
    assert peer.m("beamlens_events_missing_total") == missing
    peer.check_healthy()


def test_absurd_seq_nums_never_reach_the_counters(peer):
    missing = peer.m("beamlens_events_missing_total")
    bad = peer.m("beamlens_bad_messages_total", source="test", reason="bad_seq_num")
    run = RunWriter(SPECTRA[:3], shape=(3, 1))
    run.head(peer.pub)
    for seq in (1, 2**64 - 1, 2):
        peer.pub.publish("event", run.desc.compose_event(data={"spectrum": SPECTRA[0]}, timestamps={"spectrum": 0.0},
                                                         seq_num=seq))
    run.stop(peer.pub)
    bad_json = peer.m("beamlens_bad_messages_total", source="tjson", reason="bad_seq_num")
    bundle = compose_run(metadata={"plan_name": "count"})
    desc = bundle.compose_descriptor(name="primary", data_keys={"x": {"source": "s", "dtype": "number", "shape": []}})
    peer.send_json("start", json.dumps(bundle.start_doc))
    peer.send_json("descriptor", json.dumps(desc.descriptor_doc))
    ev = desc.compose_event(data={"x": 1.0}, timestamps={"x": 0.0})
    peer.send_json("event", json.dumps(ev).replace('"seq_num": 1', '"seq_num": 1' + "0" * 300))
    peer.send_json("stop", json.dumps(bundle.compose_stop()))
    wait_for(lambda: (peer.m("beamlens_bad_messages_total", source="test", reason="bad_seq_num") == bad + 1
                      and peer.m("beamlens_bad_messages_total", source="tjson", reason="bad_seq_num") == bad_json + 1))
    wait_for(lambda: (peer.daemon.run(bundle.start_doc["uid"]) or {}).get("status") == "success")
    assert peer.m("beamlens_events_missing_total") - missing <= 1  # the 3-point run lost point 3, nothing absurd
    peer.check_healthy()


def test_runstart_shape_5000_by_5000_is_downgraded_and_released(peer):
    rss = rss_mib(peer.daemon.proc.pid)
    run = RunWriter(SPECTRA[:10], shape=(5000, 5000))
    run.head(peer.pub)
    run.events(peer.pub, range(10))
    run.stop(peer.pub)
    wait_for(lambda: (peer.daemon.run(run.uid) or {}).get("status") == "success")
    assert peer.daemon.run(run.uid)["limited"] == "rolling_window"
    assert rss_mib(peer.daemon.proc.pid) - rss < 200
    peer.check_healthy()


def test_large_v2_frames_are_not_stacked_beyond_the_batch_limit(peer):
    """40 small (compressed) v2 messages each declaring a 4096 x 4096 uint16 frame (32 MiB)."""
    from beamlens.daemon.sim.detectors import v2_array
    v2 = peer.dets["v2"]
    big = np.zeros((4096, 4096), dtype=np.uint16)
    processed = peer.m("beamlens_frames_processed_total", source="v2")
    v2.send_raw([v2_encode({"type": "start", "series_id": 11, "image_dtype": "uint16", "image_size_x": 4096,
                            "image_size_y": 4096, "number_of_images": 40, "channels": ["t1"]})])
    image = v2_array(big)
    for i in range(40):
        v2.send_raw([v2_encode({"type": "image", "series_id": 11, "image_id": i, "data": {"t1": image}})])
    v2.send_raw([v2_encode({"type": "end", "series_id": 11})])
    # 1.3 GB to decompress and analyse: minutes on a loaded machine, so wait while frames keep coming
    done = wait_for_count(lambda: peer.m("beamlens_frames_processed_total", source="v2"), processed + 40)
    assert done == processed + 40
    peer.check_healthy()


def test_series_start_flood_is_rate_limited(peer):
    refused = peer.m("beamlens_frame_decode_errors_total", source="v2", reason="series_start_rate")
    files = len(list((peer.tmp / "runs").glob("*.nxs")))
    v2 = peer.dets["v2"]
    n = 3000
    t0 = time.monotonic()
    for i in range(n):
        v2.send_raw([v2_encode({"type": "start", "series_id": 1000 + i, "image_dtype": "uint16", "image_size_x": 24,
                                "image_size_y": 16, "number_of_images": 1, "channels": ["t1"]})])
    wait_for(lambda: peer.m("beamlens_frame_decode_errors_total", source="v2", reason="series_start_rate") - refused
             >= n - 40 - 20 * (time.monotonic() - t0 + 1), timeout=60)
    t1 = time.monotonic()
    peer.check_healthy()
    assert time.monotonic() - t1 < 60
    accepted = n - (peer.m("beamlens_frame_decode_errors_total", source="v2", reason="series_start_rate") - refused)
    assert accepted <= 40 + 20 * (time.monotonic() - t0 + 1)
    assert len(list((peer.tmp / "runs").glob("*.nxs"))) - files <= accepted + 10


def test_never_stopped_runstarts_are_rate_limited_and_capped(peer):
    n = 1000
    starts = peer.m("beamlens_documents_received_total", source="test", type="start")
    for _ in range(n):
        peer.pub.publish("start", compose_run(metadata={"plan_name": "count"}).start_doc)
    wait_for(lambda: peer.m("beamlens_documents_received_total", source="test", type="start") == starts + n)
    wait_for(lambda: peer.m("beamlens_bad_messages_total", source="test", reason="run_start_rate") > 0, timeout=60)
    time.sleep(0.2)  # the flood is over: let the RunStart bucket (20/s) refill for the next good run
    t0 = time.monotonic()
    peer.check_healthy()
    assert time.monotonic() - t0 < 60
    assert peer.m("beamlens_runs_open") <= 16
    deadline = time.monotonic() + 1.2  # two checkpoint intervals: the bound holds at every look
    while time.monotonic() < deadline:
        assert len(list((peer.tmp / "state").glob("*.ckpt"))) <= 16
        time.sleep(0.05)


def test_replayed_uid_of_a_finished_run_does_not_overwrite_its_file(peer):
    run = RunWriter(SPECTRA)
    events = [run.desc.compose_event(data={"spectrum": SPECTRA[i]}, timestamps={"spectrum": 0.0}, seq_num=i + 1)
              for i in range(120)]
    stop = run.bundle.compose_stop()
    for replay in range(2):
        written = peer.m("beamlens_run_files_written_total")
        run.head(peer.pub)
        for ev in events:
            peer.pub.publish("event", ev)
        peer.pub.publish("stop", stop)
        wait_for(lambda: peer.m("beamlens_run_files_written_total") > written)
    name = f"beamlens_scan{run.bundle.start_doc.get('scan_id')}_{run.uid[:8]}" if "scan_id" in run.bundle.start_doc \
        else f"beamlens_{run.uid}"
    wait_for(lambda: len(list((peer.tmp / "runs").glob(name + "*.nxs"))) == 2)
    peer.check_healthy()


def test_descriptor_with_too_many_data_keys_is_rejected(peer):
    """Rejected at the source before schema validation (about 0.1 ms a key), so intake goes on."""
    bundle = compose_run(metadata={"plan_name": "count"})
    keys = {f"k{i}": {"source": "s", "dtype": "number", "shape": []} for i in range(100_000)}  # 3.7 MB, as seen
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    peer.pub.publish("start", bundle.start_doc)
    peer.pub.publish("descriptor", desc.descriptor_doc)
    peer.pub.publish("stop", bundle.compose_stop())
    wait_for(lambda: peer.m("beamlens_bad_messages_total", source="test", reason="too_many_data_keys") == 1)
    peer.check_healthy()


def test_one_wrong_length_event_costs_only_itself(peer):
    skipped = peer.m("beamlens_points_skipped_total", consumer="stats", reason="wrong_shape")
    run = RunWriter(SPECTRA[:100], shape=(10, 10))
    run.head(peer.pub)
    for i in range(100):
        row = SPECTRA[i] if i != 37 else SPECTRA[i][:10]
        peer.pub.publish("event", run.desc.compose_event(data={"spectrum": row}, timestamps={"spectrum": 0.0},
                                                         seq_num=i + 1))
    run.stop(peer.pub)
    wait_for(lambda: (peer.daemon.run(run.uid) or {}).get("status") == "success")
    assert peer.m("beamlens_points_skipped_total", consumer="stats", reason="wrong_shape") == skipped + 1
    status, body, _ = http_get(f"{peer.daemon.url}/api/runs/{run.uid}/stats/total.json")
    assert status == 200
    peer.check_healthy()


def test_open_ended_overload_stays_bounded(peer):
    """array-1.0 frames streamed as fast as the socket takes them, frame numbers climbing past the
    open-ended point limit: the map becomes a rolling window, memory stays flat."""
    det = peer.dets["a10"]
    rss = rss_mib(peer.daemon.proc.pid)
    frame = np.zeros((64, 64), dtype=np.uint16)
    base = 10**6
    for i in range(30_000):
        det.send_raw(a10_frame(base + i, frame, source="overload"))
    wait_for(lambda: peer.m("beamlens_limit_actions_total", limit="open_ended_max_points", action="rolling_window") >= 1,
             timeout=120)
    assert rss_mib(peer.daemon.proc.pid) - rss < 200
    peer.check_healthy()


def test_counters_add_up(peer):
    m = peer.metrics()

    def total(name, **labels):
        return sum(v for (n, ls), v in m.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))
    events_received = sum(total("beamlens_documents_received_total", source=s, type="event") for s in ("test", "tjson"))
    events_rejected = sum(total("beamlens_bad_messages_total", reason=r)
                          for r in ("bad_seq_num", "event_before_descriptor", "router_error"))
    assert events_received == total("beamlens_events_processed_total") + events_rejected
    for source in FORMATS:
        received = total("beamlens_frames_received_total", source=source)
        processed = total("beamlens_frames_processed_total", source=source)
        dropped = sum(v for (n, ls), v in m.items() if n == "beamlens_frames_dropped_total"
                      and dict(ls)["source"] == source and dict(ls)["reason"] != "gap")
        rejected = sum(total("beamlens_frame_decode_errors_total", source=source, reason=r)
                       for r in ("bad_frame_number", "frame_number_jump"))
        assert received == processed + dropped + rejected, (source, received, processed, dropped, rejected)
    assert total("beamlens_internal_errors_total") == 0
    assert rss_mib(peer.daemon.proc.pid) < BUDGET_MIB + RSS_MARGIN_MIB
    logging.getLogger(__name__).warning("RSS MiB at start %.1f, after each attack's check: %s", peer.rss0,
                                        json.dumps(peer.rss_log))
