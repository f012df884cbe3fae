"""Pixel-data decompression for detector frame streams, bounded by the declared frame size.

Three LZ4-family framings appear on the wire (see ``shared/reference/frame_formats.md`` §3):

- raw LZ4 block, no framing (DECTRIS stream v1 ``lz4<``): ``lz4.block``;
- HDF5 LZ4-filter framing (stream v2 ``["lz4", 0, ...]``): u64 BE total size, u32 BE block size, then
  per block u32 BE compressed size + LZ4 block;
- HDF5 bitshuffle-filter framing (v1 ``bsNN-lz4<``, v2 ``["bslz4", elem_size, ...]``; Jungfraujoch's
  ``bszstd`` uses the same framing with Zstandard blocks).

The framed ones are decoded by DECTRIS's ``dectris-compression`` (C). Its output size comes from the
12-byte header, so the header is checked against the size the frame header declares *before* the
decompressor runs: nothing here ever allocates more than ``expected_nbytes``.
"""
from __future__ import annotations

import struct

import lz4.block
from dectris.compression import decompress as _dectris_decompress

from ..frames import FrameDecodeError

FRAMED = ("bslz4", "lz4", "bszstd")
"""Algorithms in HDF5-filter framing, as named in DECTRIS stream v2's compression tag 56500."""

_HEADER = struct.Struct(">QI")


def decompress_framed(blob: bytes | memoryview, algorithm: str, elem_size: int, expected_nbytes: int) -> bytes:
    """Decompress one HDF5-filter-framed buffer to exactly ``expected_nbytes`` bytes.

    Args:
        blob: the compressed buffer, 12-byte header included.
        algorithm: ``"bslz4"``, ``"lz4"`` or ``"bszstd"``.
        elem_size: bytes per element (bitshuffle algorithms), 1, 2, 4 or 8.
        expected_nbytes: ``prod(shape) * itemsize`` of the declared frame.

    Raises:
        FrameDecodeError: ``unknown_compression``; ``truncated`` (shorter than the header);
            ``decompressed_size`` (the header declares another size than the frame: refused before any
            allocation); ``corrupt_compressed`` (the decompressor fails or returns another size).
    """
    if algorithm not in FRAMED:
        raise FrameDecodeError("unknown_compression", f"compression {algorithm[:32]!r} is not one of {FRAMED}")
    if len(blob) < _HEADER.size:
        raise FrameDecodeError("truncated", f"compressed buffer of {len(blob)} bytes has no 12-byte header")
    total, block = _HEADER.unpack_from(blob)
    if total != expected_nbytes:
        raise FrameDecodeError("decompressed_size", f"compressed buffer declares {total} bytes where the frame needs {expected_nbytes}")
    if algorithm != "lz4" and (elem_size not in (1, 2, 4, 8) or block % elem_size):
        raise FrameDecodeError("corrupt_compressed", f"element size {elem_size} does not fit block size {block}")
    try:
        out = _dectris_decompress(bytes(blob) if isinstance(blob, memoryview) else blob, algorithm, elem_size=elem_size)
    except Exception as exc:  # the C decoder raises RuntimeError/ValueError on corrupt data
        raise FrameDecodeError("corrupt_compressed", f"{algorithm} decompression failed: {exc}"[:200]) from None
    if len(out) != expected_nbytes:
        raise FrameDecodeError("corrupt_compressed", f"{algorithm} produced {len(out)} bytes, expected {expected_nbytes}")
    return out


def decompress_lz4_block(blob: bytes | memoryview, expected_nbytes: int) -> bytes:
    """Decompress a raw LZ4 block (no framing) into exactly ``expected_nbytes`` bytes.

    ``lz4.block`` allocates ``expected_nbytes`` and refuses to write past it.

    Raises:
        FrameDecodeError: ``decompressed_size`` when the block would decompress to more bytes, or to
            fewer; ``corrupt_compressed`` for any other LZ4 error.
    """
    try:
        out = lz4.block.decompress(blob, uncompressed_size=expected_nbytes)
    except lz4.block.LZ4BlockError as exc:
        raise FrameDecodeError("corrupt_compressed", f"raw LZ4 block does not decode into {expected_nbytes} bytes: {exc}"[:200]) from None
    if len(out) != expected_nbytes:
        raise FrameDecodeError("decompressed_size", f"raw LZ4 block holds {len(out)} bytes, the frame needs {expected_nbytes}")
    return out
