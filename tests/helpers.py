"""Helpers for tests: config snippets, readiness, polling with timeouts, HTTP and /metrics scraping."""
from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from beamlens.daemon.app import Daemon
from beamlens.daemon.sim.beamline import wait_until_subscribed
from beamlens.daemon.sim.proxy import ProxyProcess


def source_yaml(address: str, **extra: object) -> str:
    lines = [f"      {k}: {v}" for k, v in extra.items()]
    return "sources:\n  bluesky:\n    - name: test\n      address: " + address + "\n" + "\n".join(lines) + "\n"


def subscribe(daemon: Daemon, proxy: ProxyProcess) -> None:
    """Return once documents published to the proxy reach the daemon (no slow-joiner loss)."""
    wait_until_subscribed(proxy.in_address, lambda n: any(s.probe_seen(n) for s in daemon.sources), timeout=30)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape /metrics over HTTP and parse it: {(sample name, sorted labels): value}."""
    status, body, _ = http_get(url + "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_run_finished(daemon: Daemon, uid: str, timeout: float = 60.0) -> None:
    """Wait until the daemon has processed the RunStop of run ``uid``. (``router.wait_idle`` alone
    can return while the last documents are still in flight between the proxy and the daemon.)"""
    def finished() -> bool:
        run = daemon.store.get(uid)
        return run is not None and run.status != "open"
    wait_for(finished, timeout)
