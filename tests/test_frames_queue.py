"""The frame queue's overflow policies: block waits, latest keeps the newest image and counts the rest,
series control messages are never dropped."""
from __future__ import annotations

import threading

from beamlens.daemon.sources.frame_queue import FrameQueue, RawMessage


def msg(tag: str, image: bool = True) -> RawMessage:
    return RawMessage([tag.encode()], image, 0.0)


def test_latest_keeps_controls_and_newest_image_and_counts_the_rest():
    skipped = []
    q = FrameQueue(3, "latest", skipped.append)
    for m in [msg("f0"), msg("f1"), msg("end", False), msg("start", False), msg("g0"), msg("g1"), msg("g2"), msg("g3")]:
        assert q.put(m)
    assert sum(skipped) == 3  # f0, f1, g0 pushed out by g1..g3 (3 images at most)
    got = q.get_batch(100, timeout=0)
    assert [m.parts[0] for m in got] == [b"end", b"start", b"g3"]
    assert sum(skipped) == 5  # and g1, g2 skipped at hand-over: 6 images in, 1 out, 5 counted
    assert got[-1].skipped_before == 5  # the delivered image knows how many were skipped before it
    assert len(q) == 0


def test_block_waits_for_room_and_loses_nothing():
    q = FrameQueue(2, "block")
    received: list[bytes] = []

    def consume() -> None:
        while len(received) < 50:
            received.extend(m.parts[0] for m in q.get_batch(3, timeout=1))

    t = threading.Thread(target=consume)
    t.start()
    for i in range(50):
        assert q.put(msg(str(i)))
        assert len(q) <= 2
    t.join(10)
    assert received == [str(i).encode() for i in range(50)]


def test_blocked_put_gives_up_when_aborted():
    q = FrameQueue(1, "block")
    q.put(msg("a"))
    assert q.put(msg("b"), abort=lambda: True) is False
    assert len(q) == 1
