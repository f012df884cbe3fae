"""The HTTP server attacked as a peer on the network would (issue 10, items 5 and 6): half-open and
slow-loris connection floods against a daemon started as a user would, under the default soft fd
limit of 1024; live-page clients that never read; foreign Host names (DNS rebinding); RunStart
metadata that JSON cannot carry. What held before must keep holding: traversal, huge URLs and
headers, non-GET methods, hundreds of live-page clients.

Real sockets on 127.0.0.1 only (raw ``socket`` for the attackers, ``aiohttp``/``http.client`` for
the good clients); every wait is on a condition with a timeout.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import resource
import socket
import time
from urllib.parse import urlsplit

import aiohttp
import msgpack
import numpy as np
import pytest
from event_model import compose_run

from helpers import DaemonProcess, RawPublisher, http_get, scrape, source_yaml, wait_for

STREAM_REQUEST = b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"


def _strict_json(body: bytes):
    """json.loads that refuses NaN/Infinity, as browsers' JSON.parse does."""
    def refuse(name: str):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(body, parse_constant=refuse)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _connect(port: int, payload: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if payload:
        s.sendall(payload)
    return s


@pytest.fixture
def daemon_process(tmp_path):
    """``beamlens run --config`` in a subprocess under the default soft limit of 1024 open files."""
    config = tmp_path / "beamline.yaml"
    config.write_text("http:\n  port: 0\n  max_connections: 200\n  header_timeout_s: 1.0\n  keepalive_timeout_s: 3.0\n"
                      "consumers:\n  - {name: stats, class: stats}\n")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    proc = DaemonProcess(config, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)))
    yield proc
    proc.close()


def test_thousand_half_open_connections_leave_health_and_metrics_reachable(daemon_process):
    d = daemon_process
    port = urlsplit(d.url).port
    assert http_get(d.url + "/health")[0] == 200
    baseline = _open_fds(d.proc.pid)
    attackers: list[socket.socket] = []
    try:
        for i in range(1000):
            # two thirds say nothing, one third start a request and never finish it (slow loris)
            attackers.append(_connect(port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " if i % 3 == 0 else b""))
        for _ in range(5):
            status, body, _ = http_get(d.url + "/health", timeout=5)
            assert status == 200 and json.loads(body)["live"] is True
            status, body, _ = http_get(d.url + "/metrics", timeout=5)
            assert status == 200 and b"beamlens_http_connections_closed_total" in body
            assert _open_fds(d.proc.pid) <= baseline + 200 + 16, "HTTP connections are not bounded"
        # the slow-loris requests are cut at the header timeout, the silent ones at the keep-alive one
        wait_for(lambda: d.metric("beamlens_http_connections_closed_total", reason="header_timeout") > 0, timeout=15)
        assert d.metric("beamlens_http_connections_closed_total", reason="shed") >= 700
        wait_for(lambda: _open_fds(d.proc.pid) <= baseline + 16, timeout=20)
    finally:
        for s in attackers:
            s.close()
    assert http_get(d.url + "/health")[0] == 200
    # 300 malformed requests: aiohttp logs each with a traceback; the log is rate-limited
    for _ in range(300):
        with _connect(port, b"GET /health HTTP/1.1\r\nX-No-Host: 1\r\n\r\n") as s:  # 400: no Host
            s.recv(1024)
    assert http_get(d.url + "/health")[0] == 200
    tracebacks = sum("Traceback" in line for line in d.lines)
    assert 1 <= tracebacks <= 12, f"{tracebacks} tracebacks logged"
    assert d.proc.poll() is None


async def _read_events(url: str, wanted: int, timeout: float) -> list[str]:
    """A real aiohttp client reading ``wanted`` named events from the live-page stream."""
    names: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.get(url + "/api/stream") as r:
            assert r.status == 200, r.status
            async for line in r.content:
                if line.startswith(b"event: "):
                    names.append(line[7:].decode().strip())
                    if len(names) >= wanted:
                        break
    return names


def test_never_reading_stream_clients_do_not_hold_the_slots(make_daemon):
    daemon = make_daemon("outputs:\n  web: {push_interval_s: 0.1}\n")  # 32 live-page slots
    port = daemon.http.port
    readers = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(2)]
    stalled: list[socket.socket] = []
    try:
        for conn in readers:
            conn.request("GET", "/api/stream")
            assert conn.getresponse().status == 200
        # keep reading in the background, as a browser does
        import threading
        for conn in readers:
            threading.Thread(target=lambda c=conn: _drain(c), daemon=True).start()
        for _ in range(30):
            stalled.append(_connect(port, STREAM_REQUEST))
        wait_for(lambda: len(daemon.http._streams) == 32, timeout=10)
        names = asyncio.run(_read_events(daemon.http.url, 2, timeout=20))
        assert {"runs", "status"} <= set(names)
        m = scrape(daemon.http.url)
        assert m[("beamlens_http_connections_closed_total", (("reason", "stream_stalled"),))] == 30
        assert all(not s.evicted for s in daemon.http._streams.values()) and len(daemon.http._streams) >= 2
        # both readers are still served
        status, _, _ = http_get(daemon.http.url + "/health")
        assert status == 200
    finally:
        for s in stalled:
            s.close()
        for conn in readers:
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()


def _drain(conn: http.client.HTTPConnection) -> None:
    try:
        while conn.sock is not None and conn.sock.recv(65536):
            pass
    except OSError:
        pass


def test_every_slot_held_by_readers_refuses_the_newcomer(make_daemon):
    daemon = make_daemon("outputs:\n  web: {push_interval_s: 0.1, max_clients: 3}\n")
    conns = [http.client.HTTPConnection("127.0.0.1", daemon.http.port, timeout=10) for _ in range(3)]
    import threading
    try:
        for conn in conns:
            conn.request("GET", "/api/stream")
            assert conn.getresponse().status == 200
            threading.Thread(target=lambda c=conn: _drain(c), daemon=True).start()
        assert http_get(daemon.http.url + "/api/stream")[0] == 503
        assert len(daemon.http._streams) == 3
        m = scrape(daemon.http.url)
        assert m[("beamlens_http_requests_refused_total", (("reason", "streams_full"),))] == 1
        assert m[("beamlens_http_connections_closed_total", (("reason", "stream_stalled"),))] == 0
    finally:
        for conn in conns:
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()


def _get(port: int, path: str, host: str | None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, dict(r.headers), r.read()
    finally:
        conn.close()


def test_host_allow_list_and_security_headers(make_daemon):
    daemon = make_daemon("http:\n  allowed_hosts: [beamline-pc.example.org]\n")
    port = daemon.http.port
    for host in ("evil.example", "127.0.0.1.nip.io", f"attacker.example:{port}"):
        status, _, _ = _get(port, "/api/runs", host)
        assert status == 421, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST.", f"[::1]:{port}", "10.1.2.3",
                 "beamline-pc.example.org"):
        status, _, _ = _get(port, "/api/runs", host)
        assert status == 200, host
    m = scrape(daemon.http.url)
    assert m[("beamlens_http_requests_refused_total", (("reason", "host"),))] == 3
    for path in ("/", "/api/runs", "/no/such/path", "/static/app.js"):
        status, headers, _ = _get(port, path, "localhost")
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff"


def test_what_held_keeps_holding(make_daemon):
    """Traversal, huge URLs and headers, every non-GET method, 500 live-page clients."""
    daemon = make_daemon("outputs:\n  web: {max_clients: 500}\nhttp:\n  max_connections: 1000\n")
    port = daemon.http.port
    for path in ("/static/..%2Fhttp.py", "/static/../http.py", "/static/%2e%2e/http.py", "/static/..%5chttp.py",
                 "/static/.%2e/.%2e/config.py", "/static//etc/passwd", "/static/%00", "/..%2f..%2fetc/passwd",
                 "/static/app.js%00.html", "/static/....//http.py"):
        status, _, body = _get(port, path, "localhost")
        assert status in (400, 404), (path, status)
        assert b"import" not in body
    status, _, _ = _get(port, "/api/runs?" + "x" * 100_000, "localhost")
    assert status in (400, 414, 431)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("GET", "/health")
    conn.putheader("X-Big", "y" * 100_000)
    conn.endheaders()
    assert conn.getresponse().status in (400, 431)
    conn.close()
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND"):
        status, _, _ = _get(port, "/api/runs", "localhost", method)
        assert status in (400, 404, 405), (method, status)  # CONNECT takes an authority, not a path

    async def many_clients(n: int) -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60),
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            responses = await asyncio.gather(*(session.get(daemon.http.url + "/api/stream") for _ in range(n)))
            ok = sum(r.status == 200 for r in responses)
            for r in responses:
                r.close()
            return ok

    assert asyncio.run(many_clients(500)) == 500
    wait_for(lambda: not daemon.http._streams, timeout=30)
    assert http_get(daemon.http.url + "/health")[0] == 200


def test_runstart_metadata_json_cannot_carry(proxy, make_daemon):
    """plan_name as a msgpack ExtType or numpy int64, NaN and huge ints in a RunStart: /api/runs,
    /api/runs/latest and /api/stream keep answering strict JSON."""
    daemon = make_daemon(source_yaml(proxy.out_address, validate_documents="false")
                         + "consumers:\n  - {name: stats, class: stats}\noutputs:\n  web: {push_interval_s: 0.1}\n")
    raw = RawPublisher(proxy.in_address)
    try:
        raw.ready(daemon)
        hostile = [
            {"plan_name": msgpack.ExtType(42, b"\x00\x01"), "scan_id": np.int64(7)},
            {"plan_name": np.int64(3), "scan_id": float("nan")},
            {"plan_name": float("inf"), "scan_id": 2**64 - 1},
        ]
        uids = []
        for md in hostile:
            bundle = compose_run()
            start = {**bundle.start_doc, **md}
            uids.append(start["uid"])
            import msgpack_numpy
            raw.send(b" start " + msgpack.packb(start, default=msgpack_numpy.encode))
            raw.send(b" stop " + msgpack.packb(bundle.compose_stop(), default=msgpack_numpy.encode))
        wait_for(lambda: all(daemon.store.get(u) is not None and daemon.store.get(u).status != "open" for u in uids), timeout=30)
        status, body, _ = http_get(daemon.http.url + "/api/runs")
        assert status == 200
        runs = {r["uid"]: r for r in _strict_json(body)}
        assert set(uids) <= set(runs)
        assert runs[uids[0]]["scan_id"] == 7 and "ExtType" in runs[uids[0]]["plan_name"]
        assert runs[uids[1]]["plan_name"] == 3 and runs[uids[1]]["scan_id"] is None
        assert runs[uids[2]]["plan_name"] is None and isinstance(runs[uids[2]]["scan_id"], str)
        status, body, _ = http_get(daemon.http.url + "/api/runs/latest")
        assert status == 200 and _strict_json(body)["uid"] == uids[-1]

        async def runs_event_with_them() -> list:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
                async with session.get(daemon.http.url + "/api/stream") as r:
                    event = None
                    async for line in r.content:
                        if line.startswith(b"event: "):
                            event = line[7:].strip()
                        elif line.startswith(b"data: ") and event == b"runs":
                            runs = _strict_json(line[6:])  # every event is strict JSON
                            if set(uids) <= {r["uid"] for r in runs}:  # (the feed catches up within a push)
                                return runs
            return []

        streamed = asyncio.run(runs_event_with_them())
        assert set(uids) <= {r["uid"] for r in streamed}
        assert not any(isinstance(r.get("scan_id"), float) and not math.isfinite(r["scan_id"]) for r in streamed)
    finally:
        raw.close()
