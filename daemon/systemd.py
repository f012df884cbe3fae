"""systemd service notification (``sd_notify(3)``), for ``Type=notify`` units with ``WatchdogSec=``.

When systemd starts beamlens it sets ``NOTIFY_SOCKET`` (and ``WATCHDOG_USEC`` if the unit has a
watchdog). The daemon then says ``READY=1`` once it is receiving, ``STOPPING=1`` when it shuts down,
and ``WATCHDOG=1`` every half watchdog period, but only while the router is making progress: a
consumer that hangs stops the pings, and systemd restarts the service (after which it resumes open
runs from their checkpoints). Without ``NOTIFY_SOCKET`` nothing happens. The protocol is a datagram
of ``KEY=VALUE`` lines on a Unix socket; an address starting with ``@`` is in the abstract namespace.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Talks to systemd if the environment says it is listening.

    Args:
        liveness: returns ``{"live": bool, ...}``; watchdog pings are sent only while live.
        environ: where to read ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` (default ``os.environ``).
    """

    def __init__(self, liveness: Callable[[], Mapping[str, Any]], environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 else None
        self.liveness = liveness
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, message: str) -> None:
        """Send one notification; failures are logged, never raised (systemd may be gone)."""
        if not self.enabled:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            log.warning("systemd notification %r failed: %s", message, exc)

    def start(self) -> None:
        if not self.enabled:
            return
        self.notify("READY=1")
        if self.watchdog_s is not None:
            self._thread = threading.Thread(target=self._ping, name="beamlens-watchdog", daemon=True)
            self._thread.start()
            log.info("systemd watchdog: pinging every %.1f s while the router makes progress", self.watchdog_s / 2)

    def _ping(self) -> None:
        while not self._stop.wait(self.watchdog_s / 2):
            if self.liveness().get("live"):
                self.notify("WATCHDOG=1")
            else:
                log.error("router stalled: withholding the systemd watchdog ping")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.notify("STOPPING=1")
