"""The simulated microscope's frames arrive over a real ZMQ socket as valid array-1.0 messages."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zmq

from beamlens.daemon.sim.microscope import SimulatedMicroscope
from beamlens.models.stem_sim import DynamicsParams, LatticeParams, Movie, MovieParams


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_frames_arrive_as_array10_with_ground_truth(ctx):
    params = MovieParams(lattice=LatticeParams(shape=(128, 160)), dynamics=DynamicsParams(n_defects=4))
    with SimulatedMicroscope(params, seed=5, n_frames=6, rate_hz=200.0, context=ctx) as scope:
        assert scope.address.startswith("tcp://127.0.0.1:")
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVTIMEO, 10_000)
        pull.connect(scope.address)
        scope.start()
        messages = [pull.recv_multipart() for _ in range(6)]
        scope.join(10)
        pull.close()
    expected = Movie(params, seed=5)
    for k, (header_bytes, payload) in enumerate(messages):
        header = json.loads(header_bytes)
        assert header["htype"] == "array-1.0"
        assert header["shape"] == [128, 160] and header["type"] == "uint16" and header["frame"] == k
        assert header["endianness"] == "little" and header["series_id"] == scope.series_id
        assert header["frame_time_s"] == params.dynamics.frame_time_s
        assert len(payload) == 128 * 160 * 2
        frame = np.frombuffer(payload, dtype="<u2").reshape(header["shape"])
        image, truth = next(expected.frames(1)) if k == 0 else (expected.step(), expected.render())[1]
        np.testing.assert_array_equal(frame, image)            # deterministic from the seed
        np.testing.assert_allclose(scope.truth[k].positions, truth.positions)
    assert len(scope.truth) == 6


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="socket_type"):
        SimulatedMicroscope(socket_type="dealer")
    with pytest.raises(ValueError, match="rate_hz"):
        SimulatedMicroscope(rate_hz=0)


def test_microscope_frames_through_zmq_into_the_defects_consumer(ctx):
    """Sender -> real ZMQ socket -> array-1.0 decoding as any receiver does -> consumer: the counts
    found follow the simulator's ground truth (the daemon's frame source does the decoding there)."""
    from defects_helpers import end, make_consumer, process

    from beamlens.consumers.base import Batch

    n = 8
    with SimulatedMicroscope(MovieParams(), seed=11, n_frames=n, rate_hz=None, context=ctx) as scope:
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVTIMEO, 10_000)
        pull.connect(scope.address)
        scope.start()
        consumer = info = None
        for _ in range(n):
            header_bytes, payload = pull.recv_multipart()
            header = json.loads(header_bytes)
            frame = np.frombuffer(payload, dtype=np.dtype(header["type"]).newbyteorder("<")).reshape(header["shape"])
            if consumer is None:
                consumer, info = make_consumer(tuple(header["shape"]), n, header["frame_time_s"], fit_after=20)
            k = np.array([header["frame"]], dtype=np.int64)
            process(consumer, Batch(info, frame[None], k, k + 1, np.zeros(1)))
        end(consumer)
        scope.join(10)
        pull.close()
    true_counts = np.array([len(t.ids) for t in scope.truth])
    assert np.abs(consumer.buffers.total - true_counts).max() <= 2
    assert consumer.tracker.dt == scope.frame_time_s
