"""The daemon's lifecycle: sources (Bluesky documents, detector frames) -> router -> consumers,
with the sinks beside them.

Sinks hang on the router's listener hook: the live page's feed always, derived documents and run
files when enabled in ``outputs``. Start order is sinks, router, HTTP server, then sources (nothing
is received before it can be routed and published); stop order is the reverse: sources stop
receiving, the router drains its queue and closes open runs (their documents and files are still
written), the sinks finish, then the HTTP server stops.

Vital threads (router, every source's threads, run-file writer, HTTP server) are watched
(:class:`~beamlens.daemon.isolation.ThreadWatch`): one that dies despite the per-item isolation
turns ``/health/live`` 503 at once, and :meth:`Daemon.run_until_signalled` then stops the daemon
(checkpointing open runs) and returns :data:`EXIT_THREAD_DIED` after ``limits.dead_thread_exit_s``,
so systemd (``Restart=on-failure``) or Kubernetes restart it and it resumes from the checkpoints.
"""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry

from .config import Config
from .isolation import ThreadWatch
from .metric_trends import MetricSampler, check_metric_names
from .metrics import Metrics
from .results import RunStore
from .router import Router
from .sinks.documents import DocumentsSink
from .sinks.http import HTTPServer
from .sinks.live import LiveFeed
from .sinks.runfiles import RunFileWriter
from .sources.bluesky_zmq import BlueskyZmqSource
from .sources.frame_zmq import FrameSource
from .sources.kafka import KafkaSource
from .systemd import SystemdNotifier

log = logging.getLogger(__name__)

EXIT_THREAD_DIED = 70
"""Exit status after a vital thread died (``EX_SOFTWARE``); any non-zero status makes systemd restart."""
WATCH_INTERVAL_S = 0.5


class Daemon:
    """One beamlens daemon built from a validated :class:`Config`.

    Args:
        config: the configuration.
        registry: Prometheus registry (a fresh one by default, so tests can run several daemons).
    """

    def __init__(self, config: Config, registry: CollectorRegistry | None = None):
        self.config = config
        self.metrics = Metrics(registry)
        kafka_names = [s.name for s in config.sources.kafka]
        self.metrics.declare([s.name for s in config.sources.bluesky] + kafka_names, [s.name for s in config.sources.frames],
                             [c.name for c in config.consumers], kafka_sources=kafka_names)
        # trends series of daemon metrics: every name must be in the registry (else ConfigError)
        self.metric_sampler = MetricSampler(check_metric_names(config, self.metrics.registry), self.metrics)
        self.store = RunStore(config.router.keep_runs, config.limits.keep_runs_mib * 2**20)
        self.router = Router(config, self.metrics, self.store)
        self.sources = [BlueskyZmqSource(c, self.metrics, self.router.submit, max_data_keys=config.limits.max_data_keys)
                        for c in config.sources.bluesky]
        # Kafka consumer-group members: runs resume when read again, not at start (see sources/kafka.py)
        self.sources += [KafkaSource(c, self.metrics, self.router, config.state.directory,
                                     max_data_keys=config.limits.max_data_keys) for c in config.sources.kafka]
        if config.sources.kafka:
            self.router.restore_at_start = False
        self.feed = LiveFeed(self.store, self.metrics.registry)
        self.router.listeners.append(self.feed)
        outputs = config.outputs
        self.documents = (DocumentsSink(outputs.documents, self.metrics,
                                        run_files=outputs.files.directory if outputs.files.enabled else None)
                          if outputs.documents.enabled else None)
        self.files = RunFileWriter(config, self.metrics, self.store) if outputs.files.enabled else None
        self.router.listeners += [s for s in (self.documents, self.files) if s is not None]
        self.tiled = None
        if outputs.tiled.enabled:
            from .sinks.tiled import TiledSink  # tiled.client is the optional extra beamlens[tiled]
            self.tiled = TiledSink(outputs.tiled, self.metrics, self.store)
            self.router.listeners.append(self.tiled)
        self.epics = None
        if outputs.epics.enabled:
            from .sinks.epics import EpicsSink  # optional extra beamlens[epics]
            self.epics = EpicsSink(outputs.epics, self.store, self.metrics)
        self.frame_sources = [FrameSource(c, self.metrics, self.router.submit, config.router.frames_in_flight,
                                          limits=config.limits)
                              for c in config.sources.frames]
        self.router.frames.sources = self.frame_sources
        self.http = HTTPServer(config.http.host, config.http.port, self.metrics, self.store, self.readiness,
                               liveness=self.liveness,
                               feed=self.feed, push_interval_s=outputs.web.push_interval_s,
                               max_clients=outputs.web.max_clients, limits=config.http)
        self.systemd = SystemdNotifier(self.liveness)
        self._stopped = threading.Event()
        self.watch = ThreadWatch(self._vital_threads)
        self._running = False

    def _vital_threads(self) -> Iterator[threading.Thread | None]:
        if not self._running:
            return
        yield self.router.thread
        yield self.metric_sampler.thread
        for source in self.frame_sources:
            yield from source.threads
        for part in (*self.sources, self.files, self.http):
            yield getattr(part, "_thread", None)

    def readiness(self) -> dict[str, bool]:
        return {s.name: s.connected.is_set() for s in self.sources}

    def liveness(self) -> dict[str, float | bool]:
        """Whether the router is making progress: ``{"live": bool, "stalled_s": seconds}``."""
        stalled = self.router.stalled_for()
        dead = self.watch.dead()
        body: dict = {"live": stalled < self.config.router.stall_timeout_s and not dead, "stalled_s": round(stalled, 3)}
        if dead:
            body["dead_threads"] = dead
        return body

    def start(self) -> None:
        if self.files is not None:
            self.files.start()
        if self.tiled is not None:
            self.tiled.start()
        self.router.start()
        self.metric_sampler.start()
        self.http.start()
        if self.epics is not None:
            self.epics.start()
        for source in [*self.sources, *self.frame_sources]:
            source.start()
        self._running = True
        log.info("beamlens started: %d document source(s), %d frame source(s), %d consumer(s), HTTP on %s",
                 len(self.sources), len(self.frame_sources), len(self.config.consumers), self.http.url)
        self.systemd.start()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop receiving, process what is queued (up to ``drain_timeout`` s), checkpoint open runs
        (or, without ``state.directory``, close them as ``incomplete``), flush documents and run
        files, stop serving."""
        self._running = False
        self.systemd.stop()
        for source in [*self.sources, *self.frame_sources]:
            source.stop()
        self.metric_sampler.stop()
        alive = self.router.thread is not None and self.router.thread.is_alive()
        if alive and not self.router.wait_idle(drain_timeout):
            log.error("document queue not drained within %.0f s", drain_timeout)
        self.router.stop()
        if self.documents is not None:
            self.documents.close()
        if self.files is not None:
            self.files.close()
        if self.tiled is not None:
            self.tiled.close()
        if self.epics is not None:
            self.epics.update()  # the runs' final values
            self.epics.close()
        self.http.stop()
        self._stopped.set()
        log.info("beamlens stopped")

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_until_signalled(self) -> int:
        """Start, serve until SIGINT or SIGTERM, then stop cleanly (main thread only).

        Returns:
            0 after a signal; :data:`EXIT_THREAD_DIED` when a vital thread died and stayed dead for
            ``limits.dead_thread_exit_s`` (the daemon is stopped first, open runs checkpointed).
        """
        done = threading.Event()
        code = 0

        def on_signal(signum: int, frame: object) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            done.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            while not done.wait(WATCH_INTERVAL_S):
                dead = self.watch.dead()
                if dead and self.watch.dead_for() >= self.config.limits.dead_thread_exit_s:
                    log.critical("vital thread(s) %s dead for %.0f s: stopping so that the service manager restarts "
                                 "beamlens (exit status %d)", dead, self.watch.dead_for(), EXIT_THREAD_DIED)
                    code = EXIT_THREAD_DIED
                    break
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return code
