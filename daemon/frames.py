"""What frame decoders produce, whatever the wire format: series start, frames, series end.

A decoder (one per format, in :mod:`beamlens.daemon.sources`) turns one 0MQ message into zero or
more of these items; the frame source batches frames of one series into :class:`FrameBatch` and
hands everything, in order, to the router.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .documents import DecodeError

#: Pixel types a frame may have on the wire (DECTRIS: u8/u16/u32; array-1.0 adds the rest).
FRAME_DTYPES = frozenset(
    ["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32", "float64"])


class FrameDecodeError(DecodeError):
    """A frame message that cannot be decoded; ``reason`` is the metric label
    (``beamlens_frame_decode_errors_total{reason=...}``)."""


@dataclass(slots=True)
class SeriesStart:
    """A detector series (acquisition) begins.

    Attributes:
        series_id: the detector's series id as a string (DECTRIS ``series``/``series_unique_id``).
        sig_shape: frame shape in numpy order ``(rows, cols)``, px; ``None`` until the first frame
            tells it (DECTRIS v1 with ``header_detail: none``).
        dtype: wire pixel type, or ``None`` when not announced.
        n_frames: frames announced (``nimages * ntrigger``; v2 ``number_of_images``), else None.
        meta: the series header (JSON-like).
        run_uid: a Bluesky RunStart uid the sender put in the header appendix / ``user_data``
            (key ``bluesky_run_uid``), if any.
        has_end: whether the format announces the series end (DECTRIS: yes; array-1.0: no). A
            RunStop waits for the end of an attached series only when one will come.
    """

    series_id: str
    sig_shape: tuple[int, ...] | None = None
    dtype: str | None = None
    n_frames: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    run_uid: str | None = None
    has_end: bool = True


@dataclass(slots=True)
class Frame:
    """One decoded frame: ``data`` is ``sig_shape`` in the wire dtype; ``number`` counts from 0."""

    series_id: str
    number: int
    data: np.ndarray


@dataclass(slots=True)
class SeriesEnd:
    series_id: str


@dataclass(slots=True)
class FrameBatch:
    """Consecutive frames of one series, as the router receives them.

    Attributes:
        source: frame source name.
        series_id: the series they belong to.
        numbers: int64 ``(n,)`` frame numbers (0-based).
        data: ``(n, *sig_shape)`` frames in the wire dtype.
        received: ``time.time()`` at which the newest frame's message was received, s.
        release: to call once the batch has been processed (returns the source's credit).
    """

    source: str
    series_id: str
    numbers: np.ndarray
    data: np.ndarray
    received: float
    release: Callable[[], None] = lambda: None


@dataclass(slots=True)
class FrameBarrier:
    """Sent by a frame source once everything it had received when the barrier was requested has
    been handed to the router (see :meth:`FrameSource.request_barrier`)."""

    source: str
    token: str


@dataclass(slots=True)
class SeriesEvent:
    """A series start or end, tagged with its source, as the router receives it."""

    source: str
    item: SeriesStart | SeriesEnd
    received: float


def frame_dtype(name: object, byteorder: str = "<") -> np.dtype:
    """The numpy dtype of a wire pixel type name (``"uint16"``), in the given byte order.

    Raises:
        FrameDecodeError: ``unknown_dtype`` for anything outside :data:`FRAME_DTYPES`.
    """
    if not isinstance(name, str) or name not in FRAME_DTYPES:
        raise FrameDecodeError("unknown_dtype", f"pixel type {str(name)[:32]!r} is not one of {sorted(FRAME_DTYPES)}")
    return np.dtype(name).newbyteorder(byteorder)


def frame_shape(value: object, max_bytes: int, itemsize: int) -> tuple[int, ...]:
    """Validate a declared frame shape (numpy order): 1 to 3 positive ints, at most ``max_bytes``.

    Raises:
        FrameDecodeError: ``bad_shape`` or ``oversized``.
    """
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 3 or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value):
        raise FrameDecodeError("bad_shape", f"frame shape {str(value)[:64]} is not 1 to 3 positive integers")
    nbytes = int(np.prod(value, dtype=np.float64)) * itemsize
    if nbytes > max_bytes:
        raise FrameDecodeError("oversized", f"frame of shape {tuple(value)} ({nbytes} bytes) exceeds the {max_bytes}-byte limit")
    return tuple(value)


def as_array(buffer: bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Wrap a buffer (zero-copy) as a native-order array of ``shape``.

    Raises:
        FrameDecodeError: ``size_mismatch`` when the buffer is not exactly ``prod(shape) * itemsize``.
    """
    n = int(np.prod(shape)) * dtype.itemsize
    size = buffer.nbytes if isinstance(buffer, memoryview) else len(buffer)
    if size != n:
        raise FrameDecodeError("size_mismatch", f"{size} data bytes where shape {shape} of {dtype.name} needs {n}")
    arr = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))
