"""Defences of the HTTP server against idle, slow and hostile peers (asyncio level, below aiohttp).

aiohttp (3.x) has no timeout for reading request headers and no limit on open connections: 1,000
idle half-open connections exhaust a 1024-fd limit, and a slow-loris peer holds a connection for
ever. :class:`ConnectionGuard` wraps aiohttp's protocol factory and keeps, per connection, whether a
request is in a handler (``busy``), since when it has been idle, and whether bytes arrived since:

- an idle connection that has sent part of a request for longer than ``header_timeout_s`` is
  closed (``header_timeout``); one that has sent nothing for ``keepalive_timeout_s`` is closed
  (``idle``);
- past ``max_connections`` the longest-idle connection is closed (``shed``), never-used ones
  before kept-alive ones, so that a flood of half-open sockets cannot keep a health probe out;
  with none idle the newcomer is closed (``refused``).

:func:`host_allowed` is the DNS-rebinding guard (a page on ``evil.example`` that resolves to
127.0.0.1 sends ``Host: evil.example``): IP literals and loopback names are always accepted, names
only when configured. :func:`tcp_window` reads the peer's advertised receive window from Linux's
``TCP_INFO`` (``tcpi_snd_wnd``, Linux >= 5.4): it shrinks by what a peer has received but not
read, which is how the server tells a live-page client that never reads from one that does.
:class:`RateLimitFilter` caps repeated log records (accept errors, bad requests) per logger.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})

# struct tcp_info (linux/tcp.h): offsets of the fields used here.
_TCPI_UNACKED = 24
_TCPI_NOTSENT = 144
_TCPI_SND_WND = 228


def host_name(header: str) -> str:
    """The host part of a ``Host`` header, lower-case, without port and trailing dot
    (``"[::1]:8765"`` -> ``"::1"``, ``"Example.org.:80"`` -> ``"example.org"``)."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.partition(":")[0]
    return h.rstrip(".")


def host_allowed(header: str | None, allowed: Iterable[str]) -> bool:
    """Whether a request's ``Host`` header names this server.

    Accepted: no header (HTTP/1.0 clients; browsers always send one), any IP literal (a browser
    page whose origin is an IP address is not a rebinding attack), loopback names, and the names in
    ``allowed`` (``"*"`` accepts everything).
    """
    if header is None:
        return True
    allowed = {host_name(a) for a in allowed}
    name = host_name(header)
    if "*" in allowed or name in allowed or name in LOOPBACK_NAMES:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _tcp_info(sock: Any) -> bytes | None:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (AttributeError, OSError):
        return None


def tcp_window(sock: Any) -> int | None:
    """The peer's advertised receive window in bytes (``tcpi_snd_wnd``), None where the kernel or
    platform does not report it."""
    info = _tcp_info(sock)
    if info is None or len(info) < _TCPI_SND_WND + 4:
        return None
    return struct.unpack_from("I", info, _TCPI_SND_WND)[0]


def tcp_all_acked(sock: Any) -> bool:
    """Whether everything written to the socket has been sent and acknowledged (True where unknown)."""
    info = _tcp_info(sock)
    if info is None or len(info) < _TCPI_NOTSENT + 4:
        return True
    unacked = struct.unpack_from("I", info, _TCPI_UNACKED)[0]
    notsent = struct.unpack_from("I", info, _TCPI_NOTSENT)[0]
    return unacked == 0 and notsent == 0


@dataclass(eq=False)
class Connection:
    """One accepted connection, as the guard sees it."""

    transport: asyncio.Transport
    opened: float
    idle_since: float
    busy: int = 0
    served: int = 0
    received_while_idle: bool = False


class _GuardedProtocol(asyncio.Protocol):
    """Forwards every protocol callback to aiohttp's ``RequestHandler``, telling the guard first."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard):
        self.inner, self.guard = inner, guard
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)
        self.guard.opened(self.transport)

    def data_received(self, data: bytes) -> None:
        self.guard.received(self.transport)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.closed(self.transport)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ConnectionGuard:
    """Bounds and reaps the HTTP server's connections (event-loop thread only).

    Args:
        max_connections: open connections at most.
        header_timeout_s: an idle connection that has sent part of a request is closed after this.
        keepalive_timeout_s: an idle connection that has sent nothing is closed after this.
        closed: ``closed(reason)`` is called for every connection the guard closes (a counter).
        clock: monotonic seconds.
    """

    def __init__(self, max_connections: int, header_timeout_s: float, keepalive_timeout_s: float,
                 closed: Callable[[str], None] = lambda reason: None,
                 clock: Callable[[], float] = time.monotonic):
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.on_close = closed
        self.clock = clock
        self.connections: dict[asyncio.Transport, Connection] = {}

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that guards the protocols ``factory`` makes."""
        return lambda: _GuardedProtocol(factory(), self)

    # -- protocol callbacks ---------------------------------------------------------------------
    def opened(self, transport: asyncio.Transport) -> None:
        now = self.clock()
        conn = Connection(transport, now, now)
        self.connections[transport] = conn
        if len(self.connections) > self.max_connections:
            idle = [c for c in self.connections.values() if not c.busy and c is not conn]
            if idle:
                self._close(min(idle, key=lambda c: (c.served > 0, c.idle_since)), "shed")
            else:
                self._close(conn, "refused")

    def received(self, transport: asyncio.Transport) -> None:
        conn = self.connections.get(transport)
        if conn is not None and not conn.busy:
            conn.received_while_idle = True

    def closed(self, transport: asyncio.Transport) -> None:
        self.connections.pop(transport, None)

    # -- request hooks (middleware) --------------------------------------------------------------
    def request_started(self, transport: asyncio.Transport | None) -> None:
        conn = self.connections.get(transport)  # type: ignore[arg-type]
        if conn is not None:
            conn.busy += 1

    def request_finished(self, transport: asyncio.Transport | None) -> None:
        conn = self.connections.get(transport)  # type: ignore[arg-type]
        if conn is not None:
            conn.busy = max(0, conn.busy - 1)
            conn.served += 1
            conn.idle_since = self.clock()
            conn.received_while_idle = False

    # -- reaping -------------------------------------------------------------------------------
    def reap(self) -> None:
        """Close idle connections past their timeout (call about once a second)."""
        now = self.clock()
        for conn in list(self.connections.values()):
            if conn.busy:
                continue
            if conn.received_while_idle and now - conn.idle_since > self.header_timeout_s:
                self._close(conn, "header_timeout")
            elif now - conn.idle_since > self.keepalive_timeout_s:
                self._close(conn, "idle")

    def _close(self, conn: Connection, reason: str) -> None:
        self.connections.pop(conn.transport, None)
        conn.transport.abort()
        self.on_close(reason)


@dataclass
class _Budget:
    window_start: float = 0.0
    emitted: int = 0
    suppressed: int = 0


@dataclass
class RateLimitFilter(logging.Filter):
    """Lets at most ``burst`` records per logger and message template through every ``period_s``;
    the first record after a suppressed stretch says how many were left out."""

    burst: int = 10
    period_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _budgets: dict[tuple[str, str], _Budget] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        budget = self._budgets.get(key)
        if budget is None:
            if len(self._budgets) > 1000:
                self._budgets.clear()
            budget = self._budgets[key] = _Budget()
        now = self.clock()
        if now - budget.window_start >= self.period_s:
            if budget.suppressed:
                record.msg = f"{record.msg} ({budget.suppressed} similar messages suppressed)"
            budget.window_start, budget.emitted, budget.suppressed = now, 0, 0
        if budget.emitted >= self.burst:
            budget.suppressed += 1
            return False
        budget.emitted += 1
        return True


#: One filter for the loggers an HTTP flood makes talk (shared by every server in the process).
LOG_LIMIT = RateLimitFilter()
FLOOD_LOGGERS = ("asyncio", "aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal")


def limit_flood_logging() -> None:
    """Attach :data:`LOG_LIMIT` to :data:`FLOOD_LOGGERS` (idempotent)."""
    for name in FLOOD_LOGGERS:
        logging.getLogger(name).addFilter(LOG_LIMIT)
