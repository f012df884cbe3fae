"""Values from the wire made safe for JSON (RFC 8259) before anything is published over HTTP.

A RunStart may carry anything its serializer can express: msgpack ``ExtType``, numpy scalars and
arrays (msgpack-numpy), bytes, NaN and infinities, nested mappings with non-string keys. Python's
``json`` raises on the first kinds and writes a bare ``NaN`` for the last, which browsers'
``JSON.parse`` rejects. :func:`json_safe` maps any value to ``None``/``bool``/``int``/``float``/
``str``/``list``/``dict[str, ...]``, bounded in depth, length and string size.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

MAX_DEPTH = 8
MAX_ITEMS = 1000
MAX_STR = 1000
_INT_LIMIT = 2**63


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_STR else text[:MAX_STR] + "…"


def json_safe(value: Any, depth: int = 0) -> Any:
    """A JSON-ready copy of ``value``.

    Non-finite floats become None; numpy scalars their Python value; arrays, tuples and sets lists;
    mapping keys strings; integers outside int64 and anything else (ExtType, bytes, objects) their
    ``repr`` (truncated to 1000 characters). Containers deeper than 8 levels become their repr;
    more than 1000 items are cut. Never raises.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, np.generic):
        value = value.item()
        if isinstance(value, (bytes, complex)):
            return _text(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_INT_LIMIT <= value < _INT_LIMIT else _text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _text(value)
    if depth >= MAX_DEPTH:
        return _text(value)
    if isinstance(value, Mapping):
        out = {}
        for i, (k, v) in enumerate(value.items()):
            if i >= MAX_ITEMS:
                break
            out[k if isinstance(k, str) and len(k) <= MAX_STR else _text(k)] = json_safe(v, depth + 1)
        return out
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf" or value.size > MAX_ITEMS:
            return _text(f"<array {value.dtype} {value.shape}>")
        if value.ndim == 0:
            return json_safe(value.item(), depth + 1)
        return [json_safe(v, depth + 1) for v in value]
    if type(value) in (list, tuple, set, frozenset):  # not named tuples such as msgpack's ExtType
        return [json_safe(v, depth + 1) for _, v in zip(range(MAX_ITEMS), value)]
    return _text(value)


def finite_list(array: Any) -> Any:
    """A numeric array as nested lists of floats, NaN and infinities as None (any size)."""
    data = np.asarray(array, dtype=np.float64)
    values = data.astype(object)
    values[~np.isfinite(data)] = None
    return values.tolist()
