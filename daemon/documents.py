"""Decoding and validation of Bluesky documents received as bytes.

Wire format (bluesky ``bluesky.callbacks.zmq.Publisher``, bluesky 1.15): one single-part 0MQ message
``prefix + b" " + name + b" " + serializer(doc)``. The payload serializers:

- ``msgpack`` (default here): msgpack, with numpy arrays in msgpack-numpy's map form
  (``{b"nd": True, b"type": descr, b"shape": [...], b"data": bytes}``). msgpack-numpy's own decoder
  unpickles object arrays (``kind == b"O"``), so beamlens decodes that form itself and refuses object,
  structured and void dtypes: nothing in a message can run code.
- ``json``: ``json.loads``; arrays arrive as lists.
- ``pickle``: bluesky's default; only with ``allow_pickle: true`` in the config, because unpickling
  network data runs whatever code the sender chooses.

Each document is then checked against event_model's JSON schemas (``event_model.schema_validators``).
"""
from __future__ import annotations

import functools
import json
import logging
import pickle  # only used when the config explicitly opts in (allow_pickle)
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np
from event_model import DocumentNames, schema_validators
from jsonschema.exceptions import ValidationError as SchemaError

log = logging.getLogger(__name__)

PROBE_NAME = "beamlens_probe"
"""Name used by readiness probes (sent with the separate prefix :data:`PROBE_PREFIX`)."""
PROBE_PREFIX = b"beamlens-probe"

msgpack_serializer = functools.partial(msgpack.packb, default=msgpack_numpy.encode)
"""The serializer beamlens publishes with and expects by default: msgpack, numpy arrays in
msgpack-numpy's map form (pair: ``serializer: msgpack`` in a source config, or
``make_deserializer("msgpack")`` in a RemoteDispatcher)."""

MAX_NESTING = 64
"""Deepest container nesting accepted in a document (events are about 4 deep)."""


class DecodeError(Exception):
    """A message that is not a usable document; ``reason`` is the metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Document:
    """One decoded, validated Bluesky document with where it came from."""

    name: str
    doc: dict[str, Any]
    source: str
    received: float


_ALLOWED_KINDS = set("biuf")  # bool, signed, unsigned, float (complex has no place in documents)


def _decode_ndarray(obj: dict[Any, Any]) -> Any:
    """msgpack object hook for msgpack-numpy arrays, refusing anything that is not plain numeric."""
    if b"nd" not in obj:
        return obj
    try:
        descr = obj[b"type"]
        if isinstance(descr, bytes):
            descr = descr.decode()
        if not isinstance(descr, str) or obj.get(b"kind") in (b"O", b"V"):
            raise DecodeError("unsafe_array", "object or structured arrays are refused")
        dtype = np.dtype(descr)
        if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject:
            raise DecodeError("unsafe_array", f"array dtype {descr!r} is refused")
        data = obj[b"data"]
        if obj[b"nd"] is True:
            shape = tuple(int(n) for n in obj[b"shape"])
            if any(n < 0 for n in shape) or int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(data):
                raise DecodeError("bad_array", f"array of shape {shape} and dtype {dtype} does not match its {len(data)} bytes")
            return np.frombuffer(data, dtype=dtype).reshape(shape)
        if len(data) != dtype.itemsize:
            raise DecodeError("bad_array", "numpy scalar of the wrong size")
        return np.frombuffer(data, dtype=dtype)[0]
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError("bad_array", f"malformed msgpack-numpy array: {exc}") from None


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of dicts/lists, stopping (and returning ``limit + 1``) past ``limit``."""
    stack = [(obj, 1)]
    deepest = 0
    while stack:
        node, d = stack.pop()
        if d > limit:
            return d
        deepest = max(deepest, d)
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def _schema_view(name: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The document as the schema sees it, with data values the schemas leave unconstrained
    replaced by empty stand-ins.

    event_model's Event schema allows any value in ``data`` and the EventPage schema any array, but
    jsonschema's ``unevaluatedProperties`` check formats every value it visits (``repr`` of a numpy
    array costs about a millisecond). Validating the stand-ins checks the same structure at a
    fraction of the cost.
    """
    data = doc.get("data")
    if not isinstance(data, dict) or name not in ("event", "event_page"):
        return doc
    if name == "event":
        light = {k: None for k in data}
    else:
        light = {k: [] if isinstance(v, (list, np.ndarray)) else v for k, v in data.items()}
    return {**doc, "data": light}


def make_deserializer(serializer: str, allow_pickle: bool = False) -> Callable[[bytes], Any]:
    """Return ``bytes -> object`` for a configured serializer name.

    Raises:
        ValueError: for ``"pickle"`` without ``allow_pickle`` or an unknown name.
    """
    if serializer == "msgpack":
        def loads(payload: bytes) -> Any:
            return msgpack.unpackb(payload, object_hook=_decode_ndarray, raw=False, strict_map_key=False)
        return loads
    if serializer == "json":
        return json.loads
    if serializer == "pickle":
        if not allow_pickle:
            raise ValueError("pickle refused: set allow_pickle: true to accept code execution from the network")
        log.warning("accepting pickled documents: any peer that can reach the proxy can run code in this daemon")
        return pickle.loads
    raise ValueError(f"unknown serializer {serializer!r}")


def split_message(message: bytes, prefix: bytes) -> tuple[bytes, str, bytes]:
    """Split a bluesky 0MQ message into ``(prefix, name, payload)``.

    Raises:
        DecodeError: ``"malformed"`` when it has no two spaces or the name is not ASCII.
    """
    parts = message.split(b" ", 2)
    if len(parts) != 3:
        raise DecodeError("malformed", "message is not 'prefix name payload'")
    got_prefix, name, payload = parts
    try:
        name_str = name.decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError("malformed", "document name is not ASCII") from None
    return got_prefix, name_str, payload


def decode_document(name: str, payload: bytes, loads: Callable[[bytes], Any], *, validate: bool = True) -> dict[str, Any]:
    """Deserialize and validate one document payload.

    Raises:
        DecodeError: with reason ``unknown_document_type``, ``undecodable``, ``too_deep``,
            ``not_a_mapping``, ``unsafe_array``, ``bad_array`` or ``schema_invalid``.
    """
    if name not in DocumentNames.__members__ or name in ("bulk_events", "bulk_datum"):
        raise DecodeError("unknown_document_type", f"unknown document type {name[:40]!r}")
    try:
        doc = loads(payload)
    except DecodeError:
        raise
    except RecursionError:
        raise DecodeError("too_deep", "payload nested too deeply") from None
    except Exception as exc:  # any serializer's failure on hostile bytes is a rejected message
        raise DecodeError("undecodable", f"payload does not decode: {type(exc).__name__}: {exc}"[:200]) from None
    if not isinstance(doc, dict):
        raise DecodeError("not_a_mapping", f"payload decodes to {type(doc).__name__}, not a document")
    if _depth(doc, MAX_NESTING) > MAX_NESTING:
        raise DecodeError("too_deep", f"document nested deeper than {MAX_NESTING}")
    if validate:
        try:
            schema_validators[DocumentNames[name]].validate(_schema_view(name, doc))
        except SchemaError as exc:
            raise DecodeError("schema_invalid", f"{name} fails event_model schema: {exc.message}"[:300]) from None
        except RecursionError:
            raise DecodeError("too_deep", "document nested too deeply to validate") from None
    return doc
