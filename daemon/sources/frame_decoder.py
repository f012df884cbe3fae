"""The interface every frame-format decoder implements, and the JSON helpers they share.

A decoder is stateful per source (it remembers the current series) and is only ever called from
the source's one decode thread. :meth:`FrameDecoder.decode` turns one 0MQ message (its parts, as
zero-copy buffers) into :class:`~beamlens.daemon.frames.SeriesStart` / ``Frame`` / ``SeriesEnd``
items or raises :class:`~beamlens.daemon.frames.FrameDecodeError` with a reason.
:meth:`FrameDecoder.is_image` classifies a message without decoding it, so the ``latest`` overflow
policy can skip images cheaply while never skipping a series start or end.
"""
from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar

from ..frames import Frame, FrameDecodeError, SeriesEnd, SeriesStart

Buffer = bytes | memoryview
Item = SeriesStart | Frame | SeriesEnd

MAX_HEADER_BYTES = 4 * 2**20
"""Largest JSON header part parsed (a SIMPLON detector config is ~10 kB)."""
RECENT_SERIES = 16
"""Series ids remembered per source, so that a late frame of an earlier series is passed on as stale
(and counted by the router) rather than taken for a new series whose start was lost."""


class FrameDecoder:
    """Base class of the per-format decoders.

    Args:
        max_frame_bytes: largest decoded frame accepted (declared shape x itemsize), bytes.
    """

    format: ClassVar[str] = ""

    def __init__(self, max_frame_bytes: int):
        self.max_frame_bytes = max_frame_bytes
        self._series: str | None = None
        self._known: deque[str] = deque(maxlen=RECENT_SERIES)

    def _begin_series(self, series: str) -> None:
        """Make ``series`` the current one (and remember it)."""
        self._series = series
        self._known.append(series)

    def _unknown_series(self, series: str) -> bool:
        """True for a frame of a series never announced here: the sender's start was lost or the
        daemon joined mid-series. False for the current series or a recent one (stale frames)."""
        return self._series != series and series not in self._known

    @staticmethod
    def is_image(parts: Sequence[Buffer]) -> bool:
        """True when the message carries a frame (may be skipped by the ``latest`` policy)."""
        return True

    def decode(self, parts: Sequence[Buffer]) -> list[Item]:  # pragma: no cover - interface
        raise NotImplementedError


def load_json(buffer: Buffer, what: str) -> dict[str, Any]:
    """Parse one JSON object part.

    Raises:
        FrameDecodeError: ``oversized`` (over :data:`MAX_HEADER_BYTES`), ``too_deep`` (nesting that
            exhausts the parser's recursion: ``json.loads("[" * 100000)`` raises RecursionError, not
            ValueError), ``invalid_json`` (not UTF-8 JSON, or not an object).
    """
    if len(buffer) > MAX_HEADER_BYTES:
        raise FrameDecodeError("oversized", f"{what} of {len(buffer)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        obj = json.loads(bytes(buffer))
    except RecursionError:
        raise FrameDecodeError("too_deep", f"{what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FrameDecodeError("invalid_json", f"{what} is not JSON: {exc}"[:200]) from None
    if not isinstance(obj, dict):
        raise FrameDecodeError("invalid_json", f"{what} is a JSON {type(obj).__name__}, not an object")
    return obj


def int_field(obj: Any, key: str, what: str, default: int | None = None) -> int:
    """``obj[key]`` as a non-negative int (``default`` when absent and a default is given).

    Raises:
        FrameDecodeError: ``bad_header`` when missing (without default), not an int, or negative.
    """
    value = obj.get(key, default) if hasattr(obj, "get") else None
    if value is None and default is not None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FrameDecodeError("bad_header", f"{what} field {key!r} is {str(value)[:32]}, not a non-negative integer")
    return value


def run_uid_hint(user_data: Any) -> str | None:
    """A Bluesky run uid the sender attached to the series (``{"bluesky_run_uid": ...}`` as the
    DECTRIS header appendix / stream v2 ``user_data``), else None."""
    if hasattr(user_data, "get"):
        uid = user_data.get("bluesky_run_uid")
        if isinstance(uid, str) and 0 < len(uid) <= 128:
            return uid
    return None
