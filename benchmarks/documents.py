"""Bluesky document ingest: the daemon against the raw 0MQ transport, side by side in one run.

Publishes the real STXM spectra (123 channels, msgpack-numpy) as Event documents through a real
bluesky 0MQ Proxy, once to a bare SUB socket that only receives (the transport limit) and once to
the daemon running the ``stats`` and ``pca`` consumers, and reports events/s of each and their ratio
(median of ``--rounds`` interleaved rounds). Prints one JSON object per figure.

    python benchmarks/documents.py [--events 20000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import numpy as np
import zmq
from bluesky.callbacks.zmq import Publisher
from event_model import compose_run

from beamlens.daemon.app import Daemon
from beamlens.daemon.config import load_config
from beamlens.daemon.sim.beamline import msgpack_serializer, wait_until_subscribed
from beamlens.daemon.sim.datasets import stxm_map
from beamlens.daemon.sim.proxy import ProxyProcess

CONFIG = """
http: {{port: 0}}
sources:
  bluesky:
    - {{name: bench, address: "{address}"}}
consumers:
  - {{name: stats, class: stats}}
  - {{name: pca, class: pca, params: {{n_components: 3, batch_size: 64}}}}
"""


def make_documents(n: int) -> list[tuple[str, dict]]:
    stxm = stxm_map()
    spectra = stxm.spectra.reshape(-1, stxm.spectra.shape[-1]).astype(np.float64)
    side = int(np.sqrt(n))
    bundle = compose_run(metadata={"plan_name": "grid_scan", "shape": [side, n // side], "snaking": [False, True]})
    desc = bundle.compose_descriptor(name="primary", data_keys={"xas_spectrum": {"source": "sim", "dtype": "array", "shape": [spectra.shape[1]]}})
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    now = time.time()
    for i in range(side * (n // side)):
        docs.append(("event", desc.compose_event(data={"xas_spectrum": spectra[i % len(spectra)]}, timestamps={"xas_spectrum": now})))
    docs.append(("stop", bundle.compose_stop()))
    return docs


def publish(pub: Publisher, docs: list[tuple[str, dict]]) -> None:
    for name, doc in docs:
        pub(name, doc)


def raw_rate(proxy: ProxyProcess, docs: list[tuple[str, dict]]) -> float:
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(proxy.out_address)
    pub = Publisher(proxy.in_address, serializer=msgpack_serializer)
    wait_until_subscribed(proxy.in_address, lambda nonce: _drain_probe(sock, nonce))
    n_events = sum(1 for name, _ in docs if name == "event")
    sender = threading.Thread(target=publish, args=(pub, docs))
    sender.start()
    got, t0 = 0, None
    while got < n_events:
        msg = sock.recv()
        if msg.startswith(b" event "):
            t0 = t0 or time.perf_counter()
            got += 1
    dt = time.perf_counter() - t0
    sender.join()
    pub.close()
    sock.close(0)
    return (n_events - 1) / dt


def _drain_probe(sock: zmq.Socket, nonce: str) -> bool:
    while sock.poll(0):
        if nonce.encode() in sock.recv():
            return True
    return False


def daemon_rate(proxy: ProxyProcess, docs: list[tuple[str, dict]]) -> float:
    daemon = Daemon(load_config(text=CONFIG.format(address=proxy.out_address), environ={}))
    daemon.start()
    pub = Publisher(proxy.in_address, serializer=msgpack_serializer)
    try:
        wait_until_subscribed(proxy.in_address, lambda n: daemon.sources[0].probe_seen(n))
        n_events = sum(1 for name, _ in docs if name == "event")
        t0 = time.perf_counter()
        publish(pub, docs)
        deadline = time.monotonic() + 300
        while daemon.metrics.events_processed._value.get() < n_events:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {daemon.metrics.events_processed._value.get()} of {n_events} events processed")
            time.sleep(0.001)
        return n_events / (time.perf_counter() - t0)
    finally:
        pub.close()
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    docs = make_documents(args.events)
    raw, daemon = [], []
    with ProxyProcess() as proxy:
        for _ in range(args.rounds):
            raw.append(raw_rate(proxy, docs))
            daemon.append(daemon_rate(proxy, docs))
    r, d = statistics.median(raw), statistics.median(daemon)
    for figure, value, unit, target in [
        ("raw_transport_events_per_s", r, "events/s", None),
        ("daemon_events_per_s", d, "events/s", None),
        ("daemon_over_raw_ratio", d / r, "ratio", None),
    ]:
        print(json.dumps({"benchmark": "documents", "figure": figure, "value": round(value, 4), "unit": unit, "target": target}))


if __name__ == "__main__":
    main()
