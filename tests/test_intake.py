"""Document intake near the transport: the Event fast path never accepts what event_model's schema
refuses, and coalescing keeps order and every event."""
from __future__ import annotations

import copy
import time

import msgpack
import numpy as np
import pytest
from event_model import DocumentNames, compose_run, pack_event_page, schema_validators
from jsonschema.exceptions import ValidationError

from beamlens.daemon.documents import (MAX_NESTING, DecodeError, Document, coalesce_events, decode_document, fast_valid,
                                       make_deserializer, msgpack_serializer, split_message)


def _event():
    bundle = compose_run()
    desc = bundle.compose_descriptor(name="primary", data_keys={"x": {"source": "s", "dtype": "number", "shape": []}})
    return desc.compose_event(data={"x": 1.0}, timestamps={"x": time.time()}), desc


def _mutations(doc: dict) -> list[dict]:
    """Valid and invalid variants of a document: each key removed, retyped, an extra key."""
    out = [doc]
    bad_values = [None, 1, 1.5, True, "s", [], {}, np.int64(3), np.float64(2.0), ["a"], [1], [True], np.arange(2)]
    for key in list(doc):
        gone = dict(doc)
        del gone[key]
        out.append(gone)
        for v in bad_values:
            out.append({**doc, key: v})
    out.append({**doc, "extra": 1})
    out.append({**doc, "filled": {"x": False}})
    out.append({**doc, "filled": {"x": 3}})
    return out


def _schema_accepts(name: str, doc: dict) -> bool:
    try:
        schema_validators[DocumentNames[name]].validate(doc)
    except (ValidationError, TypeError):  # jsonschema fails on len() of a numpy scalar "array"
        return False
    return True


@pytest.mark.parametrize("name", ["event", "event_page"])
def test_fast_path_accepts_only_what_the_schema_accepts(name):
    event, _ = _event()
    doc = event if name == "event" else pack_event_page(event, copy.deepcopy(event))
    variants = _mutations(doc)
    vouched = [v for v in variants if fast_valid(name, v)]
    assert len(vouched) >= 3  # the plain document and some legal variants take the fast path
    for v in vouched:
        assert _schema_accepts(name, v), v
    # and everything the fast path passes on still gets the schema's verdict through decode_document
    for v in variants:
        if not _schema_accepts(name, v):
            with pytest.raises(DecodeError) as err:
                decode_document(name, b"", lambda _: v)
            assert err.value.reason == "schema_invalid"


def test_fast_path_is_never_used_for_other_documents():
    bundle = compose_run()
    assert not fast_valid("start", bundle.start_doc)
    assert not fast_valid("stop", bundle.compose_stop())


def test_split_message_returns_a_view_of_the_payload():
    message = b"pfx event \x81\xa1a\x01 more"
    prefix, name, payload = split_message(message, b"pfx")
    assert (prefix, name) == (b"pfx", "event")
    assert isinstance(payload, memoryview) and bytes(payload) == b"\x81\xa1a\x01 more"
    with pytest.raises(DecodeError):
        split_message(b"no-spaces-here", b"pfx")


def test_coalescing_keeps_order_and_every_event():
    bundle = compose_run()
    keys = {"x": {"source": "s", "dtype": "number", "shape": []}}
    a, b = bundle.compose_descriptor(name="primary", data_keys=keys), bundle.compose_descriptor(name="baseline", data_keys=keys)

    def doc(name, d):
        return Document(name, d, "test", 0.0)
    events_a = [doc("event", a.compose_event(data={"x": float(i)}, timestamps={"x": 0.0})) for i in range(5)]
    event_b = doc("event", b.compose_event(data={"x": -1.0}, timestamps={"x": 0.0}))
    docs = [doc("start", bundle.start_doc), doc("descriptor", a.descriptor_doc), *events_a[:3], event_b,
            *events_a[3:], doc("stop", bundle.compose_stop())]
    out = coalesce_events(docs, max_page=2)
    assert [d.name for d in out] == ["start", "descriptor", "event_page", "event", "event", "event_page", "stop"]
    assert out[2].doc["seq_num"] == [1, 2] and out[2].doc["data"]["x"] == [0.0, 1.0]
    assert out[3].doc["seq_num"] == 3 and out[4].doc is event_b.doc
    assert out[5].doc["seq_num"] == [4, 5]


def test_a_known_array_form_is_checked_again_when_its_bytes_do_not_match():
    """The cache of checked msgpack-numpy forms (descr, kind, shape) skips only the repeated checks:
    a later array of that form with the wrong number of bytes, or data that is not bytes, is still
    refused as bad_array, and an object array never enters it."""
    loads = make_deserializer("msgpack")
    good = np.arange(7, dtype="<f8")
    doc = {"x": {b"nd": True, b"type": "<f8", b"kind": b"", b"shape": [7], b"data": good.tobytes()}}
    for _ in range(2):  # the second decode takes the cached form
        out = loads(msgpack.packb(doc))
        assert np.array_equal(out["x"], good) and not out["x"].flags.writeable
    for data in (good.tobytes()[:-8], good.tobytes() + b"\0" * 8, "not bytes"):
        with pytest.raises(DecodeError) as err:
            loads(msgpack.packb({"x": {**doc["x"], b"data": data}}))
        assert err.value.reason == "bad_array"
    with pytest.raises(DecodeError) as err:
        loads(msgpack.packb({"x": {**doc["x"], b"type": "|O", b"kind": b"O"}}))
    assert err.value.reason == "unsafe_array"
    assert np.array_equal(loads(msgpack_serializer({"x": good}))["x"], good)


def test_a_deep_document_is_still_refused_when_the_shallow_shortcut_does_not_apply():
    """Documents whose values hold no containers skip the nesting walk; anything deeper still meets
    it: an Event nested past MAX_NESTING is refused as too_deep."""
    event, _ = _event()
    deep: list = []
    for _ in range(MAX_NESTING + 2):
        deep = [deep]
    with pytest.raises(DecodeError) as err:
        decode_document("event", msgpack.packb({**event, "data": {"x": deep}}), make_deserializer("msgpack"))
    assert err.value.reason == "too_deep"
    assert decode_document("event", msgpack.packb(event), make_deserializer("msgpack"))["data"] == {"x": 1.0}
