"""A detector frame stream over 0MQ: receive thread -> bounded queue -> decode thread -> router.

The receive thread only receives: ``recv_multipart(copy=False)`` (zero-copy; pyzmq copies below
``zmq.COPY_THRESHOLD`` anyway), counts, size-checks and classifies each message with the decoder's
cheap :meth:`~beamlens.daemon.sources.frame_decoder.FrameDecoder.is_image`, and queues it in a
:class:`~beamlens.daemon.sources.frame_queue.FrameQueue` under the configured overflow policy.
The decode thread decompresses and validates (off the receive loop), batches consecutive frames
of one series (up to ``max_batch``), and hands batches to the router, holding at most
``router.frames_in_flight`` batches there per source (a credit semaphore), so memory stays bounded
when the consumers are slower than the detector.

Ordering with Bluesky documents: the router asks every frame source for a *barrier* when a RunStop
arrives (:meth:`FrameSource.request_barrier`); the source answers with a
:class:`~beamlens.daemon.frames.FrameBarrier` once every message it had received by then has been
decoded and handed over, so frames received before a RunStop reach that run before it closes.

Every rejected message is counted in ``beamlens_frame_decode_errors_total{reason}`` and logged
(rate-limited); the loop always goes on.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from ..config import Array10SourceConfig, CurveServerConfig, DectrisV1SourceConfig, DectrisV2SourceConfig, FrameSourceBase
from ..frames import Frame, FrameBarrier, FrameBatch, FrameDecodeError, SeriesEnd, SeriesEvent, SeriesStart
from ..metrics import Metrics
from .array10 import Array10Decoder
from .curve import HANDSHAKE_FAILED, apply_curve_client, apply_curve_server, handshake_failure_reason
from .dectris_v1 import DectrisV1Decoder
from .dectris_v2 import DectrisV2Decoder
from .frame_decoder import FrameDecoder
from .frame_queue import FrameQueue, RawMessage

log = logging.getLogger(__name__)
PEER_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED

POLL_MS = 100


def make_decoder(config: FrameSourceBase) -> FrameDecoder:
    """The decoder for a frame source's ``format``."""
    if isinstance(config, DectrisV1SourceConfig):
        return DectrisV1Decoder(config.max_message_bytes, config.verify_hash)
    if isinstance(config, DectrisV2SourceConfig):
        return DectrisV2Decoder(config.max_message_bytes, config.channel)
    if isinstance(config, Array10SourceConfig):
        return Array10Decoder(config.max_message_bytes, config.shape_order)
    raise ValueError(f"no decoder for {type(config).__name__}")


class FrameSource:
    """Receives, decodes and forwards one detector frame stream.

    Args:
        config: the source's config section.
        metrics: where to count.
        emit: called from the decode thread with each :class:`SeriesEvent` and :class:`FrameBatch`
            in stream order; may block (backpressure). The receiver of a batch must call
            ``batch.release()`` once it is done with it.
        in_flight: frame batches handed to ``emit`` and not yet released, at most.
        context: 0MQ context (the process-wide one by default).
    """

    def __init__(self, config: FrameSourceBase, metrics: Metrics, emit: Callable[[Any], None],
                 in_flight: int = 2, context: zmq.Context | None = None):
        self.config = config
        self.metrics = metrics
        self.emit = emit
        self.context = context or zmq.Context.instance()
        self.decoder = make_decoder(config)
        self.queue = FrameQueue(config.queue_size, config.overflow, self._skipped)
        # ``latest`` hands the router one batch at a time, taken only once the previous one is done,
        # so that what the consumers get is the newest frame at the moment they can take it.
        self._credits = threading.Semaphore(in_flight if config.overflow == "block" else 1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._bound = threading.Event()
        self.address = config.address
        self._series: SeriesStart | None = None
        self._last_number = -1
        self._held_credit = False
        self._barriers: list[tuple[int, str]] = []
        self._done_seq = 0
        self._barrier_lock = threading.Lock()
        self._error_counts: dict[str, int] = {}
        labels = config.name
        self._m_received = metrics.frames_received.labels(labels)
        self._m_bytes = metrics.frame_bytes_received.labels(labels)
        self._m_depth = metrics.queue_depth.labels(f"frames_{labels}")

    @property
    def name(self) -> str:
        return self.config.name

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Start both threads; returns once the socket is bound or connecting (``address`` is then
        the bound endpoint, useful with port 0)."""
        self._stop.clear()
        self._threads = [threading.Thread(target=self._receive_loop, name=f"beamlens-frames-{self.name}-recv", daemon=True),
                         threading.Thread(target=self._decode_loop, name=f"beamlens-frames-{self.name}-decode", daemon=True)]
        for t in self._threads:
            t.start()
        if not self._bound.wait(timeout):
            raise TimeoutError(f"frame source {self.name} did not open its socket")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop receiving; the decode thread finishes what is queued (up to ``timeout`` s)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self.queue.close()
        self._threads = []

    def request_barrier(self, token: str) -> None:
        """Ask for a :class:`FrameBarrier` with ``token`` once every message received so far has been
        handed to ``emit`` (any thread)."""
        with self._barrier_lock:
            self._barriers.append((self.queue.watermark(), token))

    def _release_barriers(self, done_seq: int) -> None:
        """Emit the barriers whose watermark ``done_seq`` has reached."""
        with self._barrier_lock:
            ready = [t for w, t in self._barriers if w <= done_seq]
            self._barriers = [(w, t) for w, t in self._barriers if w > done_seq]
        for token in ready:
            self.emit(FrameBarrier(self.name, token))

    # -- receive thread ----------------------------------------------------------------------
    def _socket(self) -> zmq.Socket:
        c = self.config
        sock = self.context.socket(zmq.PULL if c.socket == "pull" else zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, c.receive_hwm)
        # per part; 0MQ disconnects a peer beyond it. Twice the cap, so that moderate excess reaches the
        # size check below and is counted.
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * c.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        if c.socket == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, c.topic.encode())
        if isinstance(c.curve, CurveServerConfig):
            apply_curve_server(sock, self.context, self.name, c.curve.secret_key_file, c.curve.allowed_clients_dir)
        elif c.curve is not None:
            apply_curve_client(sock, c.curve.secret_key_file, c.curve.server_public_key_file)
        self._monitor = sock.get_monitor_socket(HANDSHAKE_FAILED | PEER_EVENTS)
        self._peers: set[int] = set()  # file descriptors of open peer connections
        if c.mode == "bind":
            sock.bind(c.address)
            self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            sock.connect(c.address)
        return sock

    def _receive_loop(self) -> None:
        try:
            sock = self._socket()
        except zmq.ZMQError:
            log.exception("frame source %s cannot open %s", self.name, self.config.address)
            self._bound.set()
            return
        log.info("frame source %s (%s) %s %s %s, overflow %s", self.name, self.config.format, self.config.socket,
                 "bound to" if self.config.mode == "bind" else "connected to", self.address, self.config.overflow)
        self._bound.set()
        is_image = self.decoder.is_image
        limit = self.config.max_message_bytes
        try:
            while not self._stop.is_set():
                while self._monitor.poll(0):
                    self._on_monitor(recv_monitor_message(self._monitor))
                if not sock.poll(POLL_MS):
                    continue
                images = nbytes_total = 0  # counted per burst: one metric update per poll, not per frame
                try:
                    while not self._stop.is_set():
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        buffers = [p.buffer for p in parts]
                        nbytes = sum(b.nbytes for b in buffers)
                        nbytes_total += nbytes
                        if nbytes > limit:
                            self._reject("oversized", f"message of {nbytes} bytes exceeds max_message_bytes")
                            continue
                        image = is_image(buffers)
                        images += image
                        if not self.queue.put(RawMessage(buffers, image, time.time()), self._stop.is_set):
                            return
                        if images % 64 == 0:
                            self._m_received.inc(images)
                            images = 0
                finally:
                    self._m_received.inc(images)
                    self._m_bytes.inc(nbytes_total)
                    self._m_depth.set(len(self.queue))
        finally:
            sock.disable_monitor()
            self._monitor.close(0)
            sock.close(0)
            self.metrics.source_connected.labels(self.name).set(0)

    def _on_monitor(self, event: dict) -> None:
        """Track peers (``beamlens_source_connected`` is 1 while at least one connection is open;
        the monitor events' value is the connection's file descriptor) and count failed handshakes."""
        if event["event"] & PEER_EVENTS:
            was = bool(self._peers)
            if event["event"] & (zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED):
                self._peers.add(event["value"])
            else:
                self._peers.discard(event["value"])
            self.metrics.source_connected.labels(self.name).set(int(bool(self._peers)))
            if was != bool(self._peers):
                log.log(logging.INFO if self._peers else logging.WARNING, "frame source %s %s %s", self.name,
                        "connected to a peer at" if self._peers else "has no peer left at", self.address)
            return
        reason = handshake_failure_reason(event["event"])
        self.metrics.handshake_failures.labels(self.name, reason).inc()
        log.error("frame source %s: a peer failed the handshake (%s); check the CURVE keys", self.name, reason)

    def _skipped(self, n: int) -> None:
        self.metrics.frames_dropped.labels(self.name, "overflow").inc(n)

    # -- decode thread -----------------------------------------------------------------------
    def _decode_loop(self) -> None:
        max_batch = self.config.max_batch
        while True:
            if not self._held_credit:
                if not self._acquire_credit():
                    return
                self._held_credit = True
            msgs = self.queue.get_batch(max_batch, timeout=POLL_MS / 1000)
            if not msgs:
                self._release_barriers(self._done_seq)
                if self._stop.is_set() and not self._threads[0].is_alive():
                    return
                continue
            self._m_depth.set(len(self.queue))
            frames: list[Frame] = []
            received = msgs[-1].received
            for msg in msgs:
                for item in self._decode(msg):
                    if isinstance(item, Frame):
                        if frames and frames[0].series_id != item.series_id:
                            self._flush(frames, received)
                            frames = []
                        frames.append(item)
                    else:
                        self._flush(frames, received)
                        frames = []
                        self.emit(SeriesEvent(self.name, item, msg.received))
            self._flush(frames, received)
            self._done_seq = msgs[-1].seq  # every earlier message is handled (processed or counted as skipped)
            if self._barriers:
                self._release_barriers(self._done_seq)

    def _decode(self, msg: RawMessage) -> list[Any]:
        try:
            items = self.decoder.decode(msg.parts)
        except FrameDecodeError as exc:
            self._reject(exc.reason, str(exc))
            return []
        except Exception as exc:  # a decoder bug must not stop the stream
            log.exception("frame source %s: decoder failed", self.name)
            self._reject("decoder_error", f"{type(exc).__name__}: {exc}")
            return []
        out = []
        for item in items:
            if isinstance(item, SeriesStart):
                self._series, self._last_number = item, -1
            elif isinstance(item, SeriesEnd):
                self._series = None
            elif isinstance(item, Frame):
                s = self._series
                if s is not None and s.series_id == item.series_id and (
                        item.data.shape != s.sig_shape or item.data.dtype.name != s.dtype):
                    self._reject("shape_mismatch", f"frame {item.number} is {item.data.shape} {item.data.dtype}, "
                                 f"series {s.series_id} announced {s.sig_shape} {s.dtype}")
                    continue
                self._count_gap(item.number, msg.skipped_before)
            out.append(item)
        return out

    def _count_gap(self, number: int, skipped: int) -> None:
        missing = number - self._last_number - 1 - skipped
        if missing > 0:
            self.metrics.frames_dropped.labels(self.name, "gap").inc(missing)
        self._last_number = max(self._last_number, number)

    def _flush(self, frames: list[Frame], received: float) -> None:
        if not frames:
            return
        data = frames[0].data[None] if len(frames) == 1 else np.stack([f.data for f in frames])
        numbers = np.fromiter((f.number for f in frames), dtype=np.int64, count=len(frames))
        if self._held_credit:
            self._held_credit = False
        elif not self._acquire_credit():
            self.metrics.frames_dropped.labels(self.name, "shutdown").inc(len(frames))
            return
        self.emit(FrameBatch(self.name, frames[0].series_id, numbers, data, received, self._credits.release))

    def _acquire_credit(self) -> bool:
        """Wait until the router has room for another batch of this source; False at shutdown."""
        while not self._credits.acquire(timeout=POLL_MS / 1000):
            if self._stop.is_set() and not self._threads[0].is_alive():
                return False
        return True

    def _reject(self, reason: str, message: str) -> None:
        self.metrics.frame_decode_errors.labels(self.name, reason).inc()
        n = self._error_counts[reason] = self._error_counts.get(reason, 0) + 1
        if n & (n - 1) == 0:  # log the 1st, 2nd, 4th, 8th, ... of each reason
            log.warning("frame source %s rejected a message (%s, %d so far): %s", self.name, reason, n, message[:300])
