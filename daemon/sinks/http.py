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
import threading
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..metrics import Metrics
from ..results import BufferSnapshot, RunStore
from .live import LiveFeed, LiveState, changed_buffers, health_status
from .render import render_png

log = logging.getLogger(__name__)

WEB = files("beamlens.daemon.sinks") / "web"
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
HEARTBEAT_S = 15.0


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
        max_clients: open ``/api/stream`` connections allowed; more get 503.
    """

    def __init__(self, host: str, port: int, metrics: Metrics, store: RunStore,
                 readiness: Callable[[], dict[str, bool]] = dict,
                 liveness: Callable[[], dict[str, Any]] = lambda: {"live": True, "stalled_s": 0.0},
                 feed: LiveFeed | None = None,
                 push_interval_s: float = 0.5, max_clients: int = 32):
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
        self._clients = 0
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
        app = web.Application()
        app.add_routes([
            web.get("/metrics", self.handle_metrics),
            web.get("/health", self.handle_health),
            web.get("/health/{probe:live|ready}", self.handle_health),
            web.get("/api/runs", self.handle_runs),
            web.get("/api/runs/{uid}", self.handle_run),
            web.get(r"/api/runs/{uid}/{consumer}/{buffer}.{ext:json|png|f32}", self.handle_buffer),
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
        try:
            self._runner = web.AppRunner(self.app(), access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            self._loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
            self._pushed = asyncio.Condition()
            pusher = self._loop.create_task(self._push_loop()) if self.feed is not None else None
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._started.set()
            return
        log.info("serving the live page, maps and metrics on %s", self.url)
        self._started.set()
        self._loop.run_forever()
        if pusher is not None:
            pusher.cancel()
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
        return web.json_response(self.store.summaries())

    async def handle_run(self, request: web.Request) -> web.Response:
        run = self.store.get(request.match_info["uid"])
        if run is None:
            raise web.HTTPNotFound(text="no such run")
        return web.json_response(run.summary())

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
        png = await loop.run_in_executor(None, render_png, snap, index)
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
        if self._clients >= self.max_clients:
            raise web.HTTPServiceUnavailable(text="too many live-page connections")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        self._clients += 1
        sent_runs: list[dict[str, Any]] | None = None
        sent_status: dict[str, Any] | None = None
        sent_digests: dict[tuple[str, str, str], str] = {}
        version = -1
        try:
            await response.write(f"retry: {int(1000 * max(1.0, self.push_interval_s))}\n\n".encode())
            while not self._closing:
                state: LiveState = self.feed.state
                if state.version != version:
                    version = state.version
                    if state.runs != sent_runs:
                        await _send(response, "runs", state.runs)
                        sent_runs = state.runs
                    if state.status != sent_status:
                        await _send(response, "status", state.status)
                        sent_status = state.status
                    changed = changed_buffers(state, sent_digests)
                    if changed:
                        await _send(response, "changed", changed)
                    sent_digests = state.digests
                async with self._pushed:
                    try:
                        await asyncio.wait_for(self._pushed.wait(), HEARTBEAT_S)
                    except asyncio.TimeoutError:
                        await response.write(b": keep-alive\n\n")
        except ConnectionResetError:
            pass
        finally:
            self._clients -= 1
        return response


async def _send(response: web.StreamResponse, event: str, data: Any) -> None:
    await response.write(f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())
