"""The daemon's HTTP server (aiohttp, in its own thread and event loop). Read-only.

Routes:

- ``GET /metrics``: Prometheus text exposition of the daemon's registry (prometheus_client).
- ``GET /health``: ``{"live": true, "ready": <every source connected>, "sources": {...}}``;
  503 while not ready, so it serves as a container HEALTHCHECK and a readiness probe.
- ``GET /api/runs``: summaries of open and recent runs, newest first, each listing its buffers.
- ``GET /api/runs/{uid}``: one summary (``uid`` may be ``latest``).
- ``GET /api/runs/{uid}/{consumer}/{buffer}.json``: the buffer as
  ``{"shape", "dtype", "units", "kind", "data", "axis"}`` with NaN as null.
- ``GET /api/runs/{uid}/{consumer}/{buffer}.png``: the buffer drawn with a colour scale.
- ``GET /``: an HTML index of runs and their maps.
"""
from __future__ import annotations

import asyncio
import html
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..metrics import Metrics
from ..results import BufferSnapshot, RunStore
from .render import render_png

log = logging.getLogger(__name__)


def snapshot_json(snap: BufferSnapshot) -> dict[str, Any]:
    """A JSON-ready dict of a buffer snapshot (NaN and infinities become null)."""
    data = np.asarray(snap.data, dtype=np.float64)
    listed = np.where(np.isfinite(data), data, np.nan).tolist()

    def clean(v: Any) -> Any:
        if isinstance(v, list):
            return [clean(x) for x in v]
        return None if v != v else v

    out: dict[str, Any] = {
        "run": snap.run_uid, "consumer": snap.consumer, "name": snap.spec.name, "kind": snap.spec.kind,
        "shape": list(data.shape), "dtype": snap.spec.dtype, "units": snap.spec.units,
        "description": snap.spec.description, "data": clean(listed), "axis": None,
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
    """

    def __init__(self, host: str, port: int, metrics: Metrics, store: RunStore,
                 readiness: Callable[[], dict[str, bool]] = dict):
        self.host = host
        self.port = port
        self.metrics = metrics
        self.store = store
        self.readiness = readiness
        self.extra_routes: list[web.RouteDef] = []
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
            web.get("/api/runs", self.handle_runs),
            web.get("/api/runs/{uid}", self.handle_run),
            web.get(r"/api/runs/{uid}/{consumer}/{buffer}.{ext:json|png}", self.handle_buffer),
            web.get("/", self.handle_index),
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
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._started.set()
            return
        log.info("serving maps and metrics on %s", self.url)
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- handlers ----------------------------------------------------------------------------
    async def handle_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_health(self, request: web.Request) -> web.Response:
        sources = self.readiness()
        ready = all(sources.values())
        return web.json_response({"live": True, "ready": ready, "sources": sources}, status=200 if ready else 503)

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
        if m["ext"] == "json":
            return web.Response(text=json.dumps(snapshot_json(snap)), content_type="application/json")
        try:
            index = int(request.query.get("index", 0))
        except ValueError:
            raise web.HTTPBadRequest(text="index must be an integer") from None
        png = await asyncio.get_running_loop().run_in_executor(None, render_png, snap, index)
        return web.Response(body=png, content_type="image/png")

    async def handle_index(self, request: web.Request) -> web.Response:
        parts = ["<!doctype html><html lang=en><head><meta charset=utf-8><title>beamlens</title></head><body>",
                 "<h1>beamlens</h1><p><a href=/metrics>metrics</a> · <a href=/health>health</a> · "
                 "<a href=/api/runs>runs (JSON)</a></p>"]
        for run in self.store.summaries():
            uid = html.escape(run["uid"])
            parts.append(f"<h2>scan {run['scan_id']} · {html.escape(str(run['plan_name']))} · {run['status']} · "
                         f"{run['events_done']} points ({100 * run['progress']:.0f} %)</h2><p><code>{uid}</code></p><ul>")
            for cname, c in run["consumers"].items():
                for bname, b in c["buffers"].items():
                    base = f"/api/runs/{uid}/{html.escape(cname)}/{html.escape(bname)}"
                    parts.append(f"<li>{html.escape(cname)} / {html.escape(bname)} ({b['kind']}) "
                                 f"<a href='{base}.png'>PNG</a> <a href='{base}.json'>JSON</a></li>")
            parts.append("</ul>")
        parts.append("</body></html>")
        return web.Response(text="".join(parts), content_type="text/html")
