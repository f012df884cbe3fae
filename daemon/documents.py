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
RunStart, Descriptor, RunStop and every other rare document go through the full jsonschema validator.
Events and EventPages, the bulk of a stream, first meet :func:`fast_valid`, a structural check written
from the same schemas that only ever *accepts* documents the schema accepts (exact Python types, the
schema's required and allowed keys); anything it cannot vouch for goes to the full validator, which
either accepts it or gives the reason. Bad input is therefore rejected exactly as before, and a
well-formed Event costs a few microseconds instead of about 0.25 ms.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import pickle  # only used when the config explicitly opts in (allow_pickle)
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np
from event_model import DocumentNames, pack_event_page, schema_validators
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


_DTYPES: dict[str, np.dtype] = {}
"""Checked dtypes by their msgpack-numpy ``descr`` (few distinct ones per stream; bounded below)."""


def _checked_dtype(descr: Any, kind: Any) -> np.dtype:
    dtype = _DTYPES.get(descr) if isinstance(descr, str) else None
    if dtype is not None and kind not in (b"O", b"V"):
        return dtype
    if isinstance(descr, bytes):
        descr = descr.decode()
    if not isinstance(descr, str) or kind in (b"O", b"V"):
        raise DecodeError("unsafe_array", "object or structured arrays are refused")
    dtype = np.dtype(descr)
    if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject:
        raise DecodeError("unsafe_array", f"array dtype {descr!r} is refused")
    if len(_DTYPES) < 256:
        _DTYPES[descr] = dtype
    return dtype


_ARRAY_FORMS: dict[tuple[Any, ...], tuple[np.dtype, tuple[int, ...], int]] = {}
"""``(descr, kind, *shape) -> (dtype, shape, bytes)`` of array forms already checked (a stream
has a few; bounded below): the same form decodes without repeating the checks."""


def _decode_ndarray(obj: dict[Any, Any]) -> Any:
    """msgpack object hook for msgpack-numpy arrays, refusing anything that is not plain numeric.
    The array is a read-only view of the bytes msgpack decoded (no further copy)."""
    if b"nd" not in obj:
        return obj
    shape = obj.get(b"shape")
    if obj[b"nd"] is True and type(shape) is list:
        try:
            form = _ARRAY_FORMS.get((obj.get(b"type"), obj.get(b"kind"), *shape))
        except TypeError:  # an unhashable shape entry: the checks below say why it is refused
            form = None
        data = obj.get(b"data")
        if form is not None and type(data) is bytes and len(data) == form[2]:
            return np.frombuffer(data, dtype=form[0]).reshape(form[1])
    return _checked_ndarray(obj)


def _checked_ndarray(obj: dict[Any, Any]) -> Any:
    try:
        dtype = _checked_dtype(obj[b"type"], obj.get(b"kind"))
        data = obj[b"data"]
        if obj[b"nd"] is True:
            shape = tuple(int(n) for n in obj[b"shape"])
            if any(n < 0 for n in shape) or math.prod(shape) * dtype.itemsize != len(data):
                raise DecodeError("bad_array", f"array of shape {shape} and dtype {dtype} does not match its {len(data)} bytes")
            array = np.frombuffer(data, dtype=dtype).reshape(shape)
            if len(_ARRAY_FORMS) < 256 and type(data) is bytes and type(obj[b"shape"]) is list:
                _ARRAY_FORMS[(obj[b"type"], obj.get(b"kind"), *obj[b"shape"])] = (dtype, shape, len(data))
            return array
        if len(data) != dtype.itemsize:
            raise DecodeError("bad_array", "numpy scalar of the wrong size")
        return np.frombuffer(data, dtype=dtype)[0]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise DecodeError("bad_array", f"malformed msgpack-numpy array: {exc}") from None


def _depth(obj: Any, limit: int) -> int:
    """Container nesting depth of dicts/lists (a scalar counts one level), level by level,
    stopping (and returning ``limit + 1``) past ``limit``; scalars and numpy arrays are not walked."""
    level = [obj]
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return depth
        nxt = []
        for node in level:
            if isinstance(node, dict):
                nxt += [v for v in node.values() if isinstance(v, (dict, list))]
            elif isinstance(node, list):
                nxt += [v for v in node if isinstance(v, (dict, list))]
        if not nxt:
            return depth + 1 if any(isinstance(n, (dict, list)) and n for n in level) else depth
        level = nxt
    return depth


def _shallow(doc: dict[str, Any]) -> bool:
    """True when no value of ``doc``'s values is a dict or list (at most 3 deep, as an Event with
    array or scalar readings is): the common case, answered without :func:`_depth`'s walk."""
    for v in doc.values():
        if isinstance(v, dict):
            for w in v.values():
                if isinstance(w, (dict, list)):
                    return False
        elif isinstance(v, list):
            for w in v:
                if isinstance(w, (dict, list)):
                    return False
    return True


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


_EVENT_KEYS = frozenset(("uid", "time", "seq_num", "descriptor", "data", "timestamps", "filled"))
_EVENT_REQUIRED = frozenset(("uid", "time", "seq_num", "descriptor", "data", "timestamps"))
_NUMBER = (int, float)


def _flags_ok(filled: Any, page: bool) -> bool:
    if type(filled) is not dict:
        return False
    for v in filled.values():
        if page:
            if type(v) is not list or not all(type(f) is bool or type(f) is str for f in v):
                return False
        elif type(v) is not bool and type(v) is not str:
            return False
    return True


def fast_valid(name: str, doc: dict[str, Any]) -> bool:
    """True when an ``event`` or ``event_page`` document certainly passes event_model's schema.

    A sufficient, not a necessary, condition: it checks the schema's required and allowed keys with
    exact Python types (``str`` uids, ``int`` (not bool) seq_num, ``int``/``float`` times, ``dict``
    data and timestamps, page columns as ``list`` or numpy arrays), so a True here implies the
    jsonschema validator would accept the document. False means "not vouched for" (numpy scalars,
    unusual but legal forms, or invalid documents): validate with the full schema then. Other
    document names always give False.
    """
    keys = doc.keys()
    if not _EVENT_REQUIRED <= keys or not keys <= _EVENT_KEYS or type(doc["descriptor"]) is not str:
        return False
    data, ts = doc["data"], doc["timestamps"]
    if type(data) is not dict or type(ts) is not dict:
        return False
    if name == "event":
        if type(doc["uid"]) is not str or type(doc["seq_num"]) is not int:
            return False
        t = type(doc["time"])
        if t is not float and t is not int:
            return False
        return "filled" not in doc or _flags_ok(doc["filled"], page=False)
    if name != "event_page":
        return False
    uid, seq, times = doc["uid"], doc["seq_num"], doc["time"]
    if type(uid) is not list or type(seq) is not list or type(times) is not list:
        return False
    if not (all(type(u) is str for u in uid) and all(type(q) is int for q in seq)
            and all(type(t) is float or type(t) is int for t in times)):
        return False
    for column in (*data.values(), *ts.values()):
        if type(column) is not list and type(column) is not np.ndarray:
            return False
    return "filled" not in doc or _flags_ok(doc["filled"], page=True)


def make_deserializer(serializer: str, allow_pickle: bool = False) -> Callable[[bytes], Any]:
    """Return ``bytes -> object`` (bytes or any buffer, e.g. a ``memoryview`` of the received
    message) for a configured serializer name.

    Raises:
        ValueError: for ``"pickle"`` without ``allow_pickle`` or an unknown name.
    """
    if serializer == "msgpack":
        def loads(payload: bytes) -> Any:
            return msgpack.unpackb(payload, object_hook=_decode_ndarray, raw=False, strict_map_key=False)
        return loads
    if serializer == "json":
        def loads_json(payload: bytes) -> Any:
            return json.loads(payload if isinstance(payload, (bytes, str)) else bytes(payload))
        return loads_json
    if serializer == "pickle":
        if not allow_pickle:
            raise ValueError("pickle refused: set allow_pickle: true to accept code execution from the network")
        log.warning("accepting pickled documents: any peer that can reach the proxy can run code in this daemon")
        return pickle.loads
    raise ValueError(f"unknown serializer {serializer!r}")


def split_message(message: bytes, prefix: bytes) -> tuple[bytes, str, memoryview]:
    """Split a bluesky 0MQ message into ``(prefix, name, payload)``; the payload is a view of
    ``message`` (no copy of the document bytes).

    Raises:
        DecodeError: ``"malformed"`` when it has no two spaces or the name is not ASCII.
    """
    i = message.find(b" ")
    j = message.find(b" ", i + 1) if i >= 0 else -1
    if j < 0:
        raise DecodeError("malformed", "message is not 'prefix name payload'")
    try:
        name_str = message[i + 1:j].decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError("malformed", "document name is not ASCII") from None
    return message[:i], name_str, memoryview(message)[j + 1:]


def coalesce_events(docs: list[Document], max_page: int) -> list[Document]:
    """Pack runs of consecutive ``event`` documents of one descriptor into ``event_page`` documents
    of at most ``max_page`` events (``event_model.pack_event_page``); all other documents, and the
    order of everything, are kept. Each Event must already be validated: the page is not checked
    again. A run of one event stays an ``event``.

    Args:
        docs: decoded documents in arrival order.
        max_page: largest page, events.
    """
    out: list[Document] = []
    run: list[Document] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            out.append(Document("event_page", pack_event_page(*(d.doc for d in run)), run[0].source, run[-1].received))
        run.clear()

    for d in docs:
        if d.name == "event" and (not run or (d.doc["descriptor"] == run[0].doc["descriptor"] and len(run) < max_page)):
            run.append(d)
            continue
        flush()
        if d.name == "event":
            run.append(d)
        else:
            out.append(d)
    flush()
    return out


def deserialize(payload: bytes, loads: Callable[[bytes], Any]) -> Any:
    """``loads(payload)``, with any failure of the serializer on hostile bytes as a DecodeError.

    Raises:
        DecodeError: ``too_deep``, ``undecodable``, or the array reasons of the msgpack decoder.
    """
    try:
        return loads(payload)
    except DecodeError:
        raise
    except RecursionError:
        raise DecodeError("too_deep", "payload nested too deeply") from None
    except Exception as exc:  # any serializer's failure on hostile bytes is a rejected message
        raise DecodeError("undecodable", f"payload does not decode: {type(exc).__name__}: {exc}"[:200]) from None


def decode_document(name: str, payload: bytes, loads: Callable[[bytes], Any], *, validate: bool = True,
                    max_data_keys: int | None = None) -> dict[str, Any]:
    """Deserialize and validate one document payload.

    Args:
        max_data_keys: a descriptor with more data keys is rejected before schema validation
            (which costs about 0.1 ms per key: 10^5 keys would hold intake for seconds).

    Raises:
        DecodeError: with reason ``unknown_document_type``, ``undecodable``, ``too_deep``,
            ``not_a_mapping``, ``unsafe_array``, ``bad_array``, ``too_many_data_keys`` or
            ``schema_invalid``.
    """
    if name not in DocumentNames.__members__ or name in ("bulk_events", "bulk_datum"):
        raise DecodeError("unknown_document_type", f"unknown document type {name[:40]!r}")
    doc = deserialize(payload, loads)
    if not isinstance(doc, dict):
        raise DecodeError("not_a_mapping", f"payload decodes to {type(doc).__name__}, not a document")
    if not _shallow(doc) and _depth(doc, MAX_NESTING) > MAX_NESTING:
        raise DecodeError("too_deep", f"document nested deeper than {MAX_NESTING}")
    if max_data_keys is not None and name == "descriptor" and isinstance(doc.get("data_keys"), dict) \
            and len(doc["data_keys"]) > max_data_keys:
        raise DecodeError("too_many_data_keys",
                          f"descriptor has {len(doc['data_keys'])} data keys, more than limits.max_data_keys ({max_data_keys})")
    if validate and not fast_valid(name, doc):
        try:
            schema_validators[DocumentNames[name]].validate(_schema_view(name, doc))
        except SchemaError as exc:
            raise DecodeError("schema_invalid", f"{name} fails event_model schema: {exc.message}"[:300]) from None
        except RecursionError:
            raise DecodeError("too_deep", "document nested too deeply to validate") from None
        except Exception as exc:  # jsonschema itself fails on some hostile forms (len() of a numpy scalar)
            raise DecodeError("schema_invalid", f"{name} cannot be validated: {type(exc).__name__}: {exc}"[:300]) from None
    return doc
