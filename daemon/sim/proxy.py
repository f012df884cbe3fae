"""A real bluesky 0MQ proxy (``bluesky.callbacks.zmq.Proxy``) in its own process, on loopback.

``python -m beamlens.daemon.sim.proxy [--in ADDR] [--out ADDR]`` binds both sides (random free
ports on 127.0.0.1 by default), prints one JSON line ``{"in": ..., "out": ...}`` and forwards until
killed. :class:`ProxyProcess` runs it from Python (tests, the demo) and can kill and restart it on
the same addresses (fault injection).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

LOOPBACK = "tcp://127.0.0.1"


def _address(bound: Any) -> str:
    return f"{LOOPBACK}:{bound}" if isinstance(bound, int) else str(bound)


def main(argv: list[str] | None = None) -> None:
    from bluesky.callbacks.zmq import Proxy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in", dest="in_address", default=LOOPBACK)
    parser.add_argument("--out", dest="out_address", default=LOOPBACK)
    parser.add_argument("--out-curve-secret", help="CURVE server key pair file for the out socket")
    parser.add_argument("--out-curve-client-keys", help="folder of allowed client public keys")
    args = parser.parse_args(argv)
    out_curve = None
    if args.out_curve_secret:
        from bluesky.callbacks.zmq import ServerCurve
        out_curve = ServerCurve(secret_path=args.out_curve_secret, client_public_keys=args.out_curve_client_keys, allow=None)
    proxy = Proxy(in_address=args.in_address, out_address=args.out_address, out_curve=out_curve)
    print(json.dumps({"in": _address(proxy.in_port), "out": _address(proxy.out_port)}), flush=True)
    try:
        proxy.start()
    except KeyboardInterrupt:
        pass


class ProxyProcess:
    """A bluesky Proxy subprocess.

    Args:
        in_address, out_address: where to bind (random loopback ports by default).
        out_curve: ``(server key pair file, folder of allowed client public keys)`` to require
            CURVE on the out socket (bluesky >= 1.15 ``ServerCurve``).

    Attributes:
        in_address: where RunEngine Publishers connect (``tcp://127.0.0.1:PORT``).
        out_address: where subscribers (beamlens) connect.
    """

    def __init__(self, in_address: str = LOOPBACK, out_address: str = LOOPBACK, timeout: float = 30.0,
                 out_curve: tuple[str, str] | None = None):
        self._timeout = timeout
        self.in_address, self.out_address = in_address, out_address
        self._curve_args = ["--out-curve-secret", out_curve[0], "--out-curve-client-keys", out_curve[1]] if out_curve else []
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> ProxyProcess:
        """Start the process and wait until it has bound its sockets.

        Raises:
            RuntimeError: if the proxy exits or prints nothing usable.
        """
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "beamlens.daemon.sim.proxy", "--in", self.in_address, "--out", self.out_address,
             *self._curve_args],
            stdout=subprocess.PIPE, text=True)
        line = self._proc.stdout.readline() if self._proc.stdout else ""
        try:
            addresses = json.loads(line)
        except json.JSONDecodeError:
            self.kill()
            raise RuntimeError(f"bluesky proxy did not start (said {line!r})") from None
        self.in_address, self.out_address = addresses["in"], addresses["out"]
        return self

    def kill(self) -> None:
        """SIGKILL the proxy (fault injection) and reap it."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(self._timeout)
            if self._proc.stdout:
                self._proc.stdout.close()
            self._proc = None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(self._timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(self._timeout)
            if self._proc.stdout:
                self._proc.stdout.close()
            self._proc = None

    def restart(self) -> None:
        """Kill and start again on the same addresses."""
        self.kill()
        self.start()

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
