"""PSI ``array-1.0`` (JSON header + raw array), also accepting pyzmq's ``send_array`` recipe.

Spec: ``paulscherrerinstitute/htypes`` ``array-1.0.md``: two parts, a JSON header
``{"htype": "array-1.0", "shape": [..., y, x], "type": "uint16", "frame": 0}`` (optional
``endianness`` (or ``endianess``) ``big|little``, ``encoding``, ``source``, ``timeStamp``,
``ndattr``) and the raw array. Producers: EPICS areaDetector ``NDPluginZMQ`` (ADZMQ; before 1.4.0 it
sent ``htype`` as a list and ``shape`` fastest-first, hence the per-source ``shape_order``), PSI
std_daq live streams, and the pyzmq documentation's ``send_array`` (header ``{"dtype", "shape"}``,
no ``htype``).

The format has no series messages: a series starts with the first frame, and a new one whenever the
frame number goes backwards or the shape, type or ``source`` changes. Its id is ``<n>``, counting
from 1 in this daemon, prefixed by the header's ``source`` when set (``cam1-3``). Compressed arrays (``encoding`` other than ``""``/
``"raw"``) are rejected as ``unsupported_encoding``; an empty data part (a std_daq header-only
frame) as ``empty_data``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from ..frames import FRAME_DTYPES, Frame, FrameDecodeError, SeriesEnd, SeriesStart, as_array, frame_dtype, frame_shape
from .frame_decoder import Buffer, FrameDecoder, Item, load_json

ShapeOrder = Literal["numpy", "xy"]


def dtype_of(header: dict) -> np.dtype:
    """Pixel dtype from ``type`` (array-1.0) or ``dtype`` (``send_array``: ``str(a.dtype)``, which may
    also be a numpy descr such as ``"<u2"``), in the header's ``endianness``.

    Raises:
        FrameDecodeError: ``unknown_dtype``.
    """
    name = header.get("type", header.get("dtype"))
    order = header.get("endianness", header.get("endianess", "little"))
    if order not in ("little", "big"):
        raise FrameDecodeError("bad_header", f"endianness {str(order)[:16]!r} is not little or big")
    byteorder = "<" if order == "little" else ">"
    if isinstance(name, str) and name not in FRAME_DTYPES and 2 <= len(name) <= 4 and name[0] in "<>|=":
        try:
            descr = np.dtype(name)
        except TypeError:
            descr = None
        if descr is not None and descr.name in FRAME_DTYPES:
            return frame_dtype(descr.name, descr.byteorder if descr.byteorder in "<>" else "=")
    return frame_dtype(name, byteorder)


PER_FRAME_KEYS = frozenset({"htype", "shape", "type", "dtype", "frame", "timeStamp", "encoding", "endianness"})


def series_meta(head: dict) -> dict:
    """The header's scalar fields that describe the series rather than one frame (``source``,
    ``series_id``, ``frame_time_s``, ...), for :attr:`SeriesInfo.meta`; long strings are cut."""
    meta = {}
    for key, value in list(head.items())[:64]:
        if key in PER_FRAME_KEYS or not isinstance(key, str):
            continue
        if isinstance(value, str):
            meta[key[:64]] = value[:256]
        elif isinstance(value, (int, float, bool)) or value is None:
            meta[key[:64]] = value
    return meta


class Array10Decoder(FrameDecoder):
    """Decoder of one array-1.0 / ``send_array`` stream.

    Args:
        max_frame_bytes: largest frame accepted.
        shape_order: ``"numpy"`` (spec: slowest axis first) or ``"xy"`` (fastest first: ADZMQ before
            1.4.0, bsread-style producers); 2-D shapes cannot be told apart from sizes alone.
    """

    format = "array-1.0"

    def __init__(self, max_frame_bytes: int, shape_order: ShapeOrder = "numpy"):
        super().__init__(max_frame_bytes)
        self.shape_order = shape_order
        self._count = 0
        self._key: tuple | None = None
        self._last = -1

    def decode(self, parts: Sequence[Buffer]) -> list[Item]:
        if len(parts) != 2:
            raise FrameDecodeError("wrong_part_count", f"array-1.0 messages have 2 parts, got {len(parts)}")
        head = load_json(parts[0], "array header")
        htype = head.get("htype")
        if isinstance(htype, list) and len(htype) == 1:
            htype = htype[0]
        if htype is None and "dtype" not in head:
            raise FrameDecodeError("unknown_htype", "header has neither htype nor dtype")
        if htype is not None and htype != "array-1.0":
            raise FrameDecodeError("unknown_htype", f"htype {str(htype)[:32]!r} is not array-1.0")
        if head.get("encoding", "") not in ("", "raw", None):
            raise FrameDecodeError("unsupported_encoding", f"encoding {str(head.get('encoding'))[:32]!r} is not raw")
        dtype = dtype_of(head)
        raw_shape = head.get("shape")
        if self.shape_order == "xy" and isinstance(raw_shape, list):
            raw_shape = raw_shape[::-1]
        shape = frame_shape(raw_shape, self.max_frame_bytes, dtype.itemsize)
        if len(parts[1]) == 0:
            raise FrameDecodeError("empty_data", "header-only frame (empty data part)")
        number = head.get("frame")
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            number = self._last + 1
        arr = as_array(parts[1], dtype, shape)
        out: list[Item] = []
        key = (shape, arr.dtype.name, head.get("source"), head.get("series_id"))
        if self._series is None or key != self._key or number < self._last:
            if self._series is not None:
                out.append(SeriesEnd(self._series))
            self._count += 1
            source = head.get("source")
            self._series = f"{source[:64]}-{self._count}" if isinstance(source, str) and source else str(self._count)
            self._key = key
            expected = head.get("number_frames_expected")
            n_frames = expected if isinstance(expected, int) and not isinstance(expected, bool) and expected > 0 else None
            out.append(SeriesStart(self._series, shape, arr.dtype.name, n_frames,
                                   {**series_meta(head), "format": self.format, "htype": htype or "send_array"},
                                   has_end=False))
        self._last = number
        out.append(Frame(self._series, number, arr))
        return out
