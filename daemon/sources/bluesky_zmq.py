"""Subscription to a bluesky 0MQ proxy (``bluesky.callbacks.zmq.Proxy``, bluesky 1.15).

A SUB socket connects to the proxy's out address and subscribes to ``prefix + b" "`` (bluesky's
Publisher framing, see :mod:`beamlens.daemon.documents`) and to :data:`PROBE_PREFIX`. Every message is
size-checked, split (the payload is decoded from a view of the received bytes, not a copy), decoded
with the configured serializer and validated against event_model's schemas in this thread
(:func:`~beamlens.daemon.documents.decode_document`: full schema for RunStart/Descriptor/RunStop, a
structural fast path for Events); good documents go to the router's queue (blocking when it is full),
bad ones are logged and counted under a reason, and the loop goes on.

Intake near the transport: each wake-up drains what the socket already holds (at most
:data:`MAX_DRAIN` messages or :data:`MAX_DRAIN_BYTES`, so no wait is added and memory stays bounded),
decodes and validates every message on its own, then packs runs of consecutive valid Events of one
descriptor into one EventPage (:func:`~beamlens.daemon.documents.coalesce_events`), so the router,
its queue and the consumers see one item per burst instead of one per Event. Order is kept; a bad
message between two Events only ends the page.

Readiness: PUB/SUB silently drops what is published before the subscription reaches the publisher
(the slow-joiner problem, bluesky#2014). A peer that must not lose the first run publishes
``beamlens_probe`` messages with prefix :data:`PROBE_PREFIX` until :meth:`BlueskyZmqSource.probe_seen`
reports its nonce (see :func:`beamlens.daemon.sim.beamline.wait_until_subscribed`).

Reconnection is 0MQ's own: a SUB that connects keeps retrying with ``RECONNECT_IVL`` backoff up to
``RECONNECT_IVL_MAX``; connection state is followed with a socket monitor and exported as
``beamlens_source_connected``.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..config import BlueskySourceConfig
from ..documents import (PROBE_PREFIX, DecodeError, Document, coalesce_events, decode_document, make_deserializer,
                         split_message)
from ..isolation import RateLimitedLog
from ..metrics import Metrics
from .curve import HANDSHAKE_FAILED, apply_curve_client, handshake_failure_reason

log = logging.getLogger(__name__)

POLL_MS = 100
MAX_DRAIN = 256
"""Most messages taken from the socket per wake-up (also the largest coalesced EventPage)."""
MAX_DRAIN_BYTES = 32 << 20
"""Stop draining once this many bytes are held (bounds memory whatever ``max_message_bytes`` is)."""



def count_received(metrics: Metrics, source: str, docs: list[Document]) -> None:
    """Count ``docs`` under ``beamlens_documents_received_total{source, type}`` (one increment per type)."""
    counts: dict[str, int] = {}
    for d in docs:
        counts[d.name] = counts.get(d.name, 0) + 1
    for name, n in counts.items():
        metrics.documents_received.labels(source, name).inc(n)

class BlueskyZmqSource:
    """Receives Bluesky documents from a 0MQ proxy in a background thread.

    Args:
        config: the source's config section.
        metrics: where to count documents and rejects.
        emit: called with each good :class:`Document` (consecutive Events arrive packed as one
            ``event_page``); may block (backpressure).
        context: 0MQ context to use (a new one by default).
        max_data_keys: descriptors with more data keys are rejected (``too_many_data_keys``) before
            schema validation (``limits.max_data_keys``); None: no cap.
    """

    def __init__(self, config: BlueskySourceConfig, metrics: Metrics, emit: Callable[[Document], None],
                 context: zmq.Context | None = None, max_data_keys: int | None = None):
        self.config = config
        self.metrics = metrics
        self.emit = emit
        self.context = context or zmq.Context.instance()
        self.loads = make_deserializer(config.serializer, config.allow_pickle)
        self.prefix = config.prefix.encode()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._probes: set[str] = set()
        self._probe_lock = threading.Lock()
        self.connected = threading.Event()
        self.max_data_keys = max_data_keys
        self._rlog = RateLimitedLog(log)  # a flood of one bad message writes a few lines; the counter is exact

    @property
    def name(self) -> str:
        return self.config.name

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"beamlens-source-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def probe_seen(self, nonce: str) -> bool:
        """True once a probe with this nonce has arrived through the proxy."""
        with self._probe_lock:
            return nonce in self._probes

    # -- the loop ----------------------------------------------------------------------------
    def _socket(self) -> zmq.Socket:
        sock = self.context.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self.config.receive_hwm)
        # 0MQ refuses (and disconnects) a peer whose message exceeds this; the application check
        # below counts messages up to it. Twice the cap leaves room to count moderate excess.
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.config.max_message_bytes)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self.prefix + b" ")
        sock.setsockopt(zmq.SUBSCRIBE, PROBE_PREFIX + b" ")
        if self.config.curve is not None:
            apply_curve_client(sock, self.config.curve.secret_key_file, self.config.curve.server_public_key_file)
        return sock

    def _run(self) -> None:
        sock = self._socket()
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
        sock.connect(self.config.address)
        log.info("source %s subscribed to %s (serializer %s)", self.name, self.config.address, self.config.serializer)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(POLL_MS))
                if monitor in events:
                    self._on_monitor(recv_monitor_message(monitor))
                if sock in events:
                    self._drain(sock)
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
            self.connected.clear()
            self.metrics.source_connected.labels(self.name).set(0)

    def _on_monitor(self, event: dict) -> None:
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected.set()
            self.metrics.source_connected.labels(self.name).set(1)
            log.info("source %s connected to %s", self.name, self.config.address)
        elif event["event"] & HANDSHAKE_FAILED:
            reason = handshake_failure_reason(event["event"])
            self.metrics.handshake_failures.labels(self.name, reason).inc()
            log.error("source %s: handshake with %s failed (%s); check the CURVE keys", self.name, self.config.address, reason)
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            self.connected.clear()
            self.metrics.source_connected.labels(self.name).set(0)
            log.warning("source %s lost its connection to %s; 0MQ is reconnecting", self.name, self.config.address)

    def _drain(self, sock: zmq.Socket) -> None:
        """Take what the socket holds now (bounded), decode each message, emit coalesced."""
        while True:
            docs: list[Document] = []
            held = 0
            while len(docs) < MAX_DRAIN and held < MAX_DRAIN_BYTES:
                try:
                    message = sock.recv(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                held += len(message)
                doc = self.decode(message)
                if doc is not None:
                    docs.append(doc)
            self._emit_all(docs)
            if len(docs) < MAX_DRAIN and held < MAX_DRAIN_BYTES:
                return

    def _emit_all(self, docs: list[Document]) -> None:
        count_received(self.metrics, self.name, docs)
        for d in coalesce_events(docs, MAX_DRAIN):
            self.emit(d)

    def handle(self, message: bytes) -> None:
        """Decode one raw message and emit it, or count why not. Never raises."""
        doc = self.decode(message)
        if doc is not None:
            self._emit_all([doc])

    def decode(self, message: bytes) -> Document | None:
        """One raw message as a validated :class:`Document`; None for a probe or a rejected
        message (logged and counted under its reason). Never raises."""
        try:
            if len(message) > self.config.max_message_bytes:
                raise DecodeError("oversized", f"message of {len(message)} bytes exceeds max_message_bytes")
            prefix, name, payload = split_message(message, self.prefix)
            if prefix == PROBE_PREFIX:
                self._on_probe(payload)
                return None
            if prefix != self.prefix:
                raise DecodeError("wrong_prefix", "message prefix does not match")
            doc = decode_document(name, payload, self.loads, validate=self.config.validate_documents,
                                  max_data_keys=self.max_data_keys)
        except DecodeError as exc:
            self.metrics.bad_messages.labels(self.name, exc.reason).inc()
            self._rlog.log(logging.WARNING, exc.reason, "source %s rejected a message (%s): %s", self.name, exc.reason, exc)
            return None
        return Document(name=name, doc=doc, source=self.name, received=time.time())

    def _on_probe(self, payload: memoryview) -> None:
        nonce = bytes(payload[1:65]).decode("ascii", "replace")  # after the 0xC1 guard byte
        with self._probe_lock:
            if len(self._probes) > 1000:
                self._probes.clear()
            self._probes.add(nonce)
        self.metrics.probes_received.labels(self.name).inc()
