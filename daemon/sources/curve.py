"""ZeroMQ CURVE (RFC 26/CurveZMQ) for the sockets beamlens opens, with pyzmq's ZAP authenticator.

- Sockets that *connect* (to a bluesky proxy, to a detector) are CURVE clients: their key pair and
  the server's public key come from ``zmq.auth`` certificate files.
- Sockets that *bind* are CURVE servers, and a :class:`zmq.auth.thread.ThreadAuthenticator` (one per
  0MQ context) admits only the clients whose public keys are in the configured folder. Each bound
  socket has its own ZAP domain (its source name), so sources can allow different clients.

Failed handshakes (wrong key, unknown client) show up as socket-monitor events, which the sources
count in ``beamlens_source_handshake_failures_total``.
"""
from __future__ import annotations

import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL

_authenticators: dict[int, ThreadAuthenticator] = {}
_lock = threading.Lock()


def handshake_failure_reason(event: int) -> str:
    """Metric label for a failed-handshake monitor event."""
    return {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth", zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol"}.get(event, "other")


def apply_curve_client(sock: zmq.Socket, secret_key_file: Path, server_public_key_file: Path) -> None:
    """Make ``sock`` a CURVE client before it connects.

    Raises:
        ValueError: if the secret key file holds no secret key.
    """
    public, secret = zmq.auth.load_certificate(secret_key_file)
    if secret is None:
        raise ValueError(f"{secret_key_file} holds no secret key")
    server_public, _ = zmq.auth.load_certificate(server_public_key_file)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)


def apply_curve_server(sock: zmq.Socket, context: zmq.Context, domain: str, secret_key_file: Path,
                       allowed_clients_dir: Path) -> None:
    """Make ``sock`` a CURVE server before it binds, admitting only the clients whose public key
    files (``*.key``) are in ``allowed_clients_dir``.

    Raises:
        ValueError: if the secret key file holds no secret key.
    """
    public, secret = zmq.auth.load_certificate(secret_key_file)
    if secret is None:
        raise ValueError(f"{secret_key_file} holds no secret key")
    with _lock:
        auth = _authenticators.get(id(context))
        if auth is None:
            auth = ThreadAuthenticator(context)
            auth.start()
            _authenticators[id(context)] = auth
        auth.configure_curve(domain=domain, location=str(allowed_clients_dir))
    sock.setsockopt_string(zmq.ZAP_DOMAIN, domain)
    sock.setsockopt(zmq.CURVE_SERVER, True)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
