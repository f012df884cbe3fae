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


class RawPublisher:
    """A plain PUB socket into a proxy's in address, for sending arbitrary (hostile) bytes.

    ``ready(daemon)`` sends readiness probes on this same socket until the daemon has seen one, so
    nothing sent afterwards is lost to the slow-joiner window.
    """

    def __init__(self, address: str):
        import zmq
        self.socket = zmq.Context.instance().socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.connect(address)

    def ready(self, daemon: Daemon, timeout: float = 30.0) -> None:
        import uuid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nonce = uuid.uuid4().hex
            self.socket.send(b"beamlens-probe beamlens_probe \xc1" + nonce.encode())
            try:
                wait_for(lambda: any(s.probe_seen(nonce) for s in daemon.sources), timeout=0.05, interval=0.005)
                return
            except AssertionError:
                continue
        raise TimeoutError("raw publisher never got through")

    def send(self, message: bytes) -> None:
        self.socket.send(message)

    def close(self) -> None:
        self.socket.close()


def route_in_process(config_text: str, documents: list[tuple[str, dict]]):
    """Run documents through a real Router (no sockets); returns (router, store, metrics)."""
    from beamlens.daemon.config import load_config
    from beamlens.daemon.documents import Document
    from beamlens.daemon.metrics import Metrics
    from beamlens.daemon.results import RunStore
    from beamlens.daemon.router import Router

    config = load_config(text=config_text, environ={})
    metrics, store = Metrics(), RunStore(config.router.keep_runs)
    router = Router(config, metrics, store)
    router.start()
    for name, doc in documents:
        router.submit(Document(name, doc, "test", time.time()))
    assert router.wait_idle(60)
    router.stop()
    return router, store, metrics


def map_run_documents(spectra, *, shape=None, snaking=None, energy=None, page=None):
    """Bluesky documents of a map run made with event_model.compose_run.

    ``spectra`` is ``(n_points, n_channels)`` in acquisition order; events carry ``xas_spectrum``.
    ``page``: None for single events, or the EventPage size.
    """
    import numpy as np
    from event_model import compose_run

    n, c = spectra.shape
    md = {"plan_name": "grid_scan", "num_points": n}
    if shape is not None:
        md["shape"] = list(shape)
        md["snaking"] = list(snaking or [False] * len(shape))
    bundle = compose_run(metadata=md)
    config = {"xas": {"data": {"xas_energy": np.arange(c, dtype=float) if energy is None else energy},
                      "timestamps": {"xas_energy": 0.0}, "data_keys": {"xas_energy": {"source": "sim", "dtype": "array", "shape": [c]}}}}
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={"xas_spectrum": {"source": "sim", "dtype": "array", "shape": [c]}},
        configuration=config, object_keys={"xas": ["xas_spectrum"]})
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    now = time.time()
    if page is None:
        for row in spectra:
            docs.append(("event", desc.compose_event(data={"xas_spectrum": row}, timestamps={"xas_spectrum": now})))
    else:
        for i in range(0, n, page):
            rows = list(spectra[i:i + page])
            docs.append(("event_page", desc.compose_event_page(
                data={"xas_spectrum": rows}, timestamps={"xas_spectrum": [now] * len(rows)},
                seq_num=list(range(i + 1, i + 1 + len(rows))), time=[now] * len(rows), uid=None)))
    docs.append(("stop", bundle.compose_stop()))
    return docs


def wait_run_finished(daemon: Daemon, uid: str, timeout: float = 60.0) -> None:
    """Wait until the daemon has processed the RunStop of run ``uid``. (``router.wait_idle`` alone
    can return while the last documents are still in flight between the proxy and the daemon.)"""
    assert daemon.store.wait_finished(uid, timeout), f"run {uid} not finished within {timeout} s"
