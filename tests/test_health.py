"""Liveness: /health/live and the systemd watchdog follow the router's progress, so a hung consumer
is noticed (and the service restarted) while a merely idle daemon stays healthy."""
from __future__ import annotations

import time

from beamlens.daemon.documents import Document
from beamlens.daemon.supervision import TICK_S
from fault_consumers import Sleepy
from helpers import http_get, map_run_documents, wait_for

import numpy as np


def test_watchdog_and_liveness_follow_router_progress(notify_socket, make_daemon):
    messages = notify_socket
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
    wait_for(lambda: http_get(daemon.http.url + "/health/live")[0] == 200, timeout=10)  # came back
    recovered_at = time.monotonic()
    # the window comes from the consumer's own clock (when it hung and when it returned), not from
    # when this thread got round to looking, so a loaded machine cannot stretch it. The router is
    # stalled TICK_S + stall_timeout_s (0.3 s) after the consumer hung; a ping is stamped when it
    # is read, so 0.5 s more lets a ping sent just before that arrive late; the window ends 0.15 s
    # before the consumer returned (the margin this test always had at the recovery end)
    (hung, returned), = [span for span in Sleepy.spans if span[1] - span[0] >= 2.0]
    stalled_from, stalled_to = hung + TICK_S + 0.3 + 0.5, returned - 0.15
    assert stalled_to - stalled_from >= 0.5  # a window long enough for several 0.1 s pings
    pings_while_stalled = [t for t, m in messages if m == "WATCHDOG=1" and stalled_from < t < stalled_to]
    assert pings_while_stalled == []
    wait_for(lambda: sum(m == "WATCHDOG=1" for t, m in messages if t > recovered_at) >= 1)
