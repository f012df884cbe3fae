"""The one configuration tree of the daemon (YAML, validated by pydantic, ``extra="forbid"``).

Loading order: the YAML file, then environment overrides ``BEAMLENS_<PATH>`` where ``__`` separates
levels and list items are addressed by index (``BEAMLENS_HTTP__PORT=9000``,
``BEAMLENS_SOURCES__BLUESKY__0__ADDRESS=tcp://127.0.0.1:5578``); override values are parsed as YAML
scalars. Only variables whose path names a config field are applied; other ``BEAMLENS_*`` variables
(Kubernetes service links for a Service named ``beamlens``: ``BEAMLENS_SERVICE_HOST``,
``BEAMLENS_PORT=tcp://...``) are listed once in a warning and by ``check-config``, never fatal. Consumer parameters are validated against the consumer's own ``Params`` model. Every error
is reported with the YAML path of the bad field (``consumers[1].params.n_components``), before
anything starts (tiled's config and its issue #1087 are the model).
"""
from __future__ import annotations

import importlib
import logging
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, DirectoryPath, Field, FilePath, PrivateAttr, ValidationError, field_validator,
                      model_validator)
from pydantic import SecretStr

from beamlens.consumers.base import Consumer

ENV_PREFIX = "BEAMLENS_"

log = logging.getLogger(__name__)

#: Consumers shipped with beamlens, by registry name (``class: stats`` in a config).
BUILTIN_CONSUMERS: dict[str, str] = {
    "stats": "beamlens.consumers.stats:StatsConsumer",
    "pca": "beamlens.consumers.pca:PCAConsumer",
    "embedding": "beamlens.consumers.embedding:EmbeddingConsumer",
    "unmixing": "beamlens.consumers.unmixing:UnmixingConsumer",
    "frame_stats": "beamlens.consumers.stats:FrameStatsConsumer",  # old name: stats with signal: frame
    "defects": "beamlens.consumers.defects:DefectsConsumer",
    "features": "beamlens.consumers.features:FeaturesConsumer",
    "trends": "beamlens.consumers.trends:TrendsConsumer",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_zmq_address(value: str) -> str:
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError("must be a ZeroMQ address such as tcp://127.0.0.1:5578 or ipc:///tmp/proxy")
    return value


class CurveClientConfig(Strict):
    """ZeroMQ CURVE keys for a socket that connects to a CURVE server (e.g. a bluesky >= 1.15 Proxy
    started with ``--out-curve-secret``). Key files are in ``zmq.auth.create_certificates`` format."""

    secret_key_file: FilePath = Field(description="this client's key pair (the .key_secret file)")
    server_public_key_file: FilePath = Field(description="the server's public key (.key file)")


class CurveServerConfig(Strict):
    """ZeroMQ CURVE for a socket beamlens binds: its key pair, and the folder of client public keys
    it admits (``*.key`` files from ``zmq.auth.create_certificates``); everyone else is refused."""

    secret_key_file: FilePath = Field(description="this server's key pair (the .key_secret file)")
    allowed_clients_dir: DirectoryPath = Field(description="folder of allowed client public keys")


class BlueskySourceConfig(Strict):
    """A subscription to a bluesky 0MQ proxy's output (``bluesky.callbacks.zmq.Proxy`` out port)."""

    name: str = Field("bluesky", pattern=r"^[a-z0-9_]+$", description="label used in metrics")
    address: str = Field(description="the proxy's out address, e.g. tcp://127.0.0.1:5578")
    prefix: str = Field("", description="bluesky Publisher prefix to accept (no spaces)")
    serializer: Literal["msgpack", "json", "pickle"] = "msgpack"
    allow_pickle: bool = Field(False, description="must be true to accept serializer: pickle")
    max_message_bytes: int = Field(64 * 2**20, gt=0, description="larger messages are dropped and counted")
    receive_hwm: int = Field(100_000, ge=0, description="0MQ receive high-water mark in messages")
    validate_documents: bool = Field(True, description="check every document against event_model's schemas")
    curve: CurveClientConfig | None = Field(None, description="CURVE encryption and authentication towards the proxy")
    lookup: str | None = Field(
        None, pattern=r"^tileds?://[^\s]+$",
        description="Tiled server holding this source's runs (tiled://host:port/path, tileds:// for https; API key from "
                    "TILED_API_KEY): the RunStart and descriptors of runs joined mid-way are looked up there by uid")

    _addr = field_validator("address")(_check_zmq_address)

    @field_validator("prefix")
    @classmethod
    def _no_space(cls, value: str) -> str:
        if " " in value:
            raise ValueError("a bluesky prefix may not contain spaces")
        return value

    @model_validator(mode="after")
    def _pickle_needs_opt_in(self) -> BlueskySourceConfig:
        if self.serializer == "pickle" and not self.allow_pickle:
            raise ValueError("serializer 'pickle' runs code from the network; set allow_pickle: true to accept that risk")
        return self


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


KAFKA_TOPIC_PATTERN = "{beamline}.bluesky.runengine.documents"
"""NSLS-II's topic name for a beamline's raw documents (bluesky-kafka, nslsii.kafka_utils)."""
_KAFKA_OWNED = ("bootstrap.servers", "group.id", "enable.auto.commit", "enable.auto.offset.store",
                "security.protocol", "sasl.password", "ssl.key.password")


def _check_bootstrap(value: str) -> str:
    for server in value.split(","):
        host, _, port = server.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{server!r} is not host:port (comma-separated list, e.g. 127.0.0.1:9092)")
    return value


class KafkaSecurityConfig(Strict):
    """How the consumer (or producer) talks to the brokers. The default, ``plaintext``, is only for
    a broker on loopback or a trusted network; facility brokers use ``sasl_ssl``."""

    protocol: Literal["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"] = "plaintext"
    ca_file: FilePath | None = Field(None, description="CA bundle for the brokers' TLS certificates (ssl.ca.location)")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    username: str | None = None
    password: SecretStr | None = Field(None, description="SASL password; never logged")

    def librdkafka(self) -> dict[str, str]:
        """The librdkafka settings for this section."""
        out = {"security.protocol": self.protocol}
        if self.ca_file is not None:
            out["ssl.ca.location"] = str(self.ca_file)
        if self.sasl_mechanism is not None:
            out["sasl.mechanism"] = self.sasl_mechanism
        if self.username is not None:
            out["sasl.username"] = self.username
        if self.password is not None:
            out["sasl.password"] = self.password.get_secret_value()
        return out


class KafkaSourceConfig(Strict):
    """A Kafka consumer-group member reading bluesky-kafka document topics (``bluesky_kafka.Publisher``:
    one message per document, value ``msgpack((name, doc))`` with msgpack-numpy arrays, key the run)."""

    name: str = Field("kafka", pattern=r"^[a-z0-9_]+$", description="label used in metrics")
    bootstrap_servers: str = Field("127.0.0.1:9092", description="comma-separated host:port list")
    beamline: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                                 description="with no topics: read <beamline>.bluesky.runengine.documents")
    topics: list[str] = Field(default_factory=list, description="topic names; one starting with ^ is a regular expression")
    group_id: str = Field("beamlens", alias="group.id", min_length=1, max_length=255,
                          description="consumer group: instances with the same group.id share the topics' partitions")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "latest", description="where a group with no committed offset starts")
    security: KafkaSecurityConfig = Field(default_factory=KafkaSecurityConfig)
    max_message_bytes: int = Field(64 * 2**20, gt=0, description="larger messages are dropped and counted")
    validate_documents: bool = Field(True, description="check every document against event_model's schemas")
    session_timeout_s: float = Field(10.0, ge=1, le=3600, description="a member silent this long is dropped from the group")
    commit_interval_s: float = Field(1.0, gt=0, description="offsets that may advance are committed at most this often")
    consumer_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="further librdkafka consumer settings (not those set above)")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    _bootstrap = field_validator("bootstrap_servers")(_check_bootstrap)

    @model_validator(mode="after")
    def _topics(self) -> KafkaSourceConfig:
        if not self.topics:
            if self.beamline is None:
                raise ValueError("give topics, or beamline for the topic <beamline>.bluesky.runengine.documents")
            self.topics = [KAFKA_TOPIC_PATTERN.format(beamline=self.beamline)]
        owned = sorted(k for k in self.consumer_config if k in _KAFKA_OWNED or k.startswith(("sasl.", "ssl.")))
        if owned:
            raise ValueError(f"consumer_config may not set {owned}: use the fields of this section")
        return self




class FrameSourceBase(Strict):
    """A detector frame stream over 0MQ. Socket type and bind/connect are configuration, not implied by
    the format: DECTRIS DCUs bind PUSH (connect a PULL here), a fan-out or preview stream may be PUB
    (use SUB), and ADZMQ can connect PUSH to a PULL bound here.

    Overflow policy (the frame queue between the receive thread and the decode thread):
    ``block`` never drops: a full queue stops reading, 0MQ's high-water marks fill and a PUSH sender
    blocks (a PUB sender drops, and the gaps are counted from frame numbers); ``latest`` keeps only
    the newest frames: on overflow, and whenever the decoder is ready, older waiting frames are
    skipped and counted (``beamlens_frames_dropped_total{reason="overflow"}``). Series start/end
    messages are never skipped.
    """

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="label used in metrics")
    socket: Literal["pull", "sub"] = Field("pull", description="receiving socket type (PULL for PUSH senders, SUB for PUB)")
    mode: Literal["connect", "bind"] = "connect"
    topic: str = Field("", description="SUB subscription prefix (SUB only)")
    overflow: Literal["block", "latest"] = "block"
    queue_size: int = Field(32, gt=0, description="received messages waiting for decoding (bounds memory: queue_size x message size)")
    max_batch: int = Field(16, gt=0, description="frames of one series handed to consumers in one call, at most")
    receive_hwm: int = Field(16, gt=0, description="0MQ receive high-water mark, messages")
    max_message_bytes: int = Field(256 * 2**20, gt=0, description="larger messages, and frames declaring more decoded bytes, are refused and counted")
    allow_remote_bind: bool = Field(False, description="allow mode: bind on a non-loopback TCP address")
    curve: CurveClientConfig | CurveServerConfig | None = Field(
        None, description="CURVE: client keys with mode connect, server keys + allowed clients with mode bind")

    _addr = field_validator("address", check_fields=False)(_check_zmq_address)

    @model_validator(mode="after")
    def _checks(self) -> FrameSourceBase:
        if self.topic and self.socket != "sub":
            raise ValueError("topic is only meaningful with socket: sub")
        if self.curve is not None and isinstance(self.curve, CurveServerConfig) != (self.mode == "bind"):
            raise ValueError("curve needs secret_key_file + allowed_clients_dir with mode: bind, "
                             "secret_key_file + server_public_key_file with mode: connect")
        host = self.address.removeprefix("tcp://").rsplit(":", 1)[0] if self.address.startswith("tcp://") else None
        if self.mode == "bind" and host is not None and host not in _LOOPBACK_HOSTS and not self.allow_remote_bind:
            raise ValueError(f"binding on {host!r} exposes the daemon beyond this host; use 127.0.0.1 or set allow_remote_bind: true")
        return self


class DectrisV1SourceConfig(FrameSourceBase):
    """DECTRIS SIMPLON stream v1 (EIGER/PILATUS4 DCU, QUADRO, ARINA): JSON multipart."""

    format: Literal["dectris-v1"]
    address: str = Field("tcp://127.0.0.1:9999", description="the DCU's stream address (DCU default port 9999)")
    verify_hash: bool = Field(False, description="check the MD5 of every image blob")


class DectrisV2SourceConfig(FrameSourceBase):
    """DECTRIS stream v2 (CBOR), also PSI Jungfraujoch image/preview streams."""

    format: Literal["dectris-v2"]
    address: str = Field("tcp://127.0.0.1:31001", description="the DCU's stream2 address (default port 31001)")
    channel: str | None = Field(None, description="image channel to analyse (default: the first one announced)")


class Array10SourceConfig(FrameSourceBase):
    """PSI array-1.0 (EPICS areaDetector NDPluginZMQ, std_daq) or pyzmq send_array."""

    format: Literal["array-1.0"]
    address: str = Field("tcp://127.0.0.1:5600", description="the sender's address")
    shape_order: Literal["numpy", "xy"] = Field("numpy", description="numpy: slowest axis first (spec); xy: fastest first (ADZMQ < 1.4)")


FrameSourceConfig = Annotated[DectrisV1SourceConfig | DectrisV2SourceConfig | Array10SourceConfig,
                              Field(discriminator="format")]


class SourcesConfig(Strict):
    bluesky: list[BlueskySourceConfig] = Field(default_factory=list)
    frames: list[FrameSourceConfig] = Field(default_factory=list)
    kafka: list[KafkaSourceConfig] = Field(default_factory=list, description="bluesky-kafka topics read as a consumer group")

    @model_validator(mode="after")
    def _unique_names(self) -> SourcesConfig:
        names = [s.name for s in self.bluesky] + [s.name for s in self.frames] + [s.name for s in self.kafka]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {dupes}")
        return self


class ConsumerConfig(Strict):
    """One analysis: ``class`` is a built-in name or ``package.module:Class``."""

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="instance name, used in metrics and URLs")
    class_: str = Field(alias="class")
    enabled: bool = True
    frame_sources: list[str] | None = Field(
        None, description="frame consumers: analyse only series from these frame sources (default: all)")
    params: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def resolve(self) -> type[Consumer]:
        """Import and return the consumer class.

        Raises:
            ValueError: if the class cannot be imported or is not a :class:`Consumer`.
        """
        target = BUILTIN_CONSUMERS.get(self.class_, self.class_)
        module_name, _, attr = target.partition(":")
        if not attr:
            raise ValueError(f"unknown consumer {self.class_!r}: use one of {sorted(BUILTIN_CONSUMERS)} or 'package.module:Class'")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import consumer {target!r}: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Consumer)):
            raise ValueError(f"{target!r} is not a beamlens Consumer subclass")
        return cls


class HTTPConfig(Strict):
    """The daemon's HTTP server: /metrics, /health, /api (maps as JSON and PNG)."""

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535, description="0 picks a free port (tests)")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header names accepted besides loopback names, IP literals and `host` "
                    "(DNS-rebinding guard); '*' accepts any")
    max_connections: int = Field(256, gt=0, le=65536, description="open HTTP connections at most; over it the longest-idle one is closed")
    header_timeout_s: float = Field(10.0, gt=0, description="a started request must have sent its headers within this many seconds")
    keepalive_timeout_s: float = Field(15.0, gt=0, description="idle keep-alive (or never-used) connections are closed after this long")
    body_timeout_s: float = Field(5.0, gt=0, description="a request body (never read: every route is GET) is discarded for at most this long")
    stream_write_timeout_s: float = Field(10.0, gt=0, description="a live-page stream whose writes do not complete within this long is dropped")


class RouterConfig(Strict):
    document_queue_size: int = Field(100_000, gt=0, description="bounded; the source blocks when full (documents are never dropped)")
    max_page_size: int = Field(256, gt=0, description="consecutive events are coalesced into pages of at most this many")
    max_failures_per_run: int = Field(10, gt=0, description="a consumer is quarantined for the run after this many exceptions")
    keep_runs: int = Field(10, gt=0, description="finished runs kept for the HTTP API")
    blas_threads: int = Field(1, ge=1, le=64, description="threads each BLAS call may use; 1 avoids oversubscription with the daemon's own threads")
    strict: bool = Field(False, description="re-raise consumer exceptions (tests only)")
    series_end_grace_s: float = Field(5.0, ge=0, description="a RunStop waits this long for an attached frame series to end")
    series_quiet_s: float = Field(2.0, ge=0, description="a series without end messages (array-1.0) counts as finished for a RunStop once no frame came for this long; a frame-only series of such a format closes its run after this long without a frame (later frames of it open a new run)")
    series_start_grace_s: float = Field(0.5, ge=0, description="with frame sources configured, the RunStop of a run with no frame series yet waits this long for one to start")
    frames_in_flight: int = Field(2, gt=0, description="decoded frame batches per source queued for the consumers, at most")
    stall_timeout_s: float = Field(60.0, gt=0, description="/health/live fails (and the systemd watchdog stops) when the router has not come round for this long")
    run_timeout_s: float = Field(3600.0, gt=0, description="a run with no document or frame for this long is closed as incomplete")
    shed_slow_consumers: bool = Field(True, description="when the document queue passes shed_queue_fraction, quarantine the consumer that used the most time, so intake never stalls")
    shed_queue_fraction: float = Field(0.8, gt=0, le=1)
    midway_hold_s: float = Field(2.0, ge=0, description="events of an unknown descriptor wait this long for it, then one is built from them (joining a run mid-way)")
    midway_max_descriptors: int = Field(8, gt=0, description="unknown descriptors whose events are held at once; events of more are rejected")
    midway_max_events: int = Field(10_000, gt=0, description="events held per unknown descriptor; at the limit a descriptor is built from them at once")
    pool_workers: int | None = Field(None, ge=1, le=256, description="threads of the daemon's pool for consumers' stages and background jobs (default: the CPUs this process may use, os.sched_getaffinity)")
    finish_timeout_s: float = Field(600.0, gt=0, description="a finishing run waits at most this long for its consumers' background jobs (final fits), then closes with what is installed")


class StateConfig(Strict):
    """Checkpoints of open runs, so that a restarted daemon resumes their analysis."""

    directory: Path | None = Field(None, description="where checkpoints live (created, mode 0700); null: no checkpoints")
    checkpoint_interval_s: float = Field(30.0, gt=0, description="open runs are checkpointed this often, and at shutdown")


class WebConfig(Strict):
    """The live web page at ``/`` and its server-sent event stream ``/api/stream``."""

    push_interval_s: float = Field(0.5, gt=0, le=60, description="at most one update pushed to browsers per interval")
    max_clients: int = Field(32, gt=0, description="open live-page connections; more are refused with 503")


class KafkaDocumentsTargetConfig(Strict):
    """Derived documents produced to a Kafka topic as ``bluesky_kafka.Publisher`` writes them (value
    ``msgpack((name, doc))`` with msgpack-numpy arrays), keyed by the raw run's uid so that all derived
    runs of one raw run share a partition and keep their order."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="comma-separated host:port list")
    topic: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,249}$", description="e.g. <beamline>.beamlens.documents")
    security: KafkaSecurityConfig = Field(default_factory=KafkaSecurityConfig)
    max_message_bytes: int = Field(16 * 2**20, gt=0, description="producer message.max.bytes; larger documents fail and are counted")
    producer_config: dict[str, str | int | float | bool] = Field(default_factory=dict, description="further librdkafka producer settings")

    _bootstrap = field_validator("bootstrap_servers")(_check_bootstrap)


class DocumentsOutputConfig(Strict):
    """Derived Bluesky documents: each consumer's results for a run as a run of its own, published
    through a bluesky 0MQ Proxy (``bluesky.callbacks.zmq.Publisher``, msgpack + msgpack-numpy)."""

    enabled: bool = Field(False, description="off by default")
    address: str = Field("tcp://127.0.0.1:5577", description="the proxy's IN address")
    prefix: str = Field("beamlens", pattern=r"^[^ ]*$",
                        description="Publisher prefix; subscribers filter on it (RemoteDispatcher(prefix=b'beamlens'))")
    event_interval_s: float = Field(1.0, ge=0, description="points processed are published at most this often")
    target: Literal["zmq", "kafka"] = Field("zmq", description="zmq: a bluesky 0MQ Proxy at address; kafka: the kafka section")
    kafka: KafkaDocumentsTargetConfig | None = Field(None, description="with target: kafka, where derived documents go")

    _addr = field_validator("address")(_check_zmq_address)

    @model_validator(mode="after")
    def _kafka_target(self) -> DocumentsOutputConfig:
        if self.target == "kafka" and self.kafka is None:
            raise ValueError("target: kafka needs the kafka section (bootstrap_servers, topic)")
        return self


class FilesOutputConfig(Strict):
    """Run files: one NeXus-style HDF5 file per run, written atomically at RunStop and on shutdown."""

    enabled: bool = Field(False, description="off by default")
    directory: Path = Field(Path("beamlens-runs"), description="created if missing")
    queue_size: int = Field(16, gt=0, description="runs waiting to be written; more block the router")


class TiledOutputConfig(Strict):
    """Results written into a Tiled server as they grow (``tiled.client``; ``pip install beamlens[tiled]``)."""

    enabled: bool = Field(False, description="off by default")
    uri: str = Field("http://127.0.0.1:8000/api/v1", description="the Tiled server's API address")
    api_key: SecretStr | None = Field(None, description="Tiled API key (else tiled's own TILED_API_KEY variable); "
                                      "never written to run files or logs")
    path: str = Field("beamlens", pattern=r"^[A-Za-z0-9_.-]+$",
                      description="container under the server's root, one child per raw run uid")
    write_interval_s: float = Field(1.0, gt=0, le=600, description="changes are written at most this often")

    @field_validator("uri")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// address of a Tiled server's API")
        return v


class EpicsOutputConfig(Strict):
    """EPICS PVAccess server (optional extra ``beamlens[epics]``, p4p): the newest run's maps as
    NTNDArray PVs, its scalar figures as NTScalar PVs, for Phoebus/CS-Studio and ImageJ."""

    enabled: bool = Field(False, description="off by default")
    prefix: str = Field("beamlens:", pattern=r"^[A-Za-z0-9_:.\-]*$",
                        description="prepended to every PV name, e.g. 'BL11:beamlens:'")
    interfaces: list[str] = Field(["127.0.0.1"], min_length=1,
                                  description="IP addresses the server binds (EPICS_PVAS_INTF_ADDR_LIST); loopback only by default")
    server_port: int = Field(5075, ge=0, le=65535, description="TCP port (0: any free port)")
    search_port: int = Field(5076, ge=1, le=65535, description="UDP search/beacon port (EPICS_PVAS_BROADCAST_PORT)")
    update_interval_s: float = Field(1.0, gt=0, le=60, description="PVs are updated at most this often")

    @field_validator("interfaces")
    @classmethod
    def _ip_addresses(cls, v: list[str]) -> list[str]:
        import ipaddress
        for address in v:
            ipaddress.ip_address(address)  # ValueError names the bad one
        return v


class OutputsConfig(Strict):
    web: WebConfig = Field(default_factory=WebConfig)
    documents: DocumentsOutputConfig = Field(default_factory=DocumentsOutputConfig)
    files: FilesOutputConfig = Field(default_factory=FilesOutputConfig)
    tiled: TiledOutputConfig = Field(default_factory=TiledOutputConfig)
    epics: EpicsOutputConfig = Field(default_factory=EpicsOutputConfig)


class LimitsConfig(Strict):
    """Bounds on what peers on the wire can make the daemon do (the threat model in the README):
    memory for result buffers and queues, message rates, open runs, and how far numbers from the
    wire may jump. Each refusal or downgrade is counted (``beamlens_limit_actions_total``)."""

    memory_budget_mib: float = Field(2048, gt=0, description="result buffers of open and kept runs, plus frame batches in flight, MiB; a run whose declared buffers do not fit is downgraded to a rolling window or refused")
    keep_runs_mib: float = Field(256, gt=0, description="finished runs kept for the HTTP API hold at most this much, MiB (besides router.keep_runs)")
    open_ended_chunk_points: int = Field(65536, gt=0, description="nav buffers of runs of unknown length grow by at most this many points at a time")
    open_ended_max_points: int = Field(1_000_000, gt=0, description="a run of unknown length keeps at most this many points; later points roll the window on")
    max_gap: int = Field(1_000_000, gt=0, description="a seq_num or frame number further than this beyond the run's last (or its declared length) is rejected as a bad message, never counted as missing")
    max_open_runs: int = Field(64, gt=0, description="open runs at most; the oldest is closed as incomplete to admit a new one")
    run_starts_per_s: float = Field(10.0, ge=0, description="RunStarts accepted per source per second (0: unlimited); more are rejected and counted")
    run_start_burst: int = Field(50, gt=0)
    series_starts_per_s: float = Field(10.0, ge=0, description="frame series starts accepted per frame source per second (0: unlimited); the frames of a refused series are dropped and counted")
    series_start_burst: int = Field(50, gt=0)
    max_data_keys: int = Field(1000, gt=0, description="descriptors with more data keys are rejected")
    batch_max_mib: float = Field(32, gt=0, description="frames stacked into one batch for the consumers hold at most this much, MiB (one frame may exceed it alone)")
    frame_queue_mib: float = Field(128, gt=0, description="received frame messages waiting for decoding hold at most this much per source, MiB")
    dead_thread_exit_s: float = Field(10.0, gt=0, description="after a vital thread has died, /health/live is 503 at once and the process exits with status 70 after this long")


class ExecutorConfig(Strict):
    """Where consumers' per-batch stages run: ``local`` (the daemon's own pool) or ``dask`` (the
    workers of a Dask distributed cluster, :mod:`beamlens.daemon.executors.dask`)."""

    kind: Literal["local", "dask"] = Field("local", description="local: the daemon's pool; dask: a Dask distributed cluster's workers")
    scheduler: str | None = Field(None, description="the Dask scheduler's address, tcp://host:port (kind dask); the cluster is trusted code execution, keep it on a private network or use tls://")
    batches_in_flight: int = Field(8, gt=0, le=4096, description="stage batches sent to the cluster and not yet back, at most (back-pressure: the router waits)")
    submit_timeout_s: float = Field(120.0, gt=0, description="a batch waiting this long for room in flight, or for its result, fails (counted as the consumer's failed stage)")
    partitions: list[str] = Field(default_factory=list, description="mergeable consumers (by name, without a stage) whose process also runs on the workers, one partition per batch, merged on the daemon with the consumer's merge()")
    resubmits: int = Field(2, ge=0, le=10, description="times a batch whose worker was lost is sent again (besides the scheduler's own reruns)")

    @field_validator("scheduler")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
            raise ValueError(f"scheduler must be tcp://host:port (or tls://, ucx://), got {v!r}")
        return v

    @model_validator(mode="after")
    def _scheduler_for_dask(self) -> ExecutorConfig:
        if self.kind == "dask" and not self.scheduler:
            raise ValueError("executor kind dask needs scheduler: tcp://host:port")
        return self


class Config(Strict):
    """Root of the configuration tree."""

    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    consumers: list[ConsumerConfig] = Field(default_factory=list)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    _ignored_environment: tuple[str, ...] = PrivateAttr(default=())

    @property
    def ignored_environment(self) -> tuple[str, ...]:
        """``BEAMLENS_*`` variables :func:`load_config` found but did not apply (no such field)."""
        return self._ignored_environment

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        names = [c.name for c in self.consumers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"consumer names must be unique; repeated: {dupes}")
        known = {f.name for f in self.sources.frames}
        for c in self.consumers:
            unknown = sorted(set(c.frame_sources or ()) - known)
            if unknown:
                raise ValueError(f"consumer {c.name}: frame_sources {unknown} are not configured frame sources")
        unknown = sorted(set(self.executor.partitions) - set(names))
        if unknown:
            raise ValueError(f"executor.partitions: {unknown} are not configured consumers")
        return self


MIN_RESULT_BUDGET_MIB = 64


def consumer_params(cls: type[Consumer], params: Mapping[str, Any], config: Config) -> Any:
    """``cls.Params`` validated from ``params`` with the daemon-wide settings a consumer's
    defaults may follow as pydantic validation context (``{"state_directory": Path | None}``:
    e.g. the trend store's default file), so consumers never import the daemon.

    Raises:
        ValidationError: bad params.
    """
    return cls.Params.model_validate(params, context={"state_directory": config.state.directory})


def memory_budget_errors(config: Config) -> list[tuple[str, str]]:
    """``(yaml_path, message)`` when the budget leaves too little room for result buffers after the
    frame sources' queues and batches (checked across sections, so after field validation)."""
    lim = config.limits
    frames = len(config.sources.frames) * (lim.frame_queue_mib + (config.router.frames_in_flight + 1) * lim.batch_max_mib)
    if lim.memory_budget_mib - frames >= MIN_RESULT_BUDGET_MIB:
        return []
    return [("limits.memory_budget_mib",
             f"{lim.memory_budget_mib:g} MiB leaves less than {MIN_RESULT_BUDGET_MIB} MiB for result buffers after "
             f"{frames:g} MiB of frame queues and batches (frame_queue_mib + (router.frames_in_flight + 1) x "
             "batch_max_mib per frame source)")]


class ConfigError(Exception):
    """A configuration that cannot be used. ``errors`` holds ``(yaml_path, message)`` pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {path or '<root>'}: {msg}" for path, msg in errors)
        super().__init__(f"invalid configuration {source}:\n{lines}")


def yaml_path(loc: tuple[Any, ...]) -> str:
    """Format a pydantic error location as a YAML path: ``('consumers', 1, 'params')`` ->
    ``consumers[1].params``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _field_type(model: type[BaseModel], name: str) -> tuple[bool, Any]:
    """``(exists, annotation)`` of field ``name`` (or its alias) of ``model``."""
    for field_name, info in model.model_fields.items():
        if name in (field_name, info.alias):
            return True, info.annotation
    return False, None


def _env_path_exists(annotation: Any, path: list[str]) -> bool:
    """Whether ``path`` (lower-case parts, list items by index) names a field of the config tree
    typed ``annotation``: models by field name or alias, lists by any integer index, free-form
    mappings (consumer ``params``) by any key."""
    if not path:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _env_path_exists(args[0], path)
    if origin in (typing.Union, types.UnionType):
        return any(_env_path_exists(a, path) for a in args if a is not type(None))
    if origin is list:
        return path[0].isdigit() and _env_path_exists(args[0], path[1:])
    if origin is dict or annotation is dict:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        exists, sub = _field_type(annotation, path[0])
        return exists and _env_path_exists(sub, path[1:])
    return False


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split the ``BEAMLENS_*`` variables of ``environ`` into config overrides and others.

    A variable is an override only when its path (``__`` between levels, list items by index)
    names a field of :class:`Config`; the others with the prefix (Kubernetes injects
    ``BEAMLENS_SERVICE_HOST``, ``BEAMLENS_PORT=tcp://...``, ``BEAMLENS_PORT_8000_TCP_ADDR`` ... for
    a Service named ``beamlens``) are returned separately, to be reported, never applied.

    Returns:
        ``({variable: path parts}, [ignored variable names])``, both sorted by name.
    """
    overrides, ignored = {}, []
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX):].split("__")]
        if all(path) and _env_path_exists(Config, path):
            overrides[key] = path
        else:
            ignored.append(key)
    return overrides, ignored


def _apply_env(data: dict[str, Any], environ: Mapping[str, str],
               overrides: dict[str, list[str]]) -> list[tuple[str, str]]:
    errors = []
    for key, path in overrides.items():
        raw = environ[key]
        node: Any = data
        try:
            for i, part in enumerate(path):
                last = i == len(path) - 1
                if isinstance(node, list):
                    idx = int(part)
                    if last:
                        node[idx] = yaml.safe_load(raw)
                    else:
                        node = node[idx]
                else:
                    if last:
                        node[part] = yaml.safe_load(raw)
                    else:
                        node = node.setdefault(part, [] if path[i + 1].isdigit() else {})
        except (ValueError, IndexError, TypeError, yaml.YAMLError):
            errors.append((key, "environment override does not address an existing config field "
                                "(list items must exist in the YAML)"))
    return errors


def load_config(path: str | Path | None = None, *, text: str | None = None,
                environ: Mapping[str, str] | None = None, warn: bool = True) -> Config:
    """Load, override from the environment, and validate a configuration.

    ``BEAMLENS_*`` variables that do not name a config field (see :func:`env_overrides`) are not
    applied: they are listed once in a warning (unless ``warn`` is false) and kept in
    ``config.ignored_environment``.

    Args:
        path: YAML file; ``None`` with ``text=None`` means an empty document (all defaults).
        text: YAML text instead of a file (tests).
        environ: environment to read overrides from (default ``os.environ``).
        warn: log the ignored variables.

    Raises:
        ConfigError: unreadable file, invalid YAML, or any invalid field, with YAML paths.
    """
    source = str(path) if path is not None else "<text>"
    try:
        if text is None and path is not None:
            text = Path(path).read_text()
        data = yaml.safe_load(text or "") or {}
    except OSError as exc:
        raise ConfigError(source, [("", f"cannot read file: {exc.strerror}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "the top level must be a mapping")])
    environ = os.environ if environ is None else environ
    overrides, ignored = env_overrides(environ)
    if ignored and warn:
        log.warning("ignoring %d %s* environment variable(s) that name no config field (e.g. injected by "
                    "Kubernetes for a Service): %s", len(ignored), ENV_PREFIX, ", ".join(ignored))
    env_errors = _apply_env(data, environ, overrides)
    if env_errors:
        raise ConfigError(source, env_errors)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [(yaml_path(e["loc"]), e["msg"]) for e in exc.errors()]) from None
    errors = memory_budget_errors(config)
    for i, consumer in enumerate(config.consumers):
        try:
            cls = consumer.resolve()
        except ValueError as exc:
            errors.append((f"consumers[{i}].class", str(exc)))
            continue
        try:
            consumer_params(cls, consumer.params, config)
        except ValidationError as exc:
            errors += [(yaml_path(("consumers", i, "params", *e["loc"])), e["msg"]) for e in exc.errors()]
    if errors:
        raise ConfigError(source, errors)
    config._ignored_environment = tuple(ignored)
    return config
