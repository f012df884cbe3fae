"""Helpers for the Kafka tests: messages framed as bluesky_kafka.Publisher frames them, committed
offsets, keys that land on a chosen partition."""
from __future__ import annotations

import logging
import uuid
import zlib

from beamlens.daemon.documents import msgpack_serializer

LOG = logging.getLogger("kafka-test-clients")


def kafka_source_yaml(broker, topic: str, group: str, **extra: object) -> str:
    fields = {"name": "kafka", "bootstrap_servers": broker.bootstrap_servers, "topics": [topic], "group.id": group,
              "auto_offset_reset": "earliest", "session_timeout_s": 3, "commit_interval_s": 0.2, **extra}
    import json
    return f"sources:\n  kafka:\n    - {json.dumps(fields)}\n"


def producer(broker):
    from confluent_kafka import Producer
    return Producer({"bootstrap.servers": broker.bootstrap_servers, "acks": 1, "linger.ms": 1,
                     "message.max.bytes": 8 << 20, "logger": LOG})


def produce_documents(prod, topic: str, documents, key: str) -> None:
    """Each ``(name, doc)`` as one message ``msgpack((name, doc))`` (bluesky_kafka's framing)."""
    for name, doc in documents:
        prod.produce(topic, key=key, value=msgpack_serializer((name, doc)))
    prod.flush(30)


def key_for_partition(partition: int, partitions: int, prefix: str = "run") -> str:
    """A message key that librdkafka's default partitioner (consistent_random: CRC-32 of the key
    modulo the partition count) sends to ``partition``."""
    while True:
        key = f"{prefix}-{uuid.uuid4().hex[:8]}"
        if zlib.crc32(key.encode()) % partitions == partition:
            return key


def committed(broker, topic: str, group: str, partitions: int) -> dict[int, int]:
    """The group's committed offset per partition (-1001: none), read by a consumer that never joins."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": group, "enable.auto.commit": False,
                  "logger": LOG})
    try:
        return {tp.partition: tp.offset for tp in c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)}
    finally:
        c.close()


def stats_maps(run) -> dict[str, "object"]:
    """The stats consumer's maps of a RunState, by buffer name."""
    (slot,) = [s for s in run.slots if s.name == "stats"]
    return {name: slot.arrays[name] for name in ("total", "max", "mean")}
