"""Provenance of derived results, shared by the documents and file outputs.

A consumer that runs a trained model exposes the model file's SHA-256 as the attribute
``model_sha256`` (hex string); it is recorded with its results so that a file or a derived run names
the exact weights that produced it.
"""
from __future__ import annotations

from typing import Any

from .. import __version__
from ..results import ConsumerSlot


def consumer_provenance(slot: ConsumerSlot) -> dict[str, Any]:
    """What produced one consumer's results: instance name, class, parameters, model hash.

    Returns:
        ``{"consumer", "class", "params", "beamlens_version"}`` plus ``"model_sha256"`` when the
        consumer exposes one; JSON-ready.
    """
    consumer = slot.consumer
    cls = type(consumer)
    out: dict[str, Any] = {
        "consumer": slot.name,
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "params": consumer.params.model_dump(mode="json"),
        "beamlens_version": __version__,
    }
    sha = getattr(consumer, "model_sha256", None)
    if sha:
        out["model_sha256"] = str(sha)
    return out
