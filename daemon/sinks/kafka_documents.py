"""Derived documents to a Kafka topic, framed as ``bluesky_kafka.Publisher`` frames them.

One message per document: value ``msgpack((name, doc))`` with numpy arrays in msgpack-numpy's map
form (:data:`~beamlens.daemon.documents.msgpack_serializer`), key the **raw** run's uid, so that every
derived run of one raw run lands on one partition, in order, and a ``bluesky_kafka.RemoteDispatcher``
or beamlens' own Kafka source reads them back. ``produce`` only queues (librdkafka sends in its own
thread); delivery failures are counted in ``beamlens_output_failures_total{output="documents"}``.
"""
from __future__ import annotations

import logging
from typing import Any

from ..config import KafkaDocumentsTargetConfig
from ..documents import msgpack_serializer
from ..isolation import RateLimitedLog
from ..metrics import Metrics

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 10.0


class KafkaDocumentPublisher:
    """Produces ``(name, doc)`` pairs to one topic (confluent-kafka ``Producer``).

    Args:
        config: the ``outputs.documents.kafka`` section.
        metrics: counts delivery failures.
    """

    def __init__(self, config: KafkaDocumentsTargetConfig, metrics: Metrics):
        from confluent_kafka import Producer  # optional extra beamlens[kafka]
        self.config = config
        self.metrics = metrics
        self._rlog = RateLimitedLog(log)
        self._producer = Producer({
            **config.producer_config,
            "bootstrap.servers": config.bootstrap_servers,
            "client.id": "beamlens-documents",
            "message.max.bytes": config.max_message_bytes,
            "logger": log,
            **config.security.librdkafka(),
        })

    def __call__(self, name: str, doc: dict[str, Any], key: str | None = None) -> None:
        """Queue one document for the topic, keyed by the raw run's uid.

        Raises:
            BufferError: librdkafka's local queue stays full (the broker is unreachable).
            confluent_kafka.KafkaException: the message is larger than ``max_message_bytes``.
        """
        value = msgpack_serializer((name, doc))
        try:
            self._producer.produce(self.config.topic, value=value, key=key, on_delivery=self._delivered)
        except BufferError:
            self._producer.poll(0.5)  # let delivery reports free the queue once, then give up
            self._producer.produce(self.config.topic, value=value, key=key, on_delivery=self._delivered)
        self._producer.poll(0)

    def _delivered(self, err: Any, message: Any) -> None:
        if err is not None:
            self.metrics.output_failures.labels("documents").inc()
            self._rlog.log(logging.ERROR, "kafka_delivery", "derived document not delivered to %s: %s", self.config.topic, err)

    def close(self) -> None:
        left = self._producer.flush(FLUSH_TIMEOUT_S)
        if left:
            self.metrics.output_failures.labels("documents").inc(left)
            log.error("%d derived document(s) not delivered to %s within %.0f s", left, self.config.topic, FLUSH_TIMEOUT_S)
