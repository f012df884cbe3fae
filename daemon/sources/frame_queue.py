"""The bounded queue between a frame source's receive thread and its decode thread.

Two named overflow policies (STYLE.md habit 6: every queue bounded, its policy named and counted):

- ``block``: :meth:`FrameQueue.put` waits while the queue is full, so the receive thread stops
  reading and 0MQ's high-water marks push back on the sender. Nothing is lost here.
- ``latest``: :meth:`FrameQueue.put` never waits; when full, the oldest waiting *image* is
  discarded. :meth:`FrameQueue.get_batch` hands over only the newest image and discards the older
  ones, so the consumer always works on the freshest frame. Every discarded image is reported to
  ``on_skip``. Control messages (series start/end) are never discarded, so the queue can exceed
  ``maxsize`` by those small messages only.

Memory is bounded by ``maxsize`` messages (plus control messages) and by ``max_bytes`` of queued
message bytes in both policies (one message larger than ``max_bytes`` alone is still queued).
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Policy = Literal["block", "latest"]


@dataclass(slots=True)
class RawMessage:
    """One received 0MQ message: its parts as zero-copy buffers, whether it is an image, when, and
    how many images the ``latest`` policy discarded just before it (so frame-number gaps can be told
    apart from the queue's own, already counted, skips)."""

    parts: list[Any]
    is_image: bool
    received: float
    skipped_before: int = 0
    seq: int = 0
    nbytes: int = 0


class FrameQueue:
    """Bounded FIFO of :class:`RawMessage` with a named overflow policy.

    Args:
        maxsize: messages held at most (images, for ``latest``).
        policy: ``"block"`` or ``"latest"``.
        on_skip: called with the number of images discarded (``latest`` only).
    """

    def __init__(self, maxsize: int, policy: Policy, on_skip: Callable[[int], None] = lambda n: None,
                 max_bytes: float = float("inf")):
        if policy not in ("block", "latest"):
            raise ValueError(f"unknown overflow policy {policy!r}")
        self.maxsize = maxsize
        self.policy = policy
        self.on_skip = on_skip
        self.max_bytes = max_bytes
        self._bytes = 0
        self._items: deque[RawMessage] = deque()
        self._images = 0
        self._cond = threading.Condition()
        self._closed = False
        self.last_seq = 0
        """Sequence number given to the newest queued message (1, 2, ...); under the queue's lock."""

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        """Wake every waiter; later puts are refused (return False)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def put(self, msg: RawMessage, abort: Callable[[], bool] = lambda: False) -> bool:
        """Queue a message; ``block`` waits for room (checking ``abort`` every 0.1 s). Returns False,
        without queueing, if the queue was closed or ``abort()`` became true while waiting."""
        skipped = 0
        with self._cond:
            if self.policy == "block":
                while (len(self._items) >= self.maxsize or self._items and self._bytes + msg.nbytes > self.max_bytes) \
                        and not self._closed:
                    if abort():
                        return False
                    self._cond.wait(0.1)
            elif msg.is_image:
                while self._images and (self._images >= self.maxsize or self._bytes + msg.nbytes > self.max_bytes):
                    dropped = self._drop_oldest_image(msg)
                    if not dropped:
                        break
                    skipped += dropped
            if self._closed:
                return False
            self.last_seq += 1
            msg.seq = self.last_seq
            self._items.append(msg)
            self._bytes += msg.nbytes
            self._images += msg.is_image
            self._cond.notify_all()
        if skipped:
            self.on_skip(skipped)
        return True

    def watermark(self) -> int:
        """Sequence number of the newest message queued so far."""
        with self._cond:
            return self.last_seq

    def get_batch(self, max_n: int, timeout: float) -> list[RawMessage]:
        """Take up to ``max_n`` messages in order (``latest``: every control message and only the
        newest image), waiting up to ``timeout`` s for the first. ``[]`` on timeout or close."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            if self.policy == "block":
                out = [self._items.popleft() for _ in range(min(max_n, len(self._items)))]
                self._images -= sum(m.is_image for m in out)
                self._bytes -= sum(m.nbytes for m in out)
                skipped = 0
            else:
                out, skipped = self._take_latest()
            self._cond.notify_all()
        if skipped:
            self.on_skip(skipped)
        return out

    def _take_latest(self) -> tuple[list[RawMessage], int]:
        items = list(self._items)
        self._items.clear()
        self._images = 0
        self._bytes = 0
        newest = max((i for i, m in enumerate(items) if m.is_image), default=-1)
        out = [m for i, m in enumerate(items) if not m.is_image or i == newest]
        if newest >= 0:
            items[newest].skipped_before = sum(m.skipped_before + 1 for m in items[:newest] if m.is_image) + \
                items[newest].skipped_before
        return out, len(items) - len(out)

    def _drop_oldest_image(self, incoming: RawMessage) -> int:
        images = [i for i, m in enumerate(self._items) if m.is_image]
        if not images:
            return 0
        dropped = self._items[images[0]]
        successor = self._items[images[1]] if len(images) > 1 else incoming
        successor.skipped_before += dropped.skipped_before + 1
        del self._items[images[0]]
        self._images -= 1
        self._bytes -= dropped.nbytes
        return 1
