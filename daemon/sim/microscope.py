"""The simulated microscope: sends a simulated defect movie (:mod:`beamlens.models.stem_sim`) over
ZeroMQ in the PSI ``array-1.0`` format, keeping the exact ground truth of every frame sent.

Wire format (``paulscherrerinstitute/htypes`` ``array-1.0.md``; as sent by ADZMQ >= 1.4 and PSI
std_daq): a two-part message, a JSON header
``{"htype": "array-1.0", "shape": [rows, cols], "type": "uint16", "frame": n, "endianness": "little",
"source": ..., "encoding": "", "timeStamp": ..., "series_id": ..., "frame_time_s": ...}`` then the
raw little-endian frame buffer (C order). The socket is bound on 127.0.0.1 (a free port by default;
PUSH by default, PUB on request, as ADZMQ offers both).

Example::

    with SimulatedMicroscope(n_frames=200, rate_hz=10) as scope:
        print(scope.address)       # tcp://127.0.0.1:PORT for the daemon's frame source
        scope.start()              # background thread; scope.join() waits for the last frame
    truth = scope.truth            # list of FrameTruth, one per frame sent
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import asdict

import numpy as np
import zmq

from beamlens.models.stem_sim import Movie, MovieParams

log = logging.getLogger(__name__)

SOCKET_TYPES = {"push": zmq.PUSH, "pub": zmq.PUB}


def array10_header(frame: np.ndarray, index: int, **extra: object) -> dict:
    """The ``array-1.0`` JSON header of one frame (numpy order shape, numpy dtype name)."""
    return {"htype": "array-1.0", "shape": list(frame.shape), "type": frame.dtype.name, "frame": index,
            "endianness": "little", "encoding": "", **extra}


class SimulatedMicroscope:
    """Streams a simulated movie as ``array-1.0`` messages.

    Args:
        params: movie parameters (default :class:`MovieParams`, 256 x 256 px MoS2-like frames).
        seed: movie seed.
        n_frames: frames to send.
        rate_hz: frames per second (None: as fast as the socket takes them).
        socket_type: ``"push"`` (default) or ``"pub"``.
        address: where to bind; ``tcp://127.0.0.1:0`` picks a free port.
        context: a ``zmq.Context`` (default: the process's shared instance).
        sndhwm: send high-water mark, messages (PUSH blocks when reached; PUB drops).

    Attributes:
        address: the bound endpoint (``tcp://127.0.0.1:PORT``) once constructed.
        truth: ground truth (:class:`beamlens.models.stem_sim.FrameTruth`) of each frame sent.
        series_id: unique id sent in every header (``series_id``).

    Raises:
        ValueError: for an unknown socket type or a non-positive rate.
    """

    def __init__(self, params: MovieParams | None = None, seed: int = 0, n_frames: int = 100,
                 rate_hz: float | None = 10.0, socket_type: str = "push",
                 address: str = "tcp://127.0.0.1:0", context: zmq.Context | None = None, sndhwm: int = 1000):
        if socket_type not in SOCKET_TYPES:
            raise ValueError(f"socket_type must be one of {sorted(SOCKET_TYPES)}, got {socket_type!r}")
        if rate_hz is not None and rate_hz <= 0:
            raise ValueError("rate_hz must be positive (or None for as fast as possible)")
        self.params = params or MovieParams()
        self.movie = Movie(self.params, seed=seed)
        self.n_frames = n_frames
        self.rate_hz = rate_hz
        self.series_id = uuid.uuid4().hex
        self.truth: list = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.socket = (context or zmq.Context.instance()).socket(SOCKET_TYPES[socket_type])
        self.socket.setsockopt(zmq.SNDHWM, sndhwm)
        self.socket.setsockopt(zmq.LINGER, 2000)
        self.socket.bind(address)
        self.address: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("simulated microscope bound on %s (%s)", self.address, socket_type)

    @property
    def frame_time_s(self) -> float:
        """Time between frames announced in the headers, s (the movie's, so diffusion is in px^2/s)."""
        return self.params.dynamics.frame_time_s

    def send_frame(self, index: int, image: np.ndarray) -> None:
        """Send one frame (``(rows, cols)`` uint16) as a two-part ``array-1.0`` message."""
        header = array10_header(image, index, source="beamlens-sim-stem", timeStamp=time.time(),
                                series_id=self.series_id, frame_time_s=self.frame_time_s,
                                number_frames_expected=self.n_frames)
        self.socket.send_multipart([json.dumps(header).encode(), np.ascontiguousarray(image, dtype="<u2")], copy=False)

    def run(self) -> int:
        """Send the movie in the calling thread at ``rate_hz``; returns the number of frames sent
        (fewer when :meth:`stop` was called)."""
        period = 1.0 / self.rate_hz if self.rate_hz else 0.0
        t0 = time.monotonic()
        sent = 0
        for index, (image, truth) in enumerate(self.movie.frames(self.n_frames)):
            if self._stop.is_set():
                break
            delay = t0 + index * period - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            self.send_frame(index, image)
            self.truth.append(truth)
            sent += 1
        log.info("simulated microscope sent %d frames of series %s", sent, self.series_id)
        return sent

    def start(self) -> None:
        """Send the movie from a background thread."""
        self._thread = threading.Thread(target=self.run, name="sim-microscope", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        """Stop sending (the frame being sent is completed)."""
        self._stop.set()
        self.join()

    def close(self) -> None:
        self.stop()
        self.socket.close()

    def __enter__(self) -> SimulatedMicroscope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict:
        """The movie's parameters as a JSON-able dict (for logs and the demo page)."""
        return {"address": self.address, "series_id": self.series_id, "n_frames": self.n_frames,
                "rate_hz": self.rate_hz, "params": asdict(self.params)}
