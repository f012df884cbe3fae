"""Bounds on what senders declare: numbers from the wire, message rates and memory.

Every number that arrives from the network (event ``seq_num``, RunStop ``num_events``, frame
numbers, ``nimages`` x ``ntrigger``, ``number_of_images``, RunStart ``shape``) is hostile until
checked here, before it sizes an allocation, names a file or adds to a counter. Both the Bluesky
document path (:mod:`beamlens.daemon.router`) and the frame path (:mod:`beamlens.daemon.frame_router`,
:mod:`beamlens.daemon.sources.frame_zmq`) use these checks, so the two agree on what is absurd.

- :func:`wire_index`: an integer in ``[lo, MAX_WIRE_INDEX]`` (int64-safe), else None.
- :class:`TokenBucket`: ``rate`` per second with a ``burst``; RunStarts and series starts per source.
- :func:`nav_bytes_per_point`, :func:`fixed_bytes`: what a consumer's declared result buffers cost,
  so that the memory budget is checked before anything is allocated.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAX_WIRE_INDEX = 2**40
"""Largest seq_num, frame number or announced count accepted (1.1e12: a 10 MHz detector needs 30 h
to reach it; far inside int64, so sums of a few of them cannot overflow)."""

MIB = 2**20


def wire_index(value: Any, lo: int = 0, hi: int = MAX_WIRE_INDEX) -> int | None:
    """``value`` as a Python int if it is an integer (not bool; numpy ints accepted) in
    ``[lo, hi]``, else None. Never raises (bignums, NaN, strings, None all give None)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        v = int(value)
        return v if lo <= v <= hi else None
    return None


def wire_shape(value: Any, max_points: int) -> tuple[int, ...] | None:
    """A declared scan shape (RunStart ``shape``): 1 to 8 positive ints whose product is at most
    ``max_points``, else None."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or not 1 <= len(value) <= 8:
        return None
    dims = [wire_index(n, 1, max_points) for n in value]
    if any(d is None for d in dims) or math.prod(dims) > max_points:
        return None
    return tuple(dims)


def checked_seq_nums(seq_nums: Iterable[Any], hi: int) -> tuple[list[int], list[int]]:
    """Split a page's ``seq_num`` list into (indices of valid entries, their values); a valid
    seq_num is an int in ``[1, hi]``."""
    if type(seq_nums) is list and seq_nums and all(type(s) is int for s in seq_nums) \
            and min(seq_nums) >= 1 and max(seq_nums) <= hi:  # the usual page: all plain ints in range
        return list(range(len(seq_nums))), list(seq_nums)
    keep, values = [], []
    for i, s in enumerate(seq_nums):
        v = wire_index(s, 1, hi)
        if v is not None:
            keep.append(i)
            values.append(v)
    return keep, values


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up (a rate of 0 disables the limit).

    Args:
        rate: tokens added per second.
        burst: bucket size (and the initial fill).
    """

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._tokens = self.burst
        self._t = -float("inf")

    def take(self, now: float | None = None) -> bool:
        """Take one token; False when none is left (the caller refuses and counts).

        Args:
            now: the time of the event, s (default ``time.monotonic()``); pass a message's receive
                time so that the rate is that of arrival, not of processing. One bucket must be fed
                one clock.
        """
        if self.rate <= 0:
            return True
        if now is None:
            now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._t) * self.rate)
        self._t = max(self._t, now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Buckets:
    """One :class:`TokenBucket` per key (a source name), at most ``max_keys`` keys."""

    def __init__(self, rate: float, burst: float, max_keys: int = 256):
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, now: float | None = None) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.pop(next(iter(self._buckets)))
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.take(now)


def nav_bytes_per_point(specs: Mapping[str, Any]) -> int:
    """Bytes one scan point costs in a consumer's ``nav`` buffers (``BufferSpec`` objects)."""
    return sum(np.dtype(s.dtype).itemsize * math.prod(s.extra_shape) for s in specs.values() if s.kind == "nav")


def fixed_bytes(specs: Mapping[str, Any]) -> int:
    """Bytes of a consumer's ``sig`` and ``single`` buffers (independent of the scan length)."""
    return sum(np.dtype(s.dtype).itemsize * math.prod(s.extra_shape) for s in specs.values() if s.kind != "nav")


def arrays_bytes(arrays: Iterable[np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in arrays)


_SAFE_STEM = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")


def safe_stem(identifier: str) -> str:
    """A file-name stem for an identifier from the wire (a run uid, a scan id): the identifier
    itself when it is 1 to 100 of ``[A-Za-z0-9._-]`` not starting with a dot (bluesky's uuid4 uids
    always are), else ``h-`` + the first 32 hex digits of its SHA-256. Never a path: no separator,
    no ``..``, no NUL, never empty."""
    if _SAFE_STEM.match(identifier) and ".." not in identifier:
        return identifier
    return "h-" + hashlib.sha256(identifier.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def inside(directory: Path, name: str) -> Path:
    """``directory / name``, checked to be a direct child of ``directory``.

    Raises:
        ValueError: ``name`` would leave the directory (a separator, ``..``, an absolute path).
    """
    path = directory / name
    if os.sep in name or (os.altsep and os.altsep in name) or name in ("", ".", "..") or \
            path.resolve().parent != directory.resolve():
        raise ValueError(f"file name {name[:64]!r} would leave {directory}")
    return path
