"""CURVE on a frame socket beamlens binds: a detector with an allowed client key gets its frames
analysed; one with an unknown key is refused at the handshake, counted, and nothing it sends lands."""
from __future__ import annotations

import numpy as np
import zmq
import zmq.auth

from beamlens.daemon.sim.detectors import array10_messages, synthetic_frames
from frame_helpers import counter, daemon_yaml
from helpers import curve_keys, wait_for


def curve_push(address: str, secret: str, server_public: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    public, secret_key = zmq.auth.load_certificate(secret)
    sock.curve_publickey, sock.curve_secretkey = public, secret_key
    sock.curve_serverkey = zmq.auth.load_certificate(server_public)[0]
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def test_bound_frame_source_admits_only_allowed_client_keys(tmp_path, make_daemon):
    keys = curve_keys(tmp_path)
    server_secret, detector_secret, stranger_secret = keys.server_secret, keys.client_secret, keys.stranger_secret
    allowed = keys.allowed_dir
    source = (f"    - {{name: cam, format: array-1.0, mode: bind, address: 'tcp://127.0.0.1:0', "
              f"curve: {{secret_key_file: '{server_secret}', allowed_clients_dir: '{allowed}'}}}}\n")
    daemon = make_daemon(daemon_yaml([source]))
    address = daemon.frame_sources[0].address
    server_public = keys.server_public

    stranger = curve_push(address, stranger_secret, server_public)
    detector = curve_push(address, detector_secret, server_public)
    try:
        for parts in array10_messages(synthetic_frames(3, (8, 8), seed=9), source="intruder"):
            stranger.send_multipart(parts)  # queued on the stranger's side; the handshake never completes
        frames = list(synthetic_frames(5, (16, 16)))
        for parts in array10_messages(frames, source="det"):
            detector.send_multipart(parts)
        wait_for(lambda: counter(daemon, "beamlens_frames_processed_total", source="cam") == 5)
        wait_for(lambda: counter(daemon, "beamlens_source_handshake_failures_total", source="cam", reason="auth") >= 1)
    finally:
        stranger.close()
        detector.close()
    (run,) = daemon.store.summaries()
    assert run["uid"].startswith("cam-det-") and run["frames_done"] == 5
    np.testing.assert_array_equal(daemon.store.snapshot(run["uid"], "fs", "total").data, [f.sum() for f in frames])
    assert counter(daemon, "beamlens_frames_received_total", source="cam") == 5
