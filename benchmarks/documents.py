"""Bluesky document ingest: the daemon against the raw 0MQ transport, side by side in one run.

Publishes the real STXM spectra (123 channels, msgpack-numpy) as Event documents through a real
bluesky 0MQ Proxy as fast as a Publisher can, once to a bare SUB socket that only receives (the
transport limit), once to bluesky's own ``RemoteDispatcher`` with a no-op callback subscribed (the
peer: what a bluesky callback process gets), and once to the daemon running the ``stats`` and
``pca`` consumers, and reports events/s of each and the daemon's ratios to both (median of
``--rounds`` interleaved rounds), the daemon with no consumers at all (intake alone), and the
events lost on the way (the proxy's PUB drops at its high-water mark when a subscriber lags; the daemon counts
those as missing from the RunStop). Prints one JSON object per figure.

    python benchmarks/documents.py [--events 20000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

import numpy as np
import zmq
from bluesky.callbacks.zmq import Publisher, RemoteDispatcher
from event_model import compose_run

from beamlens.daemon.app import Daemon
from beamlens.daemon.config import load_config
from beamlens.daemon.documents import make_deserializer
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


def raw_rate(proxy: ProxyProcess, docs: list[tuple[str, dict]]) -> tuple[float, int]:
    """(events/s received by a bare SUB socket, events lost on the way)."""
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(proxy.out_address)
    pub = Publisher(proxy.in_address, serializer=msgpack_serializer)
    wait_until_subscribed(proxy.in_address, lambda nonce: _drain_probe(sock, nonce))
    n_events = sum(1 for name, _ in docs if name == "event")
    sender = threading.Thread(target=publish, args=(pub, docs))
    sender.start()
    got, t0, t_last = 0, None, None
    while sock.poll(10_000):  # until the RunStop, or 10 s of silence (it was lost)
        msg = sock.recv()
        if msg.startswith(b" event "):
            t_last = time.perf_counter()
            t0 = t0 or t_last
            got += 1
        elif msg.startswith(b" stop "):
            break
    sender.join()
    pub.close()
    sock.close(0)
    return (got - 1) / (t_last - t0), n_events - got


def _drain_probe(sock: zmq.Socket, nonce: str) -> bool:
    while sock.poll(0):
        if nonce.encode() in sock.recv():
            return True
    return False


INTAKE_ONLY = """
http: {{port: 0}}
sources:
  bluesky:
    - {{name: bench, address: "{address}"}}
consumers: []
"""


def daemon_rate(proxy: ProxyProcess, docs: list[tuple[str, dict]], config: str = CONFIG) -> tuple[float, int]:
    """(events/s analysed by the daemon, events it counted as missing when the run stopped)."""
    daemon = Daemon(load_config(text=config.format(address=proxy.out_address), environ={}))
    daemon.start()
    pub = Publisher(proxy.in_address, serializer=msgpack_serializer)
    try:
        wait_until_subscribed(proxy.in_address, lambda n: daemon.sources[0].probe_seen(n))
        t0 = time.perf_counter()
        publish(pub, docs)
        if not daemon.store.wait_finished(docs[0][1]["uid"], 300):
            raise RuntimeError("the run's stop never reached the daemon")
        dt = time.perf_counter() - t0
        value = daemon.metrics.registry.get_sample_value
        return value("beamlens_events_processed_total") / dt, int(value("beamlens_events_missing_total") or 0)
    finally:
        pub.close()
        daemon.stop()


def dispatcher_rate(proxy: ProxyProcess, docs: list[tuple[str, dict]]) -> float:
    """Events/s through a bluesky ``RemoteDispatcher`` (msgpack, no-op callback), timed like the
    daemon: from the first document published to the RunStop dispatched."""
    prefix = b"peer"
    dispatcher = RemoteDispatcher(proxy.out_address, prefix=prefix, deserializer=make_deserializer("msgpack"))
    warm_uid = "warm-up-" + docs[0][1]["uid"]
    seen, done = threading.Event(), threading.Event()
    counts = {"event": 0}

    def callback(name: str, doc: dict) -> None:
        if name == "event":
            counts["event"] += 1
        elif name == "start" and doc["uid"] == warm_uid:
            seen.set()
        elif name == "stop":
            done.set()
            dispatcher._task.cancel()  # ends start(), which then closes the socket and the loop

    dispatcher.subscribe(callback)

    def serve() -> None:
        try:
            dispatcher.start()
        except asyncio.CancelledError:  # our cancel at the RunStop
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    pub = Publisher(proxy.in_address, prefix=prefix, serializer=msgpack_serializer)
    try:
        deadline = time.monotonic() + 30
        while not seen.wait(0.05):  # PUB/SUB slow joiner: repeat a throw-away RunStart until it lands
            if time.monotonic() > deadline:
                raise RuntimeError("the RemoteDispatcher never received the warm-up document")
            pub("start", {"uid": warm_uid, "time": time.time()})
        t0 = time.perf_counter()
        publish(pub, docs)
        if not done.wait(300):
            raise RuntimeError("the run's stop never reached the RemoteDispatcher")
        dt = time.perf_counter() - t0
    finally:
        pub.close()
        thread.join(10)
    return counts["event"] / dt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    docs = make_documents(args.events)
    raw, daemon, peer, intake = [], [], [], []
    with ProxyProcess() as proxy:
        for _ in range(args.rounds):
            raw.append(raw_rate(proxy, docs))
            daemon.append(daemon_rate(proxy, docs))
            peer.append(dispatcher_rate(proxy, docs))
            intake.append(daemon_rate(proxy, docs, INTAKE_ONLY)[0])
    r, d = statistics.median(x for x, _ in raw), statistics.median(x for x, _ in daemon)
    p, i = statistics.median(peer), statistics.median(intake)
    for figure, value, unit, target in [
        ("raw_transport_events_per_s", r, "events/s", None),
        ("remote_dispatcher_events_per_s", p, "events/s", None),
        ("daemon_events_per_s", d, "events/s", None),
        ("daemon_over_raw_ratio", d / r, "ratio", ">= 0.5"),
        ("daemon_over_remote_dispatcher_ratio", d / p, "ratio", ">= 3"),
        # the daemon with no consumers: receive, decode, validate, coalesce, route
        ("intake_only_events_per_s", i, "events/s", None),
        ("intake_only_over_raw_ratio", i / r, "ratio", None),
        # the proxy's PUB drops at its high-water mark when a subscriber falls behind (bluesky#1177):
        # the daemon counts those from the RunStop's num_events
        ("raw_events_lost", sum(n for _, n in raw), "events", None),
        ("daemon_events_counted_missing", sum(n for _, n in daemon), "events", None),
    ]:
        print(json.dumps({"benchmark": "documents", "figure": figure, "value": round(value, 4), "unit": unit, "target": target}))


if __name__ == "__main__":
    main()
