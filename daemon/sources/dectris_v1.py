"""DECTRIS SIMPLON stream interface v1 ("legacy"): JSON multipart messages keyed by ``htype``.

Spec: DECTRIS SIMPLON API Reference v1.8 §5.4.3 (copy in ``areaDetector/ADEiger``,
``docs/ADEiger/simplon_apireference_v1p8.pdf``); behaviour cross-checked against ADEiger's
``streamApi.cpp`` and LiberTEM-rs ``libertem_dectris``. Part by part:

- ``dheader-1.0`` (on arm): 1 part (``header_detail: none``), 2 (``basic``: + detector config JSON),
  8 (``all``: + flatfield, pixel mask, countrate table, each a JSON header and a blob), + optional
  appendix part (accepted after any detail level; a JSON object with ``bluesky_run_uid`` ties the
  series to a run);
- ``dimage-1.0`` (per image): ``{"series", "frame", "hash"}``, ``dimage_d-1.0``
  ``{"shape": [x, y], "type", "encoding", "size"}``, the blob, ``dconfig-1.0`` times (ns), + optional
  appendix. ``shape`` is fastest axis first, so the numpy shape is ``shape[::-1]``;
- ``dseries_end-1.0``: ``{"series"}``.

Encodings (grammar ``[bs<BIT>][[-]lz4][<|>]``): ``<``/``>`` raw, ``lz4<`` raw LZ4 block (no
framing), ``bs8/16/32-lz4<`` bitshuffle+LZ4 in HDF5-filter framing with element size BIT/8.
The series start is emitted with the first image, whose ``dimage_d`` gives the frame shape and
type (with ``header_detail: none`` the header has neither).
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

from ..frames import Frame, FrameDecodeError, SeriesEnd, SeriesStart, as_array, frame_dtype, frame_shape
from .codecs import decompress_framed, decompress_lz4_block
from .frame_decoder import Buffer, FrameDecoder, Item, int_field, load_json, run_uid_hint

HEADER_PARTS = {"none": 1, "basic": 2, "all": 8}
IMAGE_PARTS = 4
_ENCODING = re.compile(r"^(?:bs(8|16|32|64)-?)?(lz4)?([<>])$")


def parse_encoding(encoding: object) -> tuple[int | None, bool, str]:
    """``(bitshuffle element bits or None, lz4?, byte order)`` of a v1 ``encoding`` string.

    Raises:
        FrameDecodeError: ``unsupported_encoding`` (including bitshuffle without LZ4).
    """
    m = _ENCODING.match(encoding) if isinstance(encoding, str) else None
    if m is None or (m.group(1) and not m.group(2)):
        raise FrameDecodeError("unsupported_encoding", f"encoding {str(encoding)[:32]!r} is not [bs<BIT>][-lz4](<|>)")
    return (int(m.group(1)) if m.group(1) else None), bool(m.group(2)), m.group(3)


class DectrisV1Decoder(FrameDecoder):
    """Decoder of one DECTRIS stream v1 connection.

    Args:
        max_frame_bytes: largest decoded frame accepted.
        verify_hash: check each blob's MD5 against the ``dimage-1.0`` ``hash`` (costs ~1 ms/MB).
    """

    format = "dectris-v1"

    def __init__(self, max_frame_bytes: int, verify_hash: bool = False):
        super().__init__(max_frame_bytes)
        self.verify_hash = verify_hash
        self._pending: SeriesStart | None = None

    @staticmethod
    def is_image(parts: Sequence[Buffer]) -> bool:
        return len(parts) >= IMAGE_PARTS and b'"dimage-' in bytes(parts[0][:64])

    def decode(self, parts: Sequence[Buffer]) -> list[Item]:
        if not parts:
            raise FrameDecodeError("wrong_part_count", "empty message")
        head = load_json(parts[0], "first part")
        htype = head.get("htype")
        if not isinstance(htype, str):
            raise FrameDecodeError("unknown_htype", "first part has no htype")
        if htype.startswith("dheader-"):
            return self._header(head, parts)
        if htype.startswith("dimage-"):
            return self._image(head, parts)
        if htype.startswith("dseries_end-"):
            series = str(int_field(head, "series", "dseries_end"))
            self._series, self._pending = None, None
            return [SeriesEnd(series)]
        raise FrameDecodeError("unknown_htype", f"htype {htype[:32]!r} is not a stream v1 message")

    def _header(self, head: dict, parts: Sequence[Buffer]) -> list[Item]:
        series = str(int_field(head, "series", "dheader"))
        detail = head.get("header_detail", "basic")
        if detail not in HEADER_PARTS:
            raise FrameDecodeError("bad_header", f"header_detail {str(detail)[:16]!r} is not none/basic/all")
        expected = HEADER_PARTS[detail]
        if len(parts) not in (expected, expected + 1):
            raise FrameDecodeError("wrong_part_count", f"dheader with detail {detail} has {len(parts)} parts, expected {expected} (+1 appendix)")
        config = load_json(parts[1], "detector config") if expected >= 2 else {}
        n_frames = None
        nimages, ntrigger = config.get("nimages"), config.get("ntrigger", 1)
        if isinstance(nimages, int) and isinstance(ntrigger, int) and nimages > 0 and ntrigger > 0:
            n_frames = nimages * ntrigger
        run_uid = None
        if len(parts) == expected + 1:
            try:
                run_uid = run_uid_hint(load_json(parts[-1], "header appendix"))
            except FrameDecodeError:
                run_uid = None  # the appendix is free-form user content
        meta = {"format": self.format, "header_detail": detail,
                "config": {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}}
        self._begin_series(series)
        self._pending = SeriesStart(series, None, None, n_frames, meta, run_uid)
        return []

    def _image(self, head: dict, parts: Sequence[Buffer]) -> list[Item]:
        if len(parts) not in (IMAGE_PARTS, IMAGE_PARTS + 1):
            raise FrameDecodeError("wrong_part_count", f"dimage message has {len(parts)} parts, expected 4 (+1 appendix)")
        series = str(int_field(head, "series", "dimage"))
        number = int_field(head, "frame", "dimage")
        d = load_json(parts[1], "dimage_d part")
        if not str(d.get("htype", "")).startswith("dimage_d-"):
            raise FrameDecodeError("bad_header", "second part of an image is not dimage_d")
        bits, lz4, order = parse_encoding(d.get("encoding"))
        dtype = frame_dtype(d.get("type"), order)
        raw_shape = d.get("shape")
        shape = frame_shape(list(reversed(raw_shape)) if isinstance(raw_shape, list) else raw_shape,
                            self.max_frame_bytes, dtype.itemsize)
        blob = parts[2]
        if int_field(d, "size", "dimage_d", default=len(blob)) != len(blob):
            raise FrameDecodeError("size_mismatch", f"dimage_d declares size {d.get('size')} for a {len(blob)}-byte blob")
        if self.verify_hash and head.get("hash") != hashlib.md5(blob).hexdigest():
            raise FrameDecodeError("hash_mismatch", f"MD5 of frame {number} does not match its header")
        nbytes = dtype.itemsize * math.prod(shape)
        if bits is not None:
            data = decompress_framed(blob, "bslz4", bits // 8, nbytes)
        elif lz4:
            data = decompress_lz4_block(blob, nbytes)
        else:
            data = blob
        frame = Frame(series, number, as_array(data, dtype, shape))
        out: list[Item] = []
        if self._pending is not None and self._pending.series_id == series or \
                self._unknown_series(series):
            start = self._pending if self._pending is not None and self._pending.series_id == series else \
                SeriesStart(series, meta={"format": self.format, "joined_midway": True})
            start.sig_shape, start.dtype = shape, dtype.newbyteorder("=").name
            out.append(start)
            self._pending = None
            self._begin_series(series)
        out.append(frame)
        return out

