"""Liveness: /health/live and the systemd watchdog follow the router's progress, so a hung consumer
is noticed (and the service restarted) while a merely idle daemon stays healthy."""
from __future__ import annotations

import socket
import threading
import time

from beamlens.daemon.documents import Document
from helpers import http_get, map_run_documents, wait_for

import numpy as np


def test_watchdog_and_liveness_follow_router_progress(tmp_path, monkeypatch, make_daemon):
    sock_path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    messages: list[tuple[float, str]] = []
    done = threading.Event()

    def collect():
        while not done.is_set():
            try:
                messages.append((time.monotonic(), listener.recv(256).decode()))
            except TimeoutError:
                continue
    reader = threading.Thread(target=collect)
    reader.start()
    try:
        daemon = make_daemon("""
router: {stall_timeout_s: 0.3, shed_slow_consumers: false, max_page_size: 1}
consumers:
  - {name: sleepy, class: "fault_consumers:Sleepy", params: {seconds_per_page: 2.5}}
""")
        wait_for(lambda: any(m == "READY=1" for _, m in messages))
        wait_for(lambda: sum(m == "WATCHDOG=1" for _, m in messages) >= 3)  # idle is healthy
        assert http_get(daemon.http.url + "/health/live")[0] == 200

        docs = map_run_documents(np.ones((1, 4)))
        for name, doc in docs:
            daemon.router.submit(Document(name, doc, "test", time.time()))
        wait_for(lambda: http_get(daemon.http.url + "/health/live")[0] == 503, timeout=10)  # hung in the consumer
        stalled_at = time.monotonic()
        wait_for(lambda: http_get(daemon.http.url + "/health/live")[0] == 200, timeout=10)  # came back
        recovered_at = time.monotonic()
        pings_while_stalled = [t for t, m in messages if m == "WATCHDOG=1" and stalled_at + 0.15 < t < recovered_at - 0.15]
        assert pings_while_stalled == []
        wait_for(lambda: sum(m == "WATCHDOG=1" for t, m in messages if t > recovered_at) >= 1)
    finally:
        done.set()
        reader.join()
        listener.close()
