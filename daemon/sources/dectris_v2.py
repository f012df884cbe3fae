"""DECTRIS stream v2 ("stream2"): one single-part CBOR message per start / image / end; also the
image stream of PSI's Jungfraujoch, which follows the same specification.

Spec: ``dectris/documentation`` ``stream_v2/README.md`` and ``cbor/dectris-compression-tag.md``;
Jungfraujoch ``docs/CBOR.md`` (extra message types and fields are ignored, ``bszstd`` accepted).

- Messages are CBOR maps (self-described prefix tag 55799, stripped by cbor2) with ``type``
  ``start`` (``series_id``, ``series_unique_id``, ``image_dtype``, ``image_size_x``/``_y``,
  ``number_of_images``, ``channels``, ``user_data``, ...), ``image`` (``series_id``, ``image_id``,
  ``data``: channel -> array) and ``end``.
- An array is tag 40 (row-major; 1040 column-major) ``[dims, typed_array]``; dims are
  ``[height, width]`` (numpy order). The typed array is an RFC 8746 tag (64 u8, 69 u16le, 70 u32le,
  85 f32le, ...) around a byte string, or around tag 56500 ``[algorithm, elem_size, bytes]`` with
  ``bslz4`` / ``lz4`` / ``bszstd`` in HDF5-filter framing.

Decoding is two-step so that nothing is decompressed before its declared size is known: cbor2's
tag hook (called innermost first, cbor2 >= 6 signature ``hook(tag, immutable)``) only wraps the
tagged values; :func:`decode_array` then checks dims and dtype and decompresses into exactly
``prod(dims) * itemsize`` bytes. cbor2's ``max_depth`` bounds nesting.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cbor2
import numpy as np

from ..frames import Frame, FrameDecodeError, SeriesEnd, SeriesStart, as_array, frame_shape
from .codecs import decompress_framed
from .frame_decoder import Buffer, FrameDecoder, Item, int_field, run_uid_hint

MAX_DEPTH = 32
"""Deepest CBOR nesting accepted (real messages are about 6 deep)."""

#: RFC 8746 typed-array tags -> numpy dtype.
TYPED_ARRAY_TAGS: dict[int, np.dtype] = {
    tag: np.dtype(descr) for tag, descr in {
        64: "u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "u1", 69: "<u2", 70: "<u4", 71: "<u8",
        72: "i1", 73: ">i2", 74: ">i4", 75: ">i8", 77: "<i2", 78: "<i4", 79: "<i8",
        80: ">f2", 81: ">f4", 82: ">f8", 84: "<f2", 85: "<f4", 86: "<f8",
    }.items()
}
COMPRESSION_TAG = 56500
ROW_MAJOR, COLUMN_MAJOR = 40, 1040
_SCALARS = (int, float, str, bool)


class Compressed:
    """Tag 56500 content: ``[algorithm, elem_size, bytes]``."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


class TypedArray:
    __slots__ = ("dtype", "payload")

    def __init__(self, dtype: np.dtype, payload: Any):
        self.dtype, self.payload = dtype, payload


class MultiDimArray:
    __slots__ = ("order", "value")

    def __init__(self, order: str, value: Any):
        self.order, self.value = order, value


def _tag_hook(tag: cbor2.CBORTag, *_: Any) -> Any:
    t = tag.tag
    if t == COMPRESSION_TAG:
        return Compressed(tag.value)
    if t in TYPED_ARRAY_TAGS:
        return TypedArray(TYPED_ARRAY_TAGS[t], tag.value)
    if t in (ROW_MAJOR, COLUMN_MAJOR):
        return MultiDimArray("C" if t == ROW_MAJOR else "F", tag.value)
    return tag


def decode_array(value: Any, max_bytes: int) -> np.ndarray:
    """Decode a stream-v2 MultiDimArray (tag 40/1040 wrapping a typed array) into a C-ordered,
    native-endian ndarray of shape ``dims``.

    Raises:
        FrameDecodeError: ``bad_array`` (not a tag-40 ``[dims, typed array]``), ``bad_shape``,
            ``oversized``, ``unknown_compression``, ``decompressed_size``, ``corrupt_compressed``,
            ``size_mismatch``.
    """
    if not isinstance(value, MultiDimArray) or not isinstance(value.value, Sequence) or len(value.value) != 2:
        raise FrameDecodeError("bad_array", "image channel is not a tag-40 [dims, typed array]")
    dims, typed = value.value
    if not isinstance(typed, TypedArray):
        raise FrameDecodeError("unknown_dtype", "array payload is not an RFC 8746 typed array")
    shape = frame_shape(list(dims) if isinstance(dims, Sequence) else dims, max_bytes, typed.dtype.itemsize)
    nbytes = math.prod(shape) * typed.dtype.itemsize
    payload = typed.payload
    if isinstance(payload, Compressed):
        c = payload.value
        if not (isinstance(c, Sequence) and len(c) == 3 and isinstance(c[0], str) and isinstance(c[1], int)
                and isinstance(c[2], bytes)):
            raise FrameDecodeError("bad_array", "compression tag 56500 is not [algorithm, elem_size, bytes]")
        payload = decompress_framed(c[2], c[0], c[1], nbytes)
    elif not isinstance(payload, bytes):
        raise FrameDecodeError("bad_array", "typed array does not wrap a byte string")
    if value.order == "F":
        arr = as_array(payload, typed.dtype, shape[::-1]).T
        return np.ascontiguousarray(arr)
    return as_array(payload, typed.dtype, shape)


class DectrisV2Decoder(FrameDecoder):
    """Decoder of one DECTRIS stream v2 (or Jungfraujoch) connection.

    Args:
        max_frame_bytes: largest decoded frame accepted.
        channel: image channel to analyse (e.g. ``"threshold_1"``); default the start message's
            first channel, or the first channel of each image when no start was seen.
    """

    format = "dectris-v2"

    def __init__(self, max_frame_bytes: int, channel: str | None = None):
        super().__init__(max_frame_bytes)
        self.channel = channel
        self._channel: str | None = channel

    @staticmethod
    def is_image(parts: Sequence[Buffer]) -> bool:
        return len(parts) == 1 and b"\x65image" in bytes(parts[0][:48])

    def decode(self, parts: Sequence[Buffer]) -> list[Item]:
        if len(parts) != 1:
            raise FrameDecodeError("wrong_part_count", f"stream v2 messages have 1 part, got {len(parts)}")
        try:
            msg = cbor2.loads(parts[0], tag_hook=_tag_hook, max_depth=MAX_DEPTH)
        except RecursionError:
            raise FrameDecodeError("too_deep", "CBOR nested too deeply") from None
        except cbor2.CBORDecodeError as exc:
            reason = "too_deep" if "depth" in str(exc) else "invalid_cbor"
            raise FrameDecodeError(reason, f"invalid CBOR: {exc}"[:200]) from None
        except Exception as exc:  # cbor2 may raise other errors for hostile bytes (e.g. bad tag contents)
            raise FrameDecodeError("invalid_cbor", f"CBOR does not decode: {type(exc).__name__}: {exc}"[:200]) from None
        if not isinstance(msg, Mapping) or not isinstance(msg.get("type"), str):
            raise FrameDecodeError("bad_header", "stream v2 message is not a map with a text 'type'")
        kind = msg["type"]
        if kind == "image":
            return self._image(msg)
        if kind == "start":
            return self._start(msg)
        if kind == "end":
            self._series = None
            return [SeriesEnd(self._series_id(msg))]
        return []  # Jungfraujoch 'calibration' / 'metadata' and future message types

    @staticmethod
    def _series_id(msg: Mapping[str, Any]) -> str:
        uid = msg.get("series_unique_id")
        if isinstance(uid, str) and 0 < len(uid) <= 128:
            return uid
        return str(int_field(msg, "series_id", "stream v2 message"))

    def _start(self, msg: Mapping[str, Any]) -> list[Item]:
        series = self._series_id(msg)
        dtype = msg.get("image_dtype")
        if dtype not in ("uint8", "uint16", "uint32", "int32", "float32"):
            raise FrameDecodeError("unknown_dtype", f"image_dtype {str(dtype)[:32]!r} is not a stream v2 pixel type")
        shape = frame_shape([msg.get("image_size_y"), msg.get("image_size_x")], self.max_frame_bytes,
                            np.dtype(dtype).itemsize)
        channels = msg.get("channels")
        channels = [c for c in channels if isinstance(c, str)] if isinstance(channels, Sequence) else []
        if self.channel is not None and channels and self.channel not in channels:
            raise FrameDecodeError("unknown_channel", f"channel {self.channel!r} not among {channels}")
        self._channel = self.channel or (channels[0] if channels else None)
        n = msg.get("number_of_images")
        meta = {"format": self.format, "channel": self._channel, "channels": channels,
                **{k: v for k, v in msg.items() if isinstance(v, _SCALARS)}}
        self._begin_series(series)
        return [SeriesStart(series, shape, dtype, n if isinstance(n, int) and n > 0 else None, meta,
                            run_uid_hint(msg.get("user_data")))]

    def _image(self, msg: Mapping[str, Any]) -> list[Item]:
        series = self._series_id(msg)
        number = int_field(msg, "image_id", "image")
        data = msg.get("data")
        if not isinstance(data, Mapping) or not data:
            raise FrameDecodeError("bad_array", "image message has no data map")
        channel = self._channel if self._channel in data else None
        if channel is None:
            if self._channel is not None:
                raise FrameDecodeError("unknown_channel", f"image has no channel {self._channel!r}")
            channel = next(iter(data))
        arr = decode_array(data[channel], self.max_frame_bytes)
        out: list[Item] = []
        if self._unknown_series(series):  # joined mid-series, or the start was lost
            self._begin_series(series)
            out.append(SeriesStart(series, arr.shape, arr.dtype.name, None,
                                   {"format": self.format, "channel": channel, "joined_midway": True}))
        out.append(Frame(series, number, arr))
        return out
