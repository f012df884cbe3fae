"""Each wire format round-trips bit-exactly through its emulator's encoder and beamlens's decoder,
for uint8/16/32 and every compression, with the numpy shape (rows, cols) of the sent frame; and the
decoders, fed arbitrary bytes, only ever raise FrameDecodeError (hypothesis)."""
from __future__ import annotations

import json

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beamlens.daemon.frames import Frame, FrameDecodeError, SeriesEnd, SeriesStart
from beamlens.daemon.sim import detectors as emu
from beamlens.daemon.sources.array10 import Array10Decoder
from beamlens.daemon.sources.dectris_v1 import DectrisV1Decoder
from beamlens.daemon.sources.dectris_v2 import DectrisV2Decoder

DTYPES = ["uint8", "uint16", "uint32"]
MAX = 2**28


def frames_of(dtype: str, n: int = 3, shape: tuple[int, int] = (37, 53), seed: int = 0) -> list[np.ndarray]:
    """Non-square frames with full-range values (compressible structure plus noise)."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    base = np.arange(shape[0] * shape[1], dtype=np.uint64).reshape(shape) % 7
    return [(base + rng.integers(0, top // 2, shape, dtype=np.uint64) * (rng.random(shape) < 0.1)).astype(dtype)
            for _ in range(n)]


def decode_all(decoder, messages) -> list:
    out = []
    for parts in messages:
        out += decoder.decode([memoryview(np.ascontiguousarray(p)).cast("B") if isinstance(p, np.ndarray)
                               else memoryview(p) for p in parts])
    return out


def assert_frames_equal(items: list, sent: list[np.ndarray]) -> None:
    frames = [i for i in items if isinstance(i, Frame)]
    assert [f.number for f in frames] == list(range(len(sent)))
    for got, want in zip(frames, sent):
        assert got.data.shape == want.shape and got.data.dtype == want.dtype
        np.testing.assert_array_equal(got.data, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoding", emu.V1_ENCODINGS)
@pytest.mark.parametrize("detail", ["none", "basic", "all"])
def test_dectris_v1_round_trip(dtype, encoding, detail):
    sent = frames_of(dtype)
    items = decode_all(DectrisV1Decoder(MAX, verify_hash=True),
                       emu.v1_messages(sent, series=4, encoding=encoding, detail=detail, n_frames=3))
    assert_frames_equal(items, sent)
    start = items[0]
    assert isinstance(start, SeriesStart) and start.series_id == "4"
    assert start.sig_shape == (37, 53) and start.dtype == dtype
    assert start.n_frames == (None if detail == "none" else 3)
    assert isinstance(items[-1], SeriesEnd)


def test_dectris_v1_shape_is_x_y_on_the_wire():
    """dimage_d carries [width, height]; the array must come out (height, width), not transposed."""
    frame = np.arange(6 * 4, dtype=np.uint16).reshape(6, 4)  # 6 rows, 4 columns
    messages = list(emu.v1_messages([frame], encoding="<"))
    assert json.loads(messages[1][1])["shape"] == [4, 6]
    (got,) = [i for i in decode_all(DectrisV1Decoder(MAX), messages) if isinstance(i, Frame)]
    np.testing.assert_array_equal(got.data, frame)


def test_dectris_v1_appendix_names_the_run():
    messages = emu.v1_messages(frames_of("uint16", 1), appendix={"bluesky_run_uid": "abc-123"})
    start = decode_all(DectrisV1Decoder(MAX), messages)[0]
    assert start.run_uid == "abc-123"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compression", emu.V2_COMPRESSIONS)
def test_dectris_v2_round_trip(dtype, compression):
    sent = frames_of(dtype)
    messages = ([m] for m in emu.v2_messages(sent, series=2, compression=compression, n_frames=3,
                                            jungfraujoch=compression == "bszstd"))
    items = decode_all(DectrisV2Decoder(MAX), messages)
    assert_frames_equal(items, sent)
    assert items[0] == SeriesStart("emu-2", (37, 53), dtype, 3, items[0].meta, None)
    assert isinstance(items[-1], SeriesEnd)


def test_dectris_v2_column_major_and_big_endian_arrays():
    frame = np.arange(12, dtype=">u2").reshape(3, 4)
    array = cbor2.CBORTag(1040, [[3, 4], cbor2.CBORTag(65, np.asfortranarray(frame).tobytes(order="F"))])
    msg = emu.v2_encode({"type": "image", "series_id": 1, "image_id": 0, "data": {"c": array}})
    (_, got) = DectrisV2Decoder(MAX).decode([msg])
    np.testing.assert_array_equal(got.data, frame)
    assert got.data.dtype == np.dtype("uint16")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style,order", [("array-1.0", "numpy"), ("array-1.0", "xy"), ("send-array", "numpy")])
def test_array10_round_trip(dtype, style, order):
    sent = frames_of(dtype)
    items = decode_all(Array10Decoder(MAX, shape_order=order), emu.array10_messages(sent, style, shape_order=order))
    assert_frames_equal(items, sent)
    assert isinstance(items[0], SeriesStart) and items[0].sig_shape == (37, 53)


def test_array10_big_endian_list_htype_and_new_series_on_restart():
    frame = np.arange(20, dtype=">u4").reshape(4, 5)
    head = {"htype": ["array-1.0"], "type": "uint32", "shape": [4, 5], "frame": 3, "endianness": "big"}
    dec = Array10Decoder(MAX)
    items = dec.decode([json.dumps(head).encode(), frame.tobytes()])
    np.testing.assert_array_equal(items[-1].data, frame)
    restarted = dec.decode([json.dumps({**head, "frame": 0}).encode(), frame.tobytes()])  # numbering restarts
    assert restarted[:2] == [SeriesEnd("1"), SeriesStart("2", (4, 5), "uint32", None, restarted[1].meta, has_end=False)]


# -- property-based: arbitrary input never escapes as anything but FrameDecodeError ----------
DECODERS = {
    "dectris-v1": lambda: DectrisV1Decoder(2**20, verify_hash=True),
    "dectris-v2": lambda: DectrisV2Decoder(2**20),
    "array-1.0": lambda: Array10Decoder(2**20),
}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("fmt", DECODERS)
@FUZZ
@given(parts=st.lists(st.binary(max_size=300), min_size=0, max_size=9))
def test_decoders_reject_arbitrary_bytes_cleanly(fmt, parts):
    try:
        DECODERS[fmt]().decode(parts)
    except FrameDecodeError as exc:
        assert exc.reason


def _valid_messages(fmt: str) -> list[list[bytes]]:
    frames = frames_of("uint16", 1, (8, 8))
    if fmt == "dectris-v1":
        return [[bytes(p) for p in m] for m in emu.v1_messages(frames, encoding="bslz4")]
    if fmt == "dectris-v2":
        return [[m] for m in emu.v2_messages(frames, compression="bslz4")]
    return [[bytes(p) for p in m] for m in emu.array10_messages(frames)]


VALID = {fmt: _valid_messages(fmt) for fmt in DECODERS}  # built once: hypothesis needs fixed inputs


@pytest.mark.parametrize("fmt", DECODERS)
@FUZZ
@given(data=st.data())
def test_decoders_survive_mutated_valid_messages(fmt, data):
    """Flip, cut or extend any part of a real message: decoded or FrameDecodeError, nothing else, and a
    decoded frame never exceeds the declared 8 x 8."""
    messages = VALID[fmt]
    decoder = DECODERS[fmt]()
    for parts in messages:
        parts = list(parts)
        i = data.draw(st.integers(0, len(parts) - 1))
        blob = bytearray(parts[i])
        action = data.draw(st.sampled_from(["flip", "cut", "extend", "none"]))
        if action == "flip" and blob:
            j = data.draw(st.integers(0, len(blob) - 1))
            blob[j] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            blob = blob[: data.draw(st.integers(0, len(blob)))]
        elif action == "extend":
            blob += data.draw(st.binary(min_size=1, max_size=64))
        parts[i] = bytes(blob)
        try:
            items = decoder.decode(parts)
        except FrameDecodeError:
            continue
        for item in items:
            if isinstance(item, Frame):
                assert item.data.nbytes <= 8 * 8 * 4


@FUZZ
@given(dtype=st.sampled_from(DTYPES), rows=st.integers(1, 40), cols=st.integers(1, 40),
       compression=st.sampled_from(emu.V2_COMPRESSIONS), seed=st.integers(0, 2**16))
def test_dectris_v2_round_trip_any_shape(dtype, rows, cols, compression, seed):
    sent = frames_of(dtype, 1, (rows, cols), seed)
    items = decode_all(DectrisV2Decoder(MAX), ([m] for m in emu.v2_messages(sent, compression=compression)))
    assert_frames_equal(items, sent)


@FUZZ
@given(dtype=st.sampled_from(DTYPES), rows=st.integers(1, 40), cols=st.integers(1, 40),
       encoding=st.sampled_from(emu.V1_ENCODINGS), seed=st.integers(0, 2**16))
def test_dectris_v1_round_trip_any_shape(dtype, rows, cols, encoding, seed):
    sent = frames_of(dtype, 1, (rows, cols), seed)
    assert_frames_equal(decode_all(DectrisV1Decoder(MAX), emu.v1_messages(sent, encoding=encoding)), sent)


@FUZZ
@given(dtype=st.sampled_from(DTYPES + ["float32", "int16"]), shape=st.lists(st.integers(1, 12), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_array10_round_trip_any_shape(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    sent = [(rng.random(shape) * 100).astype(dtype)]
    assert_frames_equal(decode_all(Array10Decoder(MAX), emu.array10_messages(sent)), sent)


@pytest.mark.parametrize("algorithm", ["bslz4", "lz4", "bszstd"])
@FUZZ
@given(blob=st.binary(max_size=400), elem_size=st.sampled_from([1, 2, 4]), expected=st.integers(0, 4096))
def test_framed_decompression_never_exceeds_the_declared_size(algorithm, blob, elem_size, expected):
    from beamlens.daemon.sources.codecs import decompress_framed
    try:
        out = decompress_framed(blob, algorithm, elem_size, expected)
    except FrameDecodeError as exc:
        assert exc.reason in ("truncated", "decompressed_size", "corrupt_compressed")
    else:
        assert len(out) == expected


@FUZZ
@given(blob=st.binary(max_size=400), expected=st.integers(0, 4096))
def test_raw_lz4_block_never_exceeds_the_declared_size(blob, expected):
    from beamlens.daemon.sources.codecs import decompress_lz4_block
    try:
        out = decompress_lz4_block(blob, expected)
    except FrameDecodeError as exc:
        assert exc.reason in ("decompressed_size", "corrupt_compressed")
    else:
        assert len(out) == expected


@pytest.mark.parametrize("algorithm", ["bslz4", "lz4", "bszstd"])
@FUZZ
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**16), data=st.data())
def test_corrupted_bodies_behind_a_valid_header_are_rejected_cleanly(algorithm, n, seed, data):
    """The header matches the declared size, so the C decompressor runs on corrupted blocks."""
    from beamlens.daemon.sources.codecs import decompress_framed
    a = np.random.default_rng(seed).integers(0, 50, n, dtype=np.uint16)
    blob = bytearray(emu.lz4_h5(a) if algorithm == "lz4" else emu.bitshuffle_h5(a, algorithm))
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(12, len(blob) - 1))] = data.draw(st.integers(0, 255))
    blob = blob[: data.draw(st.integers(12, len(blob)))]
    try:
        out = decompress_framed(bytes(blob), algorithm, 2, a.nbytes)
    except FrameDecodeError:
        return
    assert len(out) == a.nbytes
