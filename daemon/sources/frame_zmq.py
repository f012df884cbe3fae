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
(rate-limited); the loop always goes on. Numbers from the wire are checked here
(:mod:`beamlens.daemon.limits`): a frame number that is not an integer within ``[0, 2**40]``
(``bad_frame_number``) or jumps more than ``limits.max_gap`` past the series' last frame
(``frame_number_jump``; a second frame continuing from the new number is accepted as the new
baseline) is rejected, never added to ``frames_dropped{reason="gap"}``; an announced frame count that
is not such an integer is ignored. Series starts beyond ``limits.series_starts_per_s`` are refused
(``series_start_rate``) and their frames dropped (``series_refused``). Frames are stacked into
batches of at most ``limits.batch_max_mib``, and the receive queue holds at most
``limits.frame_queue_mib``. Each unit of work of both threads (a burst of messages, one message's
decoding, a batch's hand-over) runs under isolation: an internal error is counted in
``beamlens_internal_errors_total{component="frames_<source>"}`` and the frames concerned in
``frames_dropped{reason="error"}``; the thread goes on.
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

from ..config import (Array10SourceConfig, CurveServerConfig, DectrisV1SourceConfig, DectrisV2SourceConfig, FrameSourceBase,
                      LimitsConfig)
from ..frames import Frame, FrameBarrier, FrameBatch, FrameDecodeError, SeriesEnd, SeriesEvent, SeriesStart
from ..isolation import RateLimitedLog
from ..limits import MIB, TokenBucket, wire_index
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
                 in_flight: int = 2, context: zmq.Context | None = None, limits: LimitsConfig | None = None):
        self.config = config
        self.limits = limits = limits or LimitsConfig()
        self._series_bucket = TokenBucket(limits.series_starts_per_s, limits.series_start_burst)
        self._refused_series: str | None = None
        self._jump_to: int | None = None
        self._batch_bytes = int(limits.batch_max_mib * MIB)
        self._rlog = RateLimitedLog(log)
        self.metrics = metrics
        self.emit = emit
        self.context = context or zmq.Context.instance()
        self.decoder = make_decoder(config)
        self.queue = FrameQueue(config.queue_size, config.overflow, self._skipped, limits.frame_queue_mib * MIB)
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
        labels = config.name
        self._m_received = metrics.frames_received.labels(labels)
        self._m_bytes = metrics.frame_bytes_received.labels(labels)
        self._m_depth = metrics.queue_depth.labels(f"frames_{labels}")

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def threads(self) -> list[threading.Thread]:
        """The receive and decode threads (for the daemon's thread watch)."""
        return list(self._threads)

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
                        try:
                            image = bool(is_image(buffers))
                        except Exception:  # a classifier bug must not stop the stream
                            self._internal_error("is_image")
                            image = True
                        images += image
                        if not self.queue.put(RawMessage(buffers, image, time.time(), nbytes=nbytes), self._stop.is_set):
                            return
                        if images % 64 == 0:
                            self._m_received.inc(images)
                            images = 0
                except zmq.ContextTerminated:
                    return
                except Exception:  # one bad burst must not stop receiving
                    self._internal_error("receive")
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
        while True:
            try:
                if not self._decode_round():
                    return
            except Exception:  # beyond the per-message isolation: count, and go on with the next round
                self._internal_error("decode_loop")

    def _decode_round(self) -> bool:
        """Decode one batch of queued messages and hand its items over; False at shutdown."""
        if not self._held_credit:
            if not self._acquire_credit():
                return False
            self._held_credit = True
        msgs = self.queue.get_batch(self.config.max_batch, timeout=POLL_MS / 1000)
        if not msgs:
            self._release_barriers(self._done_seq)
            return not (self._stop.is_set() and not self._threads[0].is_alive())
        self._m_depth.set(len(self.queue))
        frames: list[Frame] = []
        nbytes = 0
        received = msgs[-1].received
        for msg in msgs:
            for item in self._decode(msg):
                if isinstance(item, Frame):
                    if frames and (frames[0].series_id != item.series_id or nbytes + item.data.nbytes > self._batch_bytes):
                        self._flush(frames, received)
                        frames, nbytes = [], 0
                    frames.append(item)
                    nbytes += item.data.nbytes
                else:
                    self._flush(frames, received)
                    frames, nbytes = [], 0
                    self.emit(SeriesEvent(self.name, item, msg.received))
        self._flush(frames, received)
        self._done_seq = msgs[-1].seq  # every earlier message is handled (processed or counted as skipped)
        if self._barriers:
            self._release_barriers(self._done_seq)
        return True

    def _decode(self, msg: RawMessage) -> list[Any]:
        try:
            items = self.decoder.decode(msg.parts)
        except FrameDecodeError as exc:
            self._reject(exc.reason, str(exc))
            return []
        except Exception as exc:  # a decoder bug must not stop the stream
            self._internal_error("decoder")
            self._reject("decoder_error", f"{type(exc).__name__}: {exc}")
            return []
        try:
            return self._check(items, msg)
        except Exception:
            self._internal_error("check")
            self._dropped("error", sum(isinstance(i, Frame) for i in items))
            return []

    def _check(self, items: list[Any], msg: RawMessage) -> list[Any]:
        """Validate decoded items against the series and :mod:`beamlens.daemon.limits`."""
        out = []
        for item in items:
            if isinstance(item, SeriesStart):
                if not self._series_bucket.take(msg.received):
                    self._refused_series, self._series = item.series_id, None
                    self.metrics.limit_actions.labels("series_start_rate", "refused").inc()
                    self._reject("series_start_rate", f"series {str(item.series_id)[:64]} over limits.series_starts_per_s")
                    continue
                if item.n_frames is not None and wire_index(item.n_frames, 1) is None:
                    self._reject_quietly("n_frames", f"series {str(item.series_id)[:64]} announces {str(item.n_frames)[:40]} "
                                         "frames; ignored (length unknown)")
                    item.n_frames = None
                self._refused_series = None
                self._series, self._last_number, self._jump_to = item, -1, None
            elif isinstance(item, SeriesEnd):
                if item.series_id == self._refused_series:
                    continue
                self._series = None
            elif isinstance(item, Frame):
                if item.series_id == self._refused_series:
                    self._dropped("series_refused", 1)
                    continue
                s = self._series
                if s is not None and s.series_id == item.series_id and (
                        item.data.shape != s.sig_shape or item.data.dtype.name != s.dtype):
                    self._reject("shape_mismatch", f"frame {item.number} is {item.data.shape} {item.data.dtype}, "
                                 f"series {s.series_id} announced {s.sig_shape} {s.dtype}")
                    continue
                if not self._number_ok(item, msg.skipped_before):
                    continue
            out.append(item)
        return out

    def _number_ok(self, frame: Frame, skipped: int) -> bool:
        """Check a frame number and count the gap before it; False (counted) when it is rejected."""
        number = wire_index(frame.number)
        if number is None:
            self._reject("bad_frame_number", f"frame number {str(frame.number)[:40]} is not an integer in [0, 2**40]")
            return False
        frame.number = number
        gap = self.limits.max_gap
        if self._last_number < 0 and number > gap:
            self._last_number = number - 1  # joined mid-series (array-1.0 has no series start): no gap counted
        missing = number - self._last_number - 1 - skipped
        if missing > gap:
            if self._jump_to is not None and 0 < number - self._jump_to <= gap:
                self._last_number, missing = self._jump_to, number - self._jump_to - 1  # the sender did jump: rebase
            else:
                self._jump_to = number
                self._reject("frame_number_jump", f"frame {number} is {missing} frames past frame {self._last_number} "
                             f"(limits.max_gap {gap})")
                return False
        self._jump_to = None
        if missing > 0:
            self.metrics.frames_dropped.labels(self.name, "gap").inc(missing)
        self._last_number = max(self._last_number, number)
        return True

    def _flush(self, frames: list[Frame], received: float) -> None:
        if not frames:
            return
        try:
            data = frames[0].data[None] if len(frames) == 1 else np.stack([f.data for f in frames])
            numbers = np.fromiter((f.number for f in frames), dtype=np.int64, count=len(frames))
        except Exception:
            self._internal_error("flush")
            self._dropped("error", len(frames))
            return
        if self._held_credit:
            self._held_credit = False
        elif not self._acquire_credit():
            self._dropped("shutdown", len(frames))
            return
        self.emit(FrameBatch(self.name, frames[0].series_id, numbers, data, received, self._credits.release))

    def _dropped(self, reason: str, n: int) -> None:
        if n:
            self.metrics.frames_dropped.labels(self.name, reason).inc(n)

    def _internal_error(self, where: str) -> None:
        self.metrics.internal_errors.labels(f"frames_{self.name}").inc()
        self._rlog.log(logging.ERROR, f"internal:{where}", "frame source %s: internal error in %s; item dropped, the "
                       "thread goes on", self.name, where, exc_info=True)

    def _reject_quietly(self, what: str, message: str) -> None:
        """A field of an otherwise usable message ignored (not a rejected message)."""
        self.metrics.limit_actions.labels(what, "ignored").inc()
        self._rlog.log(logging.WARNING, f"ignored:{what}", "frame source %s: %s", self.name, message[:300])

    def _acquire_credit(self) -> bool:
        """Wait until the router has room for another batch of this source; False at shutdown."""
        while not self._credits.acquire(timeout=POLL_MS / 1000):
            if self._stop.is_set() and not self._threads[0].is_alive():
                return False
        return True

    def _reject(self, reason: str, message: str) -> None:
        self.metrics.frame_decode_errors.labels(self.name, reason).inc()
        self._rlog.log(logging.WARNING, f"reject:{reason}", "frame source %s rejected a message (%s): %s",
                       self.name, reason, message[:300])
