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


def wait_for_count(read: Callable[[], float], target: float, stall: float = 120.0, interval: float = 0.05) -> float:
    """Poll a counter ``read()`` until it reaches ``target``; fail the test only when it has not
    moved for ``stall`` s (a hung pipeline), however long the whole wait takes (a loaded machine).
    Returns the count reached, which the caller checks (it may overshoot ``target``)."""
    last, moved = read(), time.monotonic()
    while last < target:
        if time.monotonic() - moved > stall:
            raise AssertionError(f"count stuck at {last} (waiting for {target}) for {stall} s")
        time.sleep(interval)
        now = read()
        if now != last:
            last, moved = now, time.monotonic()
    return last


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

    ``ready(...)`` sends readiness probes on this same socket until the daemon has seen one, so
    nothing sent afterwards is lost to the slow-joiner window. ``publish(name, doc)`` sends a
    document framed exactly as bluesky's Publisher does (msgpack-numpy).
    """

    def __init__(self, address: str):
        import zmq
        self.socket = zmq.Context.instance().socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.connect(address)

    def ready(self, daemon: Daemon | None = None, timeout: float = 30.0,
              seen: Callable[[str], bool] | None = None) -> None:
        """Probe until ``daemon`` (in-process) or ``seen(nonce)`` reports a probe."""
        import uuid
        if seen is None:
            seen = lambda nonce: any(s.probe_seen(nonce) for s in daemon.sources)  # noqa: E731
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nonce = uuid.uuid4().hex
            self.socket.send(b"beamlens-probe beamlens_probe \xc1" + nonce.encode())
            try:
                wait_for(lambda: seen(nonce), timeout=0.1, interval=0.005)
                return
            except AssertionError:
                continue
        raise TimeoutError("raw publisher never got through")

    def send(self, message: bytes) -> None:
        self.socket.send(message)

    def publish(self, name: str, doc: dict) -> None:
        from beamlens.daemon.documents import msgpack_serializer
        self.socket.send(b" " + name.encode() + b" " + msgpack_serializer(doc))

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


class DaemonProcess:
    """``beamlens run --config FILE`` in a subprocess (for kill -9 / SIGTERM tests).

    The HTTP port is 0 in the config; the real one is read from the daemon's log line. Log lines
    are collected in :attr:`lines` by a reader thread.
    """

    URL_LINE = "serving the live page, maps and metrics on "

    def __init__(self, config_path, timeout: float = 60.0, preexec_fn=None):
        import subprocess
        import sys
        import threading

        self.lines: list[str] = []
        self.url: str | None = None
        self.proc = subprocess.Popen([sys.executable, "-m", "beamlens.daemon.cli", "run", "--config", str(config_path)],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, preexec_fn=preexec_fn)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: self.url is not None or self.proc.poll() is not None, timeout)
        if self.url is None:
            raise RuntimeError("daemon did not start:\n" + "\n".join(self.lines[-30:]))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            if self.URL_LINE in line:
                self.url = line.split(self.URL_LINE, 1)[1].split()[0]

    def metric(self, name: str, **labels: str) -> float:
        return scrape(self.url).get((name, tuple(sorted(labels.items()))), 0.0)

    def run(self, uid: str) -> dict | None:
        import json
        status, body, _ = http_get(f"{self.url}/api/runs/{uid}")
        return json.loads(body) if status == 200 else None

    def probe_seen(self, baseline: float) -> Callable[[str], bool]:
        return lambda nonce: self.metric("beamlens_probes_received_total", source="test") > baseline

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self._reader.join(10)
        self.proc.stderr.close()

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.terminate()
        code = self.proc.wait(timeout)
        self._reader.join(10)
        self.proc.stderr.close()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        elif not self.proc.stderr.closed:
            self._reader.join(10)
            self.proc.stderr.close()


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` (``VmRSS`` in ``/proc/<pid>/status``), MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def curve_keys(tmp_path):
    """CURVE certificates for a server, an allowed client and a stranger (``zmq.auth`` format),
    with the allowed client's public key alone in ``allowed_dir``."""
    import shutil
    from types import SimpleNamespace

    import zmq.auth

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys, "client")
    _, stranger_secret = zmq.auth.create_certificates(keys, "stranger")
    shutil.copy(client_public, allowed / "client.key")
    return SimpleNamespace(server_public=str(server_public), server_secret=str(server_secret),
                           client_secret=str(client_secret), stranger_secret=str(stranger_secret),
                           allowed_dir=str(allowed))
