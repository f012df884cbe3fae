"""The live page's server side over real HTTP: static files, /api/status, the float32 map endpoint,
and the server-sent event stream (only changed buffers are announced; connection cap; clean stop)."""
from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import pytest

from beamlens.daemon.sim.datasets import stxm_map

from helpers import http_get, source_yaml, subscribe, wait_run_finished

CONSUMERS = """
consumers:
  - {name: stats, class: stats}
  - {name: pca, class: pca, params: {n_components: 2, batch_size: 16}}
outputs:
  web: {push_interval_s: 0.1, max_clients: 2}
"""


class EventStream:
    """A minimal server-sent events reader (WHATWG HTML "Server-sent events" framing); a thread
    reads lines (http.client undoes the chunked transfer encoding) into a queue."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        self.conn.request("GET", "/api/stream", headers={"Accept": "text/event-stream"})
        self.response = self.conn.getresponse()
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        if self.response.status == 200:
            self.conn.sock.settimeout(None)
            self.reader.start()

    def _read(self) -> None:
        try:
            while line := self.response.readline():
                self.lines.put(line.decode().rstrip("\n"))
        except (OSError, ValueError, http.client.HTTPException):
            pass
        self.lines.put(None)

    def next_event(self, timeout: float) -> tuple[str, object] | None:
        """The next named event, or None if none arrives within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        name, data = None, []
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if line is None:
                return None
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and name is not None:
                return name, json.loads("\n".join(data))

    def events_until_quiet(self, quiet: float) -> list[tuple[str, object]]:
        out = []
        while (event := self.next_event(quiet)) is not None:
            out.append(event)
        return out

    def close(self) -> None:
        """Shut the socket down, let the reader see the end of the stream, then close."""
        if self.conn.sock is not None:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        if self.reader.is_alive():
            self.reader.join(5)
        self.conn.close()


def test_page_static_files_and_status(make_daemon):
    daemon = make_daemon(CONSUMERS)
    status, body, ctype = http_get(daemon.http.url + "/")
    assert status == 200 and ctype.startswith("text/html")
    page = body.decode()
    assert '<progress id="progress"' in page and 'label for="progress"' in page and 'lang="en"' in page
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        status, body, ctype = http_get(f"{daemon.http.url}/static/{name}")
        assert status == 200 and ctype.startswith(kind) and len(body) > 1000
    assert http_get(daemon.http.url + "/static/..%2Fhttp.py")[0] == 404
    assert http_get(daemon.http.url + "/static/missing.js")[0] == 404
    status, body, _ = http_get(daemon.http.url + "/api/status")
    health = json.loads(body)
    assert status == 200 and set(health) == {"sources", "queues", "drops", "errors", "runs"}
    assert {s["name"] for s in health["runs"]} >= {"beamlens_runs_open", "beamlens_events_processed_total"}


def test_float32_maps_equal_the_json(proxy, beamline, make_daemon):
    daemon = make_daemon(source_yaml(proxy.out_address) + CONSUMERS)
    subscribe(daemon, proxy)
    data = stxm_map().region(slice(60, 66), slice(40, 45))
    uid = beamline.map_scan(data)
    wait_run_finished(daemon, uid)
    status, raw, ctype = http_get(f"{daemon.http.url}/api/runs/{uid}/stats/total.f32")
    assert status == 200 and ctype == "application/octet-stream"
    with urlopen_headers(f"{daemon.http.url}/api/runs/{uid}/stats/total.f32") as shape:
        assert shape == "6,5"
    got = np.frombuffer(raw, dtype="<f4").reshape(6, 5)
    np.testing.assert_allclose(got, data.spectra.astype(np.float64).sum(axis=-1), rtol=1e-6)


class urlopen_headers:
    """Context manager returning the X-Shape header of a GET."""

    def __init__(self, url: str):
        import urllib.request
        self.r = urllib.request.urlopen(url, timeout=10)

    def __enter__(self) -> str:
        return self.r.headers["X-Shape"]

    def __exit__(self, *exc: object) -> None:
        self.r.close()


def test_stream_announces_only_changed_buffers(proxy, beamline, make_daemon):
    daemon = make_daemon(source_yaml(proxy.out_address) + CONSUMERS)
    subscribe(daemon, proxy)
    first = beamline.map_scan(stxm_map().region(slice(60, 64), slice(40, 44)))
    wait_run_finished(daemon, first)

    stream = EventStream(daemon.http.url)
    try:
        assert stream.response.status == 200
        assert stream.response.headers["Content-Type"] == "text/event-stream"
        events = stream.events_until_quiet(1.0)
        names = [n for n, _ in events]
        assert "runs" in names and "status" in names
        changed = [c for n, d in events if n == "changed" for c in d]
        expected = {(first, "stats", b) for b in ("total", "max", "mean")}
        expected |= {(first, "pca", b) for b in ("score_1", "score_2", "components", "mean", "explained_variance_ratio")}
        assert {(c["run"], c["consumer"], c["buffer"]) for c in changed} == expected
        # nothing changes while idle: no further "changed" (status may not change either)
        assert not [n for n, _ in stream.events_until_quiet(0.6) if n == "changed"]

        second = beamline.map_scan(stxm_map().region(slice(70, 73), slice(40, 43)))
        wait_run_finished(daemon, second)
        events = stream.events_until_quiet(1.0)
        changed = [c for n, d in events if n == "changed" for c in d]
        assert changed and {c["run"] for c in changed} == {second}
        runs = [d for n, d in events if n == "runs"][-1]
        assert [r["uid"] for r in runs] == [second, first] and runs[0]["progress"] == 1.0
    finally:
        stream.close()


def test_stream_connection_cap_and_clean_stop(make_daemon):
    daemon = make_daemon(CONSUMERS)
    streams = [EventStream(daemon.http.url) for _ in range(2)]
    try:
        assert all(s.response.status == 200 for s in streams)
        assert streams[0].next_event(2.0)[0] in ("runs", "status")
        status, _, _ = http_get(daemon.http.url + "/api/stream")
        assert status == 503
        t0 = time.monotonic()
        daemon.stop()
        assert time.monotonic() - t0 < 5.0, "open event streams must not hold up shutdown"
    finally:
        for s in streams:
            s.close()


def test_run_summaries_carry_motor_axes_also_for_relative_plans(proxy, beamline, make_daemon):
    """grid_scan: axes from the plan pattern (with bluesky's snake flags); rel_grid_scan, whose
    RunStart holds offsets only: from the motors' readings."""
    from bluesky import plans as bp

    daemon = make_daemon(source_yaml(proxy.out_address) + CONSUMERS)
    subscribe(daemon, proxy)
    data = stxm_map().region(slice(60, 64), slice(40, 45))
    absolute = beamline.map_scan(data)
    det = beamline.detector(data)
    beamline.sample_y.set(float(data.y[1])).wait(5)
    beamline.sample_x.set(float(data.x[2])).wait(5)
    (relative,) = beamline.RE(bp.rel_grid_scan([det], beamline.sample_y, -0.05, 0.05, 3,
                                                beamline.sample_x, -0.1, 0.1, 5, snake_axes=True))
    wait_run_finished(daemon, relative)
    runs = {r["uid"]: r for r in json.loads(http_get(daemon.http.url + "/api/runs")[1])}
    for uid, y, x in ((absolute, data.y, data.x),
                      (relative, data.y[1] + np.linspace(-0.05, 0.05, 3), data.x[2] + np.linspace(-0.1, 0.1, 5))):
        axes = {a["dim"]: a for a in runs[uid]["axes"]}
        assert (axes[0]["name"], axes[1]["name"]) == ("sample_y", "sample_x") and axes[0]["motor"]
        np.testing.assert_allclose(axes[0]["values"], y, atol=1e-9)
        np.testing.assert_allclose(axes[1]["values"], x, atol=1e-9)
        assert (axes[0]["start"], axes[1]["stop"]) == (pytest.approx(y[0]), pytest.approx(x[-1]))
    status, body, _ = http_get(f"{daemon.http.url}/api/runs/{relative}")
    assert status == 200 and json.loads(body)["axes"] == runs[relative]["axes"]


def test_png_maps_are_drawn_y_up_as_livegrid():
    """Row 0 of a scan whose slow motor rises is drawn at the bottom, as LiveGrid draws it; labels
    are the motors'."""
    import io

    from matplotlib.image import imread

    from beamlens.consumers.base import BufferSpec
    from beamlens.daemon.results import BufferSnapshot
    from beamlens.daemon.sinks.render import render_png

    data = np.zeros((4, 5))
    data[0] = 1.0  # the first row of the scan is bright
    snap = BufferSnapshot("uid", "stats", BufferSpec("total", "nav"), data)
    axes = [{"name": "sample_y", "units": "mm", "dim": 0, "motor": True, "num": 4, "start": 1.0, "stop": 2.5},
            {"name": "sample_x", "units": "mm", "dim": 1, "motor": True, "num": 5, "start": 0.0, "stop": 4.0}]
    for a in (axes, None):
        rgb = imread(io.BytesIO(render_png(snap, axes=a)))[:, : int(0.6 * 400), :3]
        yellow = np.argwhere((rgb[..., 0] > 0.9) & (rgb[..., 1] > 0.8) & (rgb[..., 2] < 0.3))[:, 0]
        purple = np.argwhere((rgb[..., 0] < 0.35) & (rgb[..., 1] < 0.1) & (rgb[..., 2] > 0.25))[:, 0]
        assert len(yellow) and len(purple) and yellow.mean() > purple.mean(), "row 0 is not at the bottom"
