"""Emulated detector senders, built on the published wire specs, for tests, benchmarks and the demo.

- DECTRIS SIMPLON stream v1 (SIMPLON API Reference v1.8 §5.4.3): ``dheader-1.0`` with header detail
  none/basic/all (+ appendix), ``dimage-1.0`` 4-part images (shape ``[x, y]``), ``dseries_end-1.0``;
  encodings ``<`` (raw), ``lz4<`` (raw LZ4 block), ``bs8/16/32-lz4<`` (bitshuffle+LZ4, HDF5 framing).
- DECTRIS stream v2 (``dectris/documentation`` stream_v2/README.md): self-described CBOR (tag 55799)
  start/image/end; arrays as tag 40 ``[[h, w], typed array]`` whose payload is raw or tag 56500
  ``["bslz4"|"lz4"|"bszstd", elem_size, bytes]``. ``bszstd`` and ``jungfraujoch=True`` (extra
  start fields and a ``metadata`` message) emulate PSI Jungfraujoch.
- PSI array-1.0 (``htypes/array-1.0.md``) and pyzmq's ``send_array``: JSON header + raw buffer.

Compressed payloads are produced with ``bitshuffle`` and ``lz4`` (``dectris-compression`` only
decompresses); blocks are 8192 bytes as on DECTRIS DCUs.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import bitshuffle
import cbor2
import lz4.block
import numpy as np
import zmq

Format = Literal["dectris-v1", "dectris-v2", "array-1.0", "send-array"]
BLOCK_BYTES = 8192

#: numpy dtype -> RFC 8746 typed-array tag (little-endian).
TYPED_ARRAY_TAG = {np.dtype("uint8"): 64, np.dtype("<u2"): 69, np.dtype("<u4"): 70, np.dtype("<f4"): 85}

V1_ENCODINGS = ("<", "lz4<", "bslz4")
"""v1 encodings the emulator offers; ``bslz4`` becomes ``bs<8*itemsize>-lz4<``."""
V2_COMPRESSIONS = ("none", "bslz4", "lz4", "bszstd")


# -- compression framings (frame_formats.md §3) ------------------------------------------------
def _h5_header(a: np.ndarray, block_bytes: int) -> bytes:
    return struct.pack(">QI", a.nbytes, block_bytes)


def bitshuffle_h5(a: np.ndarray, algorithm: str = "bslz4", block_bytes: int = BLOCK_BYTES) -> bytes:
    """Bitshuffle + LZ4 (or Zstandard) in the HDF5 bitshuffle-filter framing (12-byte header)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    block = block_bytes // a.dtype.itemsize
    body = bitshuffle.compress_lz4(flat, block) if algorithm == "bslz4" else bitshuffle.compress_zstd(flat, block)
    return _h5_header(a, block_bytes) + body.tobytes()


def lz4_h5(a: np.ndarray, block_bytes: int = BLOCK_BYTES) -> bytes:
    """LZ4 in the HDF5 LZ4-filter framing; a block that does not shrink is stored raw."""
    raw = np.ascontiguousarray(a).tobytes()
    out = [_h5_header(a, block_bytes)]
    for i in range(0, len(raw), block_bytes):
        chunk = raw[i:i + block_bytes]
        packed = lz4.block.compress(chunk, store_size=False)
        body = packed if len(packed) < len(chunk) else chunk
        out += [struct.pack(">I", len(body)), body]
    return b"".join(out)


# -- message builders --------------------------------------------------------------------------
def v1_messages(frames: Iterable[np.ndarray], series: int = 1, encoding: str = "bslz4", detail: str = "basic",
                n_frames: int | None = None, appendix: dict | None = None) -> Iterator[list[bytes]]:
    """Stream v1 messages (lists of parts) of one series: header, one per frame, end."""
    frames = iter(frames)
    first = next(frames)
    h, w = first.shape[-2:]
    head = [json.dumps({"htype": "dheader-1.0", "series": series, "header_detail": detail}).encode()]
    if detail in ("basic", "all"):
        head.append(json.dumps({"x_pixels_in_detector": w, "y_pixels_in_detector": h,
                                "bit_depth_image": 8 * first.itemsize, "nimages": n_frames or 0, "ntrigger": 1,
                                "trigger_mode": "ints", "count_time": 1e-3, "frame_time": 1e-3}).encode())
    if detail == "all":
        for htype, shape, dtype in (("dflatfield-1.0", [w, h], "float32"), ("dpixelmask-1.0", [w, h], "uint32"),
                                    ("dcountrate_table-1.0", [2, 1000], "float32")):
            head += [json.dumps({"htype": htype, "shape": shape, "type": dtype}).encode(),
                     np.zeros(shape[::-1], dtype).tobytes()]
    if appendix is not None:
        head.append(json.dumps(appendix).encode())
    yield head
    for i, frame in enumerate(_chain(first, frames)):
        if encoding == "bslz4":
            enc, blob = f"bs{8 * frame.itemsize}-lz4<", bitshuffle_h5(frame)
        elif encoding == "lz4<":
            enc, blob = encoding, lz4.block.compress(frame.tobytes(), store_size=False)
        else:
            enc, blob = "<", frame.tobytes()
        yield [json.dumps({"htype": "dimage-1.0", "series": series, "frame": i,
                           "hash": hashlib.md5(blob).hexdigest()}).encode(),
               json.dumps({"htype": "dimage_d-1.0", "shape": [frame.shape[1], frame.shape[0]],
                           "type": frame.dtype.name, "encoding": enc, "size": len(blob)}).encode(),
               blob,
               json.dumps({"htype": "dconfig-1.0", "start_time": i * 10**6, "stop_time": i * 10**6 + 999_000,
                           "real_time": 999_000}).encode()]
    yield [json.dumps({"htype": "dseries_end-1.0", "series": series}).encode()]


def v2_array(a: np.ndarray, compression: str = "bslz4") -> cbor2.CBORTag:
    """A stream v2 MultiDimArray: tag 40 ``[[h, w], typed-array(payload)]``."""
    if compression in ("bslz4", "bszstd"):
        payload: Any = cbor2.CBORTag(56500, [compression, a.itemsize, bitshuffle_h5(a, compression)])
    elif compression == "lz4":
        payload = cbor2.CBORTag(56500, ["lz4", 0, lz4_h5(a)])
    else:
        payload = a.tobytes()
    return cbor2.CBORTag(40, [list(a.shape), cbor2.CBORTag(TYPED_ARRAY_TAG[a.dtype], payload)])


def v2_encode(msg: dict) -> bytes:
    """Self-described CBOR (tag 55799 prefix ``d9 d9 f7``), as a DCU sends."""
    return cbor2.dumps(cbor2.CBORTag(55799, msg))


def v2_messages(frames: Iterable[np.ndarray], series: int = 1, compression: str = "bslz4",
                n_frames: int | None = None, user_data: Any = None, jungfraujoch: bool = False,
                unique_id: str | None = None) -> Iterator[bytes]:
    """Stream v2 messages of one series: start, one image per frame, end."""
    frames = iter(frames)
    first = next(frames)
    uid = unique_id or f"emu-{series}"
    now = datetime.datetime.now(datetime.timezone.utc)
    start = {"type": "start", "series_id": series, "series_unique_id": uid, "arm_date": now,
             "channels": ["threshold_1"], "image_dtype": first.dtype.name, "image_size_x": first.shape[1],
             "image_size_y": first.shape[0], "number_of_images": n_frames or 0, "count_time": 1e-3,
             "frame_time": 1e-3, "incident_energy": 12400.0, "user_data": user_data,
             "threshold_energy": {"threshold_1": 6200.0}}
    if jungfraujoch:
        start.update({"magic_number": 0x52320004, "detector_distance": 0.1, "error_value": -1})
    yield v2_encode(start)
    if jungfraujoch:
        yield v2_encode({"type": "metadata", "series_id": series, "series_unique_id": uid, "images": []})
    for i, frame in enumerate(_chain(first, frames)):
        yield v2_encode({"type": "image", "series_id": series, "series_unique_id": uid, "image_id": i,
                         "real_time": [50_000, 50_000_000], "series_date": now,
                         "start_time": [i * 50_000, 50_000_000], "stop_time": [(i + 1) * 50_000, 50_000_000],
                         "user_data": None, "data": {"threshold_1": v2_array(frame, compression)}})
    yield v2_encode({"type": "end", "series_id": series, "series_unique_id": uid})


def array10_messages(frames: Iterable[np.ndarray], style: str = "array-1.0", shape_order: str = "numpy",
                     source: str | None = None, timestamps: bool = True) -> Iterator[list[Any]]:
    """array-1.0 (ADZMQ-like) or ``send_array`` messages: ``[json header, array buffer]`` (zero-copy)."""
    for i, frame in enumerate(frames):
        shape = list(frame.shape) if shape_order == "numpy" else list(frame.shape[::-1])
        if style == "send-array":
            head = {"dtype": str(frame.dtype), "shape": shape}
        else:
            head = {"htype": "array-1.0", "type": frame.dtype.name, "shape": shape, "frame": i, "encoding": ""}
            if timestamps:
                head["timeStamp"] = time.time()
            if source is not None:
                head["source"] = source
        yield [json.dumps(head).encode(), np.ascontiguousarray(frame)]


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


# -- frames to send ----------------------------------------------------------------------------
def synthetic_frames(n: int, shape: tuple[int, int] = (256, 256), dtype: str = "uint16", seed: int = 0,
                     mean_counts: float = 2.0) -> Iterator[np.ndarray]:
    """Counting-detector-like frames: Poisson background (``mean_counts`` per px) plus a bright
    Gaussian disk (a diffraction spot / 4D-STEM bright field) that moves across the frame, so every
    frame differs and compresses like real data. Values are clipped to the dtype's range."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    top = np.iinfo(dtype).max if np.dtype(dtype).kind in "ui" else np.inf
    for i in range(n):
        cy = h / 2 + h / 4 * np.sin(2 * np.pi * i / max(n, 1))
        cx = w / 2 + w / 4 * np.cos(2 * np.pi * i / max(n, 1))
        spot = 50 * mean_counts * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (min(h, w) / 16) ** 2))
        counts = rng.poisson(mean_counts + spot)
        yield np.clip(counts, 0, top).astype(dtype)


# -- the sender --------------------------------------------------------------------------------
class DetectorEmulator:
    """A detector's sending socket: PUSH (DECTRIS default) or PUB, bound (DCU style) or connected.

    Args:
        fmt: ``"dectris-v1"``, ``"dectris-v2"``, ``"array-1.0"`` or ``"send-array"``.
        address: 0MQ address; ``tcp://127.0.0.1:0`` binds a free port (see :attr:`address`).
        socket_type: ``"push"`` or ``"pub"``.
        bind: bind (as a DCU does) or connect.
        sndhwm: send high-water mark, messages.
    """

    def __init__(self, fmt: Format, address: str = "tcp://127.0.0.1:0", socket_type: str = "push",
                 bind: bool = True, sndhwm: int = 1000, context: zmq.Context | None = None):
        if fmt not in ("dectris-v1", "dectris-v2", "array-1.0", "send-array"):
            raise ValueError(f"unknown detector format {fmt!r}")
        self.format = fmt
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.PUSH if socket_type == "push" else zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, sndhwm)
        self.socket.setsockopt(zmq.LINGER, 5000)
        if bind:
            self.socket.bind(address)
            self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.socket.connect(address)
            self.address = address
        self.sent_frames = 0

    def messages(self, frames: Iterable[np.ndarray], series: int = 1, **options: Any) -> Iterator[list[Any]]:
        """The 0MQ messages (as part lists) of one series in this emulator's format."""
        if self.format == "dectris-v1":
            return v1_messages(frames, series, **options)
        if self.format == "dectris-v2":
            return ([m] for m in v2_messages(frames, series, **options))
        style = "send-array" if self.format == "send-array" else "array-1.0"
        return array10_messages(frames, style=style, **options)

    def send_series(self, frames: Iterable[np.ndarray], series: int = 1, rate_hz: float | None = None,
                    **options: Any) -> int:
        """Send one series (start, frames, end where the format has them), optionally paced at
        ``rate_hz`` frames per second. Returns the number of messages sent."""
        period = 1.0 / rate_hz if rate_hz else 0.0
        t_next = time.perf_counter()
        n = 0
        for parts in self.messages(frames, series, **options):
            if period:
                delay = t_next - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                t_next += period
            self.socket.send_multipart(parts, copy=False)
            n += 1
        return n

    def send_raw(self, parts: list[bytes]) -> None:
        """Send one arbitrary message (hostile-input tests)."""
        self.socket.send_multipart(parts)

    def close(self, linger_ms: int = 5000) -> None:
        self.socket.close(linger_ms)

    def __enter__(self) -> DetectorEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


DEFAULT_PORTS = {"dectris-v1": 9999, "dectris-v2": 31001, "jungfraujoch": 31001, "array-1.0": 5600, "send-array": 5600}


def simulate_detector(fmt: str, *, address: str | None = None, socket_type: str = "push", bind: bool = True,
                      n_frames: int = 100, n_series: int = 1, shape: tuple[int, int] = (256, 256),
                      dtype: str = "uint16", compression: str | None = None, rate_hz: float | None = 100.0,
                      run_uid: str | None = None, log=None) -> int:
    """Send ``n_series`` series of :func:`synthetic_frames` like a detector (``beamlens
    simulate-detector``). ``fmt`` ``"jungfraujoch"`` is stream v2 with Jungfraujoch's extras and
    ``bszstd``. Returns the number of frames sent.

    Raises:
        ValueError: unknown format or compression.
    """
    import logging
    log = log or logging.getLogger(__name__)
    wire = "dectris-v2" if fmt == "jungfraujoch" else fmt
    address = address or f"tcp://127.0.0.1:{DEFAULT_PORTS[fmt]}"
    options: dict[str, Any] = {}
    if wire == "dectris-v1":
        options = {"encoding": compression or "bslz4", "n_frames": n_frames,
                   "appendix": {"bluesky_run_uid": run_uid} if run_uid else None}
        if options["encoding"] not in V1_ENCODINGS:
            raise ValueError(f"stream v1 encodings: {V1_ENCODINGS}")
    elif wire == "dectris-v2":
        options = {"compression": compression or ("bszstd" if fmt == "jungfraujoch" else "bslz4"),
                   "n_frames": n_frames, "jungfraujoch": fmt == "jungfraujoch",
                   "user_data": {"bluesky_run_uid": run_uid} if run_uid else None}
        if options["compression"] not in V2_COMPRESSIONS:
            raise ValueError(f"stream v2 compressions: {V2_COMPRESSIONS}")
    with DetectorEmulator(wire, address, socket_type, bind) as emu:  # type: ignore[arg-type]
        log.info("emulated %s detector %s on %s: %d series of %d %s frames %s at %s Hz", fmt,
                 "bound" if bind else "connected", emu.address, n_series, n_frames, dtype, shape, rate_hz or "max")
        for k in range(n_series):
            frames = synthetic_frames(n_frames, shape, dtype, seed=k)
            emu.send_series(frames, series=k + 1, rate_hz=rate_hz, **options)
            log.info("series %d sent", k + 1)
    return n_frames * n_series


def raster_series_plan(emulator: DetectorEmulator, frames: list[np.ndarray], shape: tuple[int, int], *,
                       snake: bool = False, series: int = 1, run_seen: Callable[[str], bool] | None = None,
                       timeout: float = 30.0, md: dict | None = None) -> Iterator[Any]:
    """A bluesky plan: a raster run of ``shape`` (RunStart ``shape``/``snaking`` as ``grid_scan``
    writes them) during which ``emulator`` sends one series of ``frames``, frame k for scan point k,
    with the run uid in the series header (``bluesky_run_uid``). Returns the RunStart uid.

    Args:
        run_seen: if given, wait (up to ``timeout`` s) until it returns True for the run uid before
            arming the detector, e.g. until a daemon has received the RunStart.
    """
    from bluesky import plan_stubs as bps

    uid = yield from bps.open_run(md={"shape": list(shape), "snaking": [False, snake],
                                      "plan_name": "raster_series", "detector_format": emulator.format, **(md or {})})
    deadline = time.monotonic() + timeout
    while run_seen is not None and not run_seen(uid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {uid} was not seen within {timeout} s")
        time.sleep(0.01)
    options: dict[str, Any] = {}
    if emulator.format == "dectris-v1":
        options = {"n_frames": len(frames), "appendix": {"bluesky_run_uid": uid}}
    elif emulator.format == "dectris-v2":
        options = {"n_frames": len(frames), "user_data": {"bluesky_run_uid": uid}}
    emulator.send_series(frames, series=series, **options)
    yield from bps.close_run()
    return uid
