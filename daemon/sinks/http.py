"""The daemon's HTTP server (aiohttp, in its own thread and event loop). Read-only.

Routes:

- ``GET /metrics``: Prometheus text exposition of the daemon's registry (prometheus_client).
- ``GET /health``: ``{"live", "ready", "sources", "stalled_s"}``; 503 unless live and ready, so it
  serves as a container HEALTHCHECK. ``GET /health/live``: 503 when the router has not come round
  for ``router.stall_timeout_s`` (a consumer hangs): restart me. ``GET /health/ready``: 503 until
  every document source is connected: do not expect results yet.
- ``GET /api/runs``: summaries of open and recent runs, newest first, each listing its buffers.
- ``GET /api/runs/{uid}``: one summary (``uid`` may be ``latest``).
- ``GET /api/runs/{uid}/{consumer}/{buffer}.json``: the buffer as
  ``{"shape", "dtype", "units", "kind", "data", "axis"}`` with NaN as null.
- ``GET /api/runs/{uid}/{consumer}/{buffer}.png``: the buffer drawn with a colour scale.
- ``GET /api/runs/{uid}/{consumer}/{buffer}.f32``: the buffer as little-endian float32 in C order,
  NaN where not measured, shape in the ``X-Shape`` header (``"150,150"``): what the live page
  draws maps from (90 kB for a 150 x 150 map, against about 400 kB of JSON).
- ``GET /api/status``: health for people: queues, drops, errors, sources (see
  :func:`~beamlens.daemon.sinks.live.health_status`).
- ``GET /api/stream``: server-sent events for the live page: ``runs`` (summaries), ``status`` and
  ``changed`` (buffers whose contents changed since this client was last told), at most once per
  push interval.
- ``GET /``: the live web page (static files in ``daemon/sinks/web/``, no build step).
"""
from __future__ import annotations

import asyncio
import json
import logging
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..config import HTTPConfig
from ..metrics import Metrics
from ..results import BufferSnapshot, RunStore
from .httpguard import ConnectionGuard, host_allowed, limit_flood_logging, tcp_all_acked, tcp_window
from .jsonsafe import json_safe
from .live import LiveFeed, LiveState, changed_buffers, health_status
from .point import point_results
from .render import render_png

log = logging.getLogger(__name__)

WEB = files("beamlens.daemon.sinks") / "web"
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
HEARTBEAT_S = 15.0
REAP_INTERVAL_S = 1.0
#: Every response carries these: the page loads nothing from elsewhere and cannot be framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
#: A live-page stream is probed for reading with an SSE comment this large (see ``_probe_streams``).
PROBE_PAD = b":" + b" " * 16381 + b"\n\n"
PROBE_WRITE_TIMEOUT_S = 1.0
PROBE_MIN_INTERVAL_S = 2.0
#: A stream whose peer holds this much received-but-unread data is dropped at the next reap.
STALLED_UNREAD_BYTES = 256 * 1024


@dataclass(eq=False)
class StreamSlot:
    """One open ``/api/stream`` response."""

    response: web.StreamResponse
    transport: asyncio.Transport
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    evicted: bool = False
    last_write: float = field(default_factory=time.monotonic)
    max_window: int = 0

    @property
    def sock(self) -> Any:
        return self.transport.get_extra_info("socket")


def snapshot_json(snap: BufferSnapshot) -> dict[str, Any]:
    """A JSON-ready dict of a buffer snapshot (NaN and infinities become null)."""
    data = np.asarray(snap.data, dtype=np.float64)
    values = data.astype(object)
    values[~np.isfinite(data)] = None
    out: dict[str, Any] = {
        "run": snap.run_uid, "consumer": snap.consumer, "name": snap.spec.name, "kind": snap.spec.kind,
        "shape": list(data.shape), "dtype": snap.spec.dtype, "units": snap.spec.units,
        "description": snap.spec.description, "data": values.tolist(), "axis": None,
    }
    if snap.axis is not None:
        values, units = snap.axis
        out["axis"] = {"name": snap.spec.axis, "units": units, "values": np.asarray(values, dtype=float).tolist()}
    return out


class HTTPServer:
    """Serves metrics, health and live maps.

    Args:
        host, port: where to listen (port 0 picks a free one; see :attr:`port` after start).
        metrics: the registry to expose.
        store: runs to publish.
        readiness: returns ``{source_name: connected}``.
        liveness: returns ``{"live": bool, "stalled_s": float}``.
        feed: the live page's state (register it as a router listener); ``None`` serves the page
            without live updates.
        push_interval_s: at most one server-sent update per interval (s).
        max_clients: open ``/api/stream`` connections allowed. When all are taken, the streams are
            probed and those whose clients do not read are closed to make room; if every one reads,
            the newcomer gets 503.
        limits: connection limits, timeouts and the ``Host`` allow-list (``http`` section of the
            config; its ``host``/``port`` are not used here).

    Connections are guarded by :class:`~beamlens.daemon.sinks.httpguard.ConnectionGuard`; every
    response carries :data:`SECURITY_HEADERS`; a request whose ``Host`` header is not allowed gets
    421; run summaries and metadata are passed through :func:`~beamlens.daemon.sinks.jsonsafe.json_safe`.
    """

    def __init__(self, host: str, port: int, metrics: Metrics, store: RunStore,
                 readiness: Callable[[], dict[str, bool]] = dict,
                 liveness: Callable[[], dict[str, Any]] = lambda: {"live": True, "stalled_s": 0.0},
                 feed: LiveFeed | None = None,
                 push_interval_s: float = 0.5, max_clients: int = 32, limits: HTTPConfig | None = None):
        self.limits = limits or HTTPConfig()
        self.allowed_hosts = {*self.limits.allowed_hosts, host}
        self.guard = ConnectionGuard(self.limits.max_connections, self.limits.header_timeout_s,
                                     self.limits.keepalive_timeout_s,
                                     closed=lambda reason: metrics.http_connections_closed.labels(reason).inc())
        self.host = host
        self.port = port
        self.metrics = metrics
        self.store = store
        self.readiness = readiness
        self.liveness = liveness
        self.feed = feed
        self.push_interval_s = push_interval_s
        self.max_clients = max_clients
        self.extra_routes: list[web.RouteDef] = []
        self._streams: dict[asyncio.Transport, StreamSlot] = {}
        self._probe: asyncio.Task | None = None
        self._last_probe = -PROBE_MIN_INTERVAL_S
        self._listener: asyncio.base_events.Server | None = None
        self._pushed: asyncio.Condition | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard_requests], client_max_size=64 * 1024)
        app.on_response_prepare.append(_security_headers)
        app.add_routes([
            web.get("/metrics", self.handle_metrics),
            web.get("/health", self.handle_health),
            web.get("/health/{probe:live|ready}", self.handle_health),
            web.get("/api/runs", self.handle_runs),
            web.get("/api/runs/{uid}", self.handle_run),
            web.get(r"/api/runs/{uid}/{consumer}/{buffer}.{ext:json|png|f32}", self.handle_buffer),
            web.get("/api/runs/{uid}/{consumer}/point", self.handle_point),
            web.get("/api/runs/{uid}/{consumer}/{buffer}/history", self.handle_history),
            web.get("/api/status", self.handle_status),
            web.get("/api/stream", self.handle_stream),
            web.get("/", self.handle_index),
            web.get(r"/static/{name:[a-z0-9_.-]+}", self.handle_static),
            *self.extra_routes,
        ])
        return app

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Start serving in a background thread; returns once the socket is bound.

        Raises:
            OSError: if the address cannot be bound.
        """
        self._thread = threading.Thread(target=self._serve, name="beamlens-http", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("HTTP server did not start")
        if self._error is not None:
            raise self._error

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        limit_flood_logging()
        try:
            self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                         keepalive_timeout=self.limits.keepalive_timeout_s + REAP_INTERVAL_S,
                                         lingering_time=self.limits.body_timeout_s)
            self._loop.run_until_complete(self._runner.setup())
            self._listener = self._loop.run_until_complete(self._loop.create_server(
                self.guard.wrap(self._runner.server), self.host, self.port, backlog=128))
            self.port = self._listener.sockets[0].getsockname()[1]
            self._pushed = asyncio.Condition()
            tasks = [self._loop.create_task(self._reap_loop())]
            if self.feed is not None:
                tasks.append(self._loop.create_task(self._push_loop()))
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._started.set()
            return
        _check_fd_limit(self.limits.max_connections)
        log.info("serving the live page, maps and metrics on %s", self.url)
        self._started.set()
        self._loop.run_forever()
        for task in tasks:
            task.cancel()
        self._listener.close()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._begin_shutdown)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _begin_shutdown(self) -> None:
        """Tell open event streams to end (they run once more while the runner cleans up)."""
        self._closing = True
        self._loop.create_task(self._notify_pushed())
        self._loop.stop()

    async def _notify_pushed(self) -> None:
        async with self._pushed:
            self._pushed.notify_all()

    async def _reap_loop(self) -> None:
        """Once a second: close idle and half-sent connections, drop streams that stopped reading."""
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            try:
                self.guard.reap()
                now = time.monotonic()
                for slot in list(self._streams.values()):
                    window = tcp_window(slot.sock)
                    if window is not None:
                        slot.max_window = max(slot.max_window, window)
                        if slot.max_window - window >= STALLED_UNREAD_BYTES:
                            self._evict(slot)
                            continue
                    if slot.transport.get_write_buffer_size() and now - slot.last_write > self.limits.stream_write_timeout_s:
                        self._evict(slot)
                self.metrics.http_connections.set(len(self.guard.connections))
            except Exception:  # the server must outlive any bad connection
                log.exception("HTTP connection reaping failed")

    async def _push_loop(self) -> None:
        """Refresh the live state every push interval; wake the event streams when it changed."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.push_interval_s)
            try:
                changed = await loop.run_in_executor(None, self.feed.refresh)
            except Exception:  # the page must outlive any bad buffer
                log.exception("live page refresh failed")
                continue
            if changed:
                await self._notify_pushed()

    # -- middleware ----------------------------------------------------------------------------
    @web.middleware
    async def _guard_requests(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """Refuse foreign ``Host`` names (421); tell the guard while a request is in a handler."""
        if not host_allowed(request.headers.get("Host"), self.allowed_hosts):
            self.metrics.http_requests_refused.labels("host").inc()
            return web.Response(status=421, text="this server does not answer to that host name")
        transport = request.transport
        self.guard.request_started(transport)
        try:
            return await handler(request)
        finally:
            self.guard.request_finished(transport)

    # -- handlers ----------------------------------------------------------------------------
    async def handle_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_health(self, request: web.Request) -> web.Response:
        sources = self.readiness()
        ready = all(sources.values())
        body = {**self.liveness(), "ready": ready, "sources": sources}
        ok = {"live": body["live"], "ready": ready}.get(request.match_info.get("probe", ""), body["live"] and ready)
        return web.json_response(body, status=200 if ok else 503)

    async def handle_runs(self, request: web.Request) -> web.Response:
        if self.feed is not None:
            return _json(self.feed.summaries())
        return _json(json_safe(self.store.summaries()))

    async def handle_run(self, request: web.Request) -> web.Response:
        run = self.store.get(request.match_info["uid"])
        if run is None:
            raise web.HTTPNotFound(text="no such run")
        return _json(self.feed.summary(run) if self.feed is not None else json_safe(run.summary()))

    async def handle_point(self, request: web.Request) -> web.Response:
        """One scan point of one consumer (``?nav=row,col``): see :mod:`~beamlens.daemon.sinks.point`."""
        m = request.match_info
        try:
            body = point_results(self.store, m["uid"], m["consumer"], request.query.get("nav", ""))
        except KeyError as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        return _json(body)

    async def handle_history(self, request: web.Request) -> web.Response:
        """A ``single`` buffer's values over wall-clock time, as the server recorded them:
        ``{"t": [unix s, ...], "values": [[...], ...]}`` (oldest first, at most
        :data:`~beamlens.daemon.sinks.live.HISTORY_SAMPLES`)."""
        m = request.match_info
        run = self.store.get(m["uid"])
        if run is None or self.feed is None:
            raise web.HTTPNotFound(text="no such run")
        samples = list(self.feed.history.get((run.uid, m["consumer"], m["buffer"]), ()))
        return _json({"run": run.uid, "consumer": m["consumer"], "buffer": m["buffer"],
                      "t": [t for t, _ in samples], "values": [v for _, v in samples]})

    async def handle_buffer(self, request: web.Request) -> web.Response:
        m = request.match_info
        try:
            snap = self.store.snapshot(m["uid"], m["consumer"], m["buffer"])
        except KeyError as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        loop = asyncio.get_running_loop()
        if m["ext"] == "f32":
            body = np.ascontiguousarray(snap.data, dtype="<f4").tobytes()
            return web.Response(body=body, content_type="application/octet-stream",
                                headers={"X-Shape": ",".join(map(str, np.shape(snap.data))), "Cache-Control": "no-store"})
        if m["ext"] == "json":
            text = await loop.run_in_executor(None, lambda: json.dumps(snapshot_json(snap)))
            return web.Response(text=text, content_type="application/json", headers={"Cache-Control": "no-store"})
        try:
            index = int(request.query.get("index", 0))
        except ValueError:
            raise web.HTTPBadRequest(text="index must be an integer") from None
        run = self.store.get(m["uid"])
        axes = self.feed.summary(run)["axes"] if self.feed is not None and run is not None else None
        png = await loop.run_in_executor(None, render_png, snap, index, 80, axes)
        return web.Response(body=png, content_type="image/png")

    async def handle_status(self, request: web.Request) -> web.Response:
        return web.json_response(health_status(self.metrics.registry))

    async def handle_index(self, request: web.Request) -> web.Response:
        return await self._static("index.html")

    async def handle_static(self, request: web.Request) -> web.Response:
        return await self._static(request.match_info["name"])

    async def _static(self, name: str) -> web.Response:
        resource = WEB / name
        ctype = STATIC_TYPES.get("." + name.rpartition(".")[2])
        if ctype is None or not resource.is_file():
            raise web.HTTPNotFound(text="no such file")
        return web.Response(body=resource.read_bytes(), content_type=ctype, charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events (WHATWG HTML, "Server-sent events"): ``runs``, ``status``, ``changed``."""
        if self.feed is None:
            raise web.HTTPNotFound(text="live updates are not enabled")
        if len(self._streams) >= self.max_clients:
            await self._reclaim_streams()
            if len(self._streams) >= self.max_clients:
                self.metrics.http_requests_refused.labels("streams_full").inc()
                raise web.HTTPServiceUnavailable(text="too many live-page connections")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        slot = StreamSlot(response, request.transport)
        self._streams[slot.transport] = slot
        slot.max_window = tcp_window(slot.sock) or 0
        sent_runs: list[dict[str, Any]] | None = None
        sent_status: dict[str, Any] | None = None
        sent_digests: dict[tuple[str, str, str], str] = {}
        version = -1
        try:
            await self._write(slot, f"retry: {int(1000 * max(1.0, self.push_interval_s))}\n\n".encode())
            while not self._closing and not slot.evicted:
                state: LiveState = self.feed.state
                if state.version != version:
                    version = state.version
                    if state.runs != sent_runs:
                        await self._write(slot, _event("runs", state.runs))
                        sent_runs = state.runs
                    if state.status != sent_status:
                        await self._write(slot, _event("status", state.status))
                        sent_status = state.status
                    changed = changed_buffers(state, sent_digests)
                    if changed:
                        await self._write(slot, _event("changed", changed))
                    sent_digests = state.digests
                async with self._pushed:
                    try:
                        await asyncio.wait_for(self._pushed.wait(), HEARTBEAT_S)
                        beat = False
                    except asyncio.TimeoutError:
                        beat = True
                if beat and not slot.evicted:  # outside the condition: a stuck client must not hold it
                    await self._write(slot, b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.TimeoutError):
            pass
        finally:
            if self._streams.get(slot.transport) is slot:
                del self._streams[slot.transport]
        return response

    async def _write(self, slot: StreamSlot, data: bytes, timeout: float | None = None) -> None:
        """Write to a stream; a write that does not complete in time drops the client.

        Raises:
            asyncio.TimeoutError: the write timed out (the stream has been evicted).
        """
        try:
            async with asyncio.timeout(timeout or self.limits.stream_write_timeout_s):
                async with slot.lock:
                    await slot.response.write(data)
        except asyncio.TimeoutError:
            self._evict(slot)
            raise
        slot.last_write = time.monotonic()

    def _evict(self, slot: StreamSlot) -> None:
        """Close a stream whose client does not read, and free its slot now."""
        if slot.evicted:
            return
        slot.evicted = True
        if self._streams.get(slot.transport) is slot:
            del self._streams[slot.transport]
        slot.transport.abort()
        self.metrics.http_connections_closed.labels("stream_stalled").inc()
        log.warning("dropped a live-page client that does not read (%s)", slot.transport.get_extra_info("peername"))
        self._loop.create_task(self._notify_pushed())

    async def _reclaim_streams(self) -> None:
        """All stream slots are taken: find the clients that do not read and close them (one probe
        at a time, at most one every :data:`PROBE_MIN_INTERVAL_S`; concurrent callers share it)."""
        if self._probe is None or self._probe.done():
            if time.monotonic() - self._last_probe < PROBE_MIN_INTERVAL_S:
                return
            self._last_probe = time.monotonic()
            self._probe = asyncio.get_running_loop().create_task(self._probe_streams())
        await asyncio.shield(self._probe)

    async def _probe_streams(self) -> None:
        """Tell streams whose clients read from those that do not, and close the latter.

        The peer's advertised receive window (Linux ``tcpi_snd_wnd``) is free space in its socket
        buffer: it grows while a fresh connection receives, then shrinks by whatever the client
        leaves unread. Every stream is sent a 48 KiB SSE comment (filling a non-reader's window to
        its limit), the window is read once that is acknowledged; then 16 KiB more, then a short
        comment whose acknowledgement carries the window after the client had time to read. A
        reader's window is back where it was; a non-reader's is smaller by about what it left
        unread. A probe write that cannot complete within a second (buffers full) also counts as
        not reading; where the window is not reported, only that test applies.
        """
        slots = [s for s in self._streams.values() if not s.evicted]

        async def phase(slots: list[StreamSlot], data: bytes) -> list[StreamSlot]:
            async def write(slot: StreamSlot) -> bool:
                try:
                    await self._write(slot, data, timeout=PROBE_WRITE_TIMEOUT_S)
                    return True
                except (asyncio.TimeoutError, ConnectionResetError):
                    return False
            alive = [s for s, ok in zip(slots, await asyncio.gather(*(write(s) for s in slots))) if ok]
            await _until_acked(alive, 0.5)
            return alive

        slots = await phase(slots, PROBE_PAD * 3)
        before = {s: tcp_window(s.sock) for s in slots}
        slots = await phase(slots, PROBE_PAD)
        slots = await phase(slots, b": probe\n\n")
        for slot in slots:
            after = tcp_window(slot.sock)
            if before[slot] is not None and after is not None and before[slot] - after >= len(PROBE_PAD) // 4:
                self._evict(slot)


async def _until_acked(slots: list[StreamSlot], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(tcp_all_acked(s.sock) for s in slots if not s.evicted):
        await asyncio.sleep(0.02)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


def _json(data: Any) -> web.Response:
    return web.Response(text=json.dumps(data, allow_nan=False), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _event(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n".encode()


def _check_fd_limit(max_connections: int) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < max_connections + 256:
        log.warning("the open-file limit (%d) leaves little room beside http.max_connections (%d): raise it "
                    "(systemd LimitNOFILE=, docker --ulimit nofile=) or lower max_connections", soft, max_connections)
