"""The one configuration tree of the daemon (YAML, validated by pydantic, ``extra="forbid"``).

Loading order: the YAML file, then environment overrides ``BEAMLENS_<PATH>`` where ``__`` separates
levels and list items are addressed by index (``BEAMLENS_HTTP__PORT=9000``,
``BEAMLENS_SOURCES__BLUESKY__0__ADDRESS=tcp://127.0.0.1:5578``); override values are parsed as YAML
scalars. Consumer parameters are validated against the consumer's own ``Params`` model. Every error
is reported with the YAML path of the bad field (``consumers[1].params.n_components``), before
anything starts (tiled's config and its issue #1087 are the model).
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from beamlens.consumers.base import Consumer

ENV_PREFIX = "BEAMLENS_"

#: Consumers shipped with beamlens, by registry name (``class: stats`` in a config).
BUILTIN_CONSUMERS: dict[str, str] = {
    "stats": "beamlens.consumers.stats:StatsConsumer",
    "pca": "beamlens.consumers.pca:PCAConsumer",
    "defects": "beamlens.consumers.defects:DefectsConsumer",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_zmq_address(value: str) -> str:
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError("must be a ZeroMQ address such as tcp://127.0.0.1:5578 or ipc:///tmp/proxy")
    return value


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


class SourcesConfig(Strict):
    bluesky: list[BlueskySourceConfig] = Field(default_factory=list)


class ConsumerConfig(Strict):
    """One analysis: ``class`` is a built-in name or ``package.module:Class``."""

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="instance name, used in metrics and URLs")
    class_: str = Field(alias="class")
    enabled: bool = True
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


class RouterConfig(Strict):
    document_queue_size: int = Field(100_000, gt=0, description="bounded; the source blocks when full (documents are never dropped)")
    max_page_size: int = Field(256, gt=0, description="consecutive events are coalesced into pages of at most this many")
    max_failures_per_run: int = Field(10, gt=0, description="a consumer is quarantined for the run after this many exceptions")
    keep_runs: int = Field(10, gt=0, description="finished runs kept for the HTTP API")
    strict: bool = Field(False, description="re-raise consumer exceptions (tests only)")


class Config(Strict):
    """Root of the configuration tree."""

    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    consumers: list[ConsumerConfig] = Field(default_factory=list)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        names = [c.name for c in self.consumers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"consumer names must be unique; repeated: {dupes}")
        return self


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


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> list[tuple[str, str]]:
    errors = []
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX):].split("__")]
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
                        node = node.setdefault(part, {})
        except (ValueError, IndexError, TypeError, yaml.YAMLError):
            errors.append((key, "environment override does not address an existing config field"))
    return errors


def load_config(path: str | Path | None = None, *, text: str | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Load, override from the environment, and validate a configuration.

    Args:
        path: YAML file; ``None`` with ``text=None`` means an empty document (all defaults).
        text: YAML text instead of a file (tests).
        environ: environment to read overrides from (default ``os.environ``).

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
    env_errors = _apply_env(data, os.environ if environ is None else environ)
    if env_errors:
        raise ConfigError(source, env_errors)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [(yaml_path(e["loc"]), e["msg"]) for e in exc.errors()]) from None
    errors = []
    for i, consumer in enumerate(config.consumers):
        try:
            cls = consumer.resolve()
        except ValueError as exc:
            errors.append((f"consumers[{i}].class", str(exc)))
            continue
        try:
            cls.Params.model_validate(consumer.params)
        except ValidationError as exc:
            errors += [(yaml_path(("consumers", i, "params", *e["loc"])), e["msg"]) for e in exc.errors()]
    if errors:
        raise ConfigError(source, errors)
    return config
