"""Hostile input through a running daemon: every malformed message is counted under its reason, nothing
crashes, nothing larger than the declared frame is allocated, and the next good series is analysed."""
from __future__ import annotations

import json

import cbor2
import lz4.block
import numpy as np
import pytest

from beamlens.daemon.sim import detectors as emu_mod
from beamlens.daemon.sim.detectors import DetectorEmulator, synthetic_frames

from frame_helpers import counter, daemon_yaml, frame_source_yaml
from helpers import wait_for

SMALL = np.arange(100, dtype=np.uint16).reshape(10, 10)
BIG = np.zeros((40, 40), dtype=np.uint16)
DEEP_JSON = b"[" * 100_000


def v1_image(frame=SMALL, **override) -> list[bytes]:
    parts = [bytes(p) for p in list(emu_mod.v1_messages([frame], series=9, encoding="<"))[1]]
    d = json.loads(parts[1])
    d.update(override)
    parts[1] = json.dumps(d).encode()
    return parts


def v1_hostile() -> list[tuple[str, list[bytes]]]:
    big_blob = emu_mod.bitshuffle_h5(BIG)  # header declares 3200 bytes, dimage_d declares 10 x 10
    return [
        ("wrong_part_count", v1_image()[:3]),  # truncated: the dconfig part is missing
        ("wrong_part_count", [json.dumps({"htype": "dheader-1.0", "series": 1, "header_detail": "all"}).encode(), b"{}"]),
        ("size_mismatch", v1_image(size=201)),
        ("unknown_dtype", v1_image(type="float128")),
        ("decompressed_size", [v1_image()[0], json.dumps({"htype": "dimage_d-1.0", "shape": [10, 10], "type": "uint16",
                                                           "encoding": "bs16-lz4<", "size": len(big_blob)}).encode(),
                               big_blob, v1_image()[3]]),
        ("corrupt_compressed", [v1_image()[0], json.dumps({"htype": "dimage_d-1.0", "shape": [10, 10], "type": "uint16",
                                                            "encoding": "lz4<"}).encode(),
                                lz4.block.compress(BIG.tobytes(), store_size=False), v1_image()[3]]),  # raw block > frame
        ("too_deep", [DEEP_JSON]),
        ("invalid_json", [b"\xff\xfe{"]),
        ("unknown_htype", [json.dumps({"htype": "dfoo-1.0"}).encode()]),
        ("unsupported_encoding", v1_image(encoding="zstd<")),
    ]


def v2_image(array) -> bytes:
    return emu_mod.v2_encode({"type": "image", "series_id": 9, "image_id": 0, "data": {"threshold_1": array}})


def v2_hostile() -> list[tuple[str, list[bytes]]]:
    bslz4_big = cbor2.CBORTag(56500, ["bslz4", 2, emu_mod.bitshuffle_h5(BIG)])
    return [
        ("invalid_cbor", [b"\xff\x00\x01"]),
        ("too_deep", [b"\x81" * 1000 + b"\x00"]),
        ("wrong_part_count", [emu_mod.v2_encode({"type": "end", "series_id": 1}), b"extra"]),
        ("decompressed_size", [v2_image(cbor2.CBORTag(40, [[10, 10], cbor2.CBORTag(69, bslz4_big)]))]),
        ("unknown_dtype", [v2_image(cbor2.CBORTag(40, [[10, 10], cbor2.CBORTag(90, SMALL.tobytes())]))]),
        ("size_mismatch", [v2_image(cbor2.CBORTag(40, [[10, 10], cbor2.CBORTag(69, SMALL.tobytes()[:150])]))]),
        ("bad_header", [cbor2.dumps({"no_type": 1})]),
        ("unknown_compression", [v2_image(cbor2.CBORTag(40, [[10, 10], cbor2.CBORTag(69, cbor2.CBORTag(
            56500, ["snappy", 2, b"\x00" * 20]))]))]),
    ]


def a10(header: dict, data: bytes = SMALL.tobytes()) -> list[bytes]:
    return [json.dumps({"htype": "array-1.0", "type": "uint16", "shape": [10, 10], "frame": 0, **header}).encode(), data]


def array10_hostile() -> list[tuple[str, list[bytes]]]:
    return [
        ("wrong_part_count", a10({}) + [b"third"]),
        ("unknown_dtype", a10({"type": "complex64"})),
        ("size_mismatch", a10({}, SMALL.tobytes()[:150])),
        ("too_deep", [DEEP_JSON, b"x"]),
        ("oversized", a10({"shape": [100_000, 100_000]})),
        ("bad_shape", a10({"shape": [-1, 5]})),
        ("empty_data", a10({}, b"")),
        ("oversized", a10({"shape": [1000, 1000]}, b"\x00" * 1_500_000)),  # message over max_message_bytes
    ]


CASES = {"dectris-v1": v1_hostile, "dectris-v2": v2_hostile, "array-1.0": array10_hostile}


@pytest.mark.parametrize("fmt", CASES)
def test_hostile_input_is_counted_and_the_next_series_analysed(make_daemon, fmt):
    hostile = CASES[fmt]()
    with DetectorEmulator(fmt) as emu:
        daemon = make_daemon(daemon_yaml([frame_source_yaml("det", fmt, emu.address, max_message_bytes=2**20)]))
        for _, parts in hostile:
            emu.send_raw(parts)
        frames = list(synthetic_frames(5, (16, 24)))
        emu.send_series(frames, **({} if fmt == "array-1.0" else {"n_frames": 5}))
        wait_for(lambda: counter(daemon, "beamlens_frames_processed_total", source="det") == 5, timeout=30)
    expected: dict[str, int] = {}
    for reason, _ in hostile:
        expected[reason] = expected.get(reason, 0) + 1
    for reason, n in expected.items():
        assert counter(daemon, "beamlens_frame_decode_errors_total", source="det", reason=reason) == n, reason
    run = daemon.store.summaries()[0]
    total = daemon.store.snapshot(run["uid"], "fs", "total").data
    np.testing.assert_array_equal(total[:5], [f.sum() for f in frames])
