"""Bluesky document ingest: the daemon against the raw 0MQ transport, side by side in one run.

The real STXM spectra (123 channels, msgpack-numpy) go as Event documents through a real bluesky
0MQ Proxy from a bluesky ``Publisher`` in its own process, as a RunEngine sends them (serializing
each document as it goes, never sharing the subscriber's interpreter or GIL), as fast as it can:
once to a bare SUB socket that only receives (``raw``), once to bluesky's own ``RemoteDispatcher``
with a no-op callback subscribed (the peer: what a bluesky callback process gets), once to the
daemon running the ``stats`` and ``pca`` consumers, and once to the daemon with no consumers at all
(intake alone). It reports events/s of each and the daemon's ratios (median of ``--rounds``
interleaved rounds), the CPU seconds per event of the daemon and of the RemoteDispatcher (what a
subscriber costs a core, whatever rate the source can deliver), and the events lost on the way (the proxy's PUB drops at its high-water mark
when a subscriber lags; the daemon counts those as missing from the RunStop).

``transport_limit`` is the same documents pre-serialized and sent as fast as 0MQ takes them into
the proxy, to a bare SUB: the transport's own ceiling, above what any Publisher delivers; the proxy
drops what it cannot forward, so no subscriber can be measured loss-free at that rate, and it is
reported for scale (with its losses), not as a target.

    python benchmarks/documents.py [--events 20000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import threading
import time
import uuid

import numpy as np
import zmq
from bluesky.callbacks.zmq import Publisher, RemoteDispatcher
from event_model import compose_run

from beamlens.daemon.app import Daemon
from beamlens.daemon.config import load_config
from beamlens.daemon.documents import PROBE_NAME, PROBE_PREFIX, make_deserializer, msgpack_serializer
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


class PublisherProcess:
    """The RunEngine side in its own process (as at a beamline: a RunEngine never shares the
    subscriber's interpreter, so neither its serializing nor its GIL is charged to the subscriber).

    The child builds the same documents and, per command, publishes them through a bluesky
    ``Publisher`` (msgpack-numpy, the documents serialized as they are sent: what a RunEngine
    delivers) or sends the same bytes pre-serialized, as fast as 0MQ takes them (the transport's
    own limit). Before each round it repeats a readiness message through the very socket that will
    carry the documents (the PUB/SUB slow joiner, on both legs of the proxy) until the parent says go.
    """

    def __init__(self, proxy_in: str, n_events: int):
        ctx = multiprocessing.get_context("spawn")
        self._ctl = zmq.Context.instance().socket(zmq.PAIR)
        port = self._ctl.bind_to_random_port("tcp://127.0.0.1")
        self._proc = ctx.Process(target=_publisher_main, args=(proxy_in, f"tcp://127.0.0.1:{port}", n_events), daemon=True)
        self._proc.start()
        ready, uid = self._ctl.recv_multipart()
        if ready != b"ready":
            raise RuntimeError("publisher process did not start")
        self.run_uid = uid.decode()
        """The RunStart uid of the documents (the same run every round)."""

    def warm(self, prefix: bytes, nonce: str, warm_uid: str) -> None:
        """Start repeating the readiness messages: a beamlens probe with ``nonce`` and a throw-away
        RunStart ``warm_uid`` with ``prefix`` (for a RemoteDispatcher, which knows no probes)."""
        self._ctl.send_multipart([b"warm", prefix, nonce.encode(), warm_uid.encode()])

    def send(self, mode: str) -> None:
        """Stop warming and publish the documents (``publisher`` or ``bytes``); returns at once."""
        self._ctl.send_multipart([b"go", mode.encode()])

    def wait_sent(self, timeout: float = 300) -> float:
        """Seconds the child took to send everything."""
        if not self._ctl.poll(timeout * 1000):
            raise RuntimeError("the publisher process did not finish")
        return float(self._ctl.recv())

    def close(self) -> None:
        self._ctl.send_multipart([b"quit"])
        self._proc.join(10)
        self._ctl.close(0)


def _publisher_main(proxy_in: str, ctl_address: str, n_events: int) -> None:
    docs = make_documents(n_events)
    ctl = zmq.Context.instance().socket(zmq.PAIR)
    ctl.connect(ctl_address)
    publishers: dict[bytes, Publisher] = {}
    ctl.send_multipart([b"ready", docs[0][1]["uid"].encode()])
    while True:
        cmd = ctl.recv_multipart()
        if cmd[0] == b"quit":
            break
        prefix, nonce, warm_uid = cmd[1], cmd[2].decode(), cmd[3].decode()
        if prefix not in publishers:
            publishers[prefix] = Publisher(proxy_in, prefix=prefix, serializer=msgpack_serializer)
        pub = publishers[prefix]
        sock = pub._socket  # the Publisher's own PUB socket: readiness proven on the leg the documents take
        while not ctl.poll(20):
            sock.send(PROBE_PREFIX + b" " + PROBE_NAME.encode() + b" \xc1" + nonce.encode())
            pub("start", {"uid": warm_uid, "time": time.time()})
        mode = ctl.recv_multipart()[1]
        if mode == b"bytes":
            frames = [prefix + b" " + name.encode() + b" " + msgpack_serializer(doc) for name, doc in docs]
            t0 = time.perf_counter()
            for frame in frames:
                sock.send(frame)
        else:
            t0 = time.perf_counter()
            for name, doc in docs:
                pub(name, doc)
        ctl.send(str(time.perf_counter() - t0).encode())
    for pub in publishers.values():
        pub.close()
    ctl.close(0)


def raw_rate(proxy: ProxyProcess, sender: PublisherProcess, n_events: int, mode: str = "publisher") -> tuple[float, int]:
    """(events/s received by a bare SUB socket that only receives, events lost on the way)."""
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b" ")
    sock.connect(proxy.out_address)
    nonce = uuid.uuid4().hex
    sender.warm(b"", nonce, "warm-" + nonce)
    _wait(lambda: _drain_probe(sock, nonce), "the bare SUB socket never received the probe")
    sender.send(mode)
    got, t0, t_last = 0, None, None
    while sock.poll(10_000):  # until the RunStop, or 10 s of silence (it was lost)
        msg = sock.recv()
        if msg.startswith(b" event "):
            t_last = time.perf_counter()
            t0 = t0 or t_last
            got += 1
        elif msg.startswith(b" stop "):
            break
    sender.wait_sent()
    sock.close(0)
    return (got - 1) / (t_last - t0), n_events - got


def _drain_probe(sock: zmq.Socket, nonce: str) -> bool:
    while sock.poll(0):
        if nonce.encode() in sock.recv():
            return True
    return False


def _wait(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(what)
        time.sleep(0.005)


INTAKE_ONLY = """
http: {{port: 0}}
sources:
  bluesky:
    - {{name: bench, address: "{address}"}}
consumers: []
"""


def daemon_rate(proxy: ProxyProcess, sender: PublisherProcess, config: str = CONFIG,
                mode: str = "publisher") -> tuple[float, int, float]:
    """(events/s analysed by the daemon, events it counted as missing when the run stopped, CPU
    seconds per event analysed), timed from the go to the publisher to the run finished. CPU time
    is this process's (``time.process_time``: every daemon thread; the publisher and the proxy run
    in processes of their own, and the benchmark's own thread only waits)."""
    daemon = Daemon(load_config(text=config.format(address=proxy.out_address), environ={}))
    daemon.start()
    try:
        nonce = uuid.uuid4().hex
        sender.warm(b"", nonce, "warm-" + nonce)
        _wait(lambda: daemon.sources[0].probe_seen(nonce), "the daemon never received the probe")
        t0, cpu0 = time.perf_counter(), time.process_time()
        sender.send(mode)
        if not daemon.store.wait_finished(sender.run_uid, 300):
            raise RuntimeError("the run's stop never reached the daemon")
        dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        sender.wait_sent()
        value = daemon.metrics.registry.get_sample_value
        processed = value("beamlens_events_processed_total")
        return processed / dt, int(value("beamlens_events_missing_total") or 0), cpu / processed
    finally:
        daemon.stop()


def dispatcher_rate(proxy: ProxyProcess, sender: PublisherProcess, n_events: int,
                    mode: str = "publisher") -> tuple[float, int, float]:
    """(events/s through a bluesky ``RemoteDispatcher`` (msgpack, no-op callback, its default
    settings), events it lost, CPU seconds per event dispatched), timed like the daemon: from the
    go to the RunStop dispatched (or, when the proxy dropped the stop at its high-water mark, to the
    last event after 10 s of silence; CPU time to when that was seen, the dispatcher idle)."""
    prefix = b"peer"
    dispatcher = RemoteDispatcher(proxy.out_address, prefix=prefix, deserializer=make_deserializer("msgpack"))
    nonce = uuid.uuid4().hex
    warm_uid = "warm-" + nonce
    seen, done = threading.Event(), threading.Event()
    counts = {"event": 0, "last": 0.0}

    def callback(name: str, doc: dict) -> None:
        if name == "event":
            counts["event"] += 1
            counts["last"] = time.perf_counter()
        elif name == "start" and doc["uid"] == warm_uid:
            seen.set()
        elif name == "stop":
            counts["last"] = time.perf_counter()
            done.set()

    dispatcher.subscribe(callback)

    def serve() -> None:
        try:
            dispatcher.start()
        except asyncio.CancelledError:  # our cancel at the end
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        sender.warm(prefix, nonce, warm_uid)
        if not seen.wait(30):
            raise RuntimeError("the RemoteDispatcher never received the warm-up document")
        t0, cpu0 = time.perf_counter(), time.process_time()
        sender.send(mode)
        sender.wait_sent()
        last = -1
        while not done.wait(10) and counts["event"] != last:  # 10 s without progress: the stop was lost
            last = counts["event"]
        dt, cpu = counts["last"] - t0, time.process_time() - cpu0
    finally:
        dispatcher.loop.call_soon_threadsafe(dispatcher._task.cancel)  # ends start(), which closes the socket
        thread.join(10)
    return counts["event"] / dt, n_events - counts["event"], cpu / counts["event"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    side = int(np.sqrt(args.events))
    n = side * (args.events // side)
    limit, raw, daemon, peer, intake = [], [], [], [], []
    with ProxyProcess() as proxy:
        sender = PublisherProcess(proxy.in_address, args.events)
        try:
            for _ in range(args.rounds):
                limit.append(raw_rate(proxy, sender, n, "bytes"))
                raw.append(raw_rate(proxy, sender, n))
                daemon.append(daemon_rate(proxy, sender))
                peer.append(dispatcher_rate(proxy, sender, n))
                intake.append(daemon_rate(proxy, sender, INTAKE_ONLY)[0])
        finally:
            sender.close()
    lim, r = statistics.median(x for x, _ in limit), statistics.median(x for x, _ in raw)
    d, p, i = statistics.median(x[0] for x in daemon), statistics.median(x[0] for x in peer), statistics.median(intake)
    d_cpu, p_cpu = statistics.median(x[2] for x in daemon), statistics.median(x[2] for x in peer)
    for figure, value, unit, target in [
        # pre-serialized bytes as fast as 0MQ takes them: the proxy's own ceiling (it drops the excess)
        ("transport_limit_events_per_s", lim, "events/s", None),
        ("transport_limit_events_lost", sum(x for _, x in limit), "events", None),
        # a bluesky Publisher (serializing as it sends, like a RunEngine) to a bare SUB socket
        ("raw_transport_events_per_s", r, "events/s", None),
        ("remote_dispatcher_events_per_s", p, "events/s", None),
        ("daemon_events_per_s", d, "events/s", None),
        ("daemon_over_raw_ratio", d / r, "ratio", ">= 0.5"),
        ("daemon_over_remote_dispatcher_ratio", d / p, "ratio", ">= 3"),
        ("daemon_over_transport_limit_ratio", d / lim, "ratio", None),
        # CPU seconds per event received, in the subscriber's process: what each costs a core,
        # whatever rate the source delivers (the daemon's includes stats + pca and final results)
        ("daemon_cpu_per_event", d_cpu * 1e6, "us", None),
        ("remote_dispatcher_cpu_per_event", p_cpu * 1e6, "us", None),
        ("remote_dispatcher_over_daemon_cpu_per_event_ratio", p_cpu / d_cpu, "ratio", None),
        # the daemon with no consumers: receive, decode, validate, coalesce, route
        ("intake_only_events_per_s", i, "events/s", None),
        ("intake_only_over_raw_ratio", i / r, "ratio", None),
        # the proxy's PUB drops at its high-water mark when a subscriber falls behind (bluesky#1177):
        # the daemon counts those from the RunStop's num_events; the RemoteDispatcher keeps 0MQ's
        # default receive high-water mark (1000), so it loses events when it lags
        ("raw_events_lost", sum(x for _, x in raw), "events", None),
        ("remote_dispatcher_events_lost", sum(x[1] for x in peer), "events", None),
        ("daemon_events_counted_missing", sum(x[1] for x in daemon), "events", None),
    ]:
        print(json.dumps({"benchmark": "documents", "figure": figure, "value": round(value, 4), "unit": unit, "target": target}))


if __name__ == "__main__":
    main()
