"""Drive a spectral consumer directly on the new contract, without the daemon: the signals a map
run's primary descriptor offers (made with event_model.compose_run, as a grid_scan publishes them),
full-size nav buffers (``Buffers.allocate``), batches of points in acquisition order, ``results()``
when ``process`` asks for it, ``finish()`` and a last ``results()`` as the daemon does at run end.
Background jobs run inline (the ``RunInfo.submit`` default)."""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from event_model import compose_run

from beamlens.consumers.base import Batch, Buffers, BufferSpec, Consumer, NotApplicable, RunInfo, SignalInfo
from beamlens.daemon.config import BUILTIN_CONSUMERS
from beamlens.daemon.sim.datasets import SpectralMap


def consumer_class(name: str) -> type[Consumer]:
    import importlib
    module, cls = BUILTIN_CONSUMERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def map_descriptor(n_ch: int, energy: np.ndarray | None, shape: tuple[int, ...], *, axis_key: str | None = "xas_energy",
                   axis_units: str | None = None) -> tuple[dict, dict]:
    """``(RunStart, primary EventDescriptor)`` of a map of spectra ``xas_spectrum`` ``(n_ch,)``,
    the axis (when ``axis_key``) in the detector's configuration."""
    run = compose_run(metadata={"shape": list(shape), "snaking": [False] * len(shape), "plan_name": "grid_scan"})
    axis_meta = {"source": "sim", "dtype": "array", "shape": [n_ch], **({"units": axis_units} if axis_units else {})}
    configuration = {} if axis_key is None or energy is None else {
        "xas": {"data": {axis_key: np.asarray(energy).tolist()}, "timestamps": {axis_key: time.time()},
                "data_keys": {axis_key: axis_meta}}}
    desc = run.compose_descriptor(name="primary", data_keys={"xas_spectrum": {"source": "sim", "dtype": "array", "shape": [n_ch]}},
                                  configuration=configuration, object_keys={"xas": ["xas_spectrum"]})
    return run.start_doc, desc.descriptor_doc


def event_signals(descriptor: Mapping[str, Any]) -> list[SignalInfo]:
    """The event signals the daemon offers for a primary descriptor (its data keys, in order)."""
    out = []
    for name, key in descriptor["data_keys"].items():
        shape = tuple(key.get("shape") or ())
        out.append(SignalInfo(name, "event", shape, "float64", key.get("units", ""), descriptor=descriptor))
    return out


@dataclass
class Driven:
    """A consumer driven through a run, with what the daemon would have counted."""

    consumer: Consumer
    nav_shape: tuple[int, ...]
    infos: list[SignalInfo]
    specs: list[BufferSpec]
    skipped: Counter = field(default_factory=Counter)
    results_calls: int = 0

    @property
    def buffers(self) -> Buffers:
        return self.consumer.buffers

    def get(self, name: str) -> np.ndarray:
        """A buffer's array; nav buffers reshaped to the scan shape."""
        a = self.buffers[name]
        if self.buffers.specs[name].kind == "nav":
            return a.reshape(*self.nav_shape, *a.shape[1:])
        return a

    def process(self, batches: Iterable[Batch]) -> None:
        for batch in batches:
            if self.consumer.process(batch):
                self.consumer.results()
                self.results_calls += 1

    def finish(self) -> None:
        self.consumer.finish()
        self.consumer.results()


def start(class_name: str, params: Mapping[str, Any], infos: list[SignalInfo], nav_shape: tuple[int, ...],
          start_doc: Mapping[str, Any] | None = None) -> Driven:
    """A fresh consumer that was offered ``infos`` (refusals skipped), with allocated buffers."""
    cls = consumer_class(class_name)
    skipped: Counter = Counter()
    run = RunInfo("u" * 32, nav_shape, start_doc or {}, skipped=lambda reason, n: skipped.update({reason: n}))
    consumer = cls(cls.Params(**params), run)
    if start_doc is not None:
        consumer.start(start_doc)
    specs: list[BufferSpec] = []
    accepted = []
    for info in infos:
        try:
            specs += consumer.signal(info)
        except NotApplicable:
            continue
        accepted.append(info)
    consumer.buffers = Buffers.allocate(specs, int(np.prod(nav_shape)))
    return Driven(consumer, nav_shape, accepted, specs, skipped)


def batches(info: SignalInfo, flat: np.ndarray, order: np.ndarray, page_size: int) -> list[Batch]:
    """Batches of ``page_size`` points of ``flat`` ``(n_points, ...)`` in acquisition ``order``."""
    out = []
    for i in range(0, len(order), page_size):
        idx = np.asarray(order[i:i + page_size], dtype=np.int64)
        out.append(Batch(info, np.asarray(flat[idx], dtype=np.float64), idx, idx + 1, np.full(len(idx), time.time())))
    return out


def run_map(class_name: str, params: Mapping[str, Any], data: SpectralMap, *, order: np.ndarray | None = None,
            page_size: int = 256, axis_key: str | None = "xas_energy", axis_units: str | None = None,
            finish: bool = True) -> Driven:
    """Drive one consumer through the map ``data`` point by point pages (raster order, or ``order``
    of flat indices)."""
    ny, nx = data.shape
    n_ch = len(data.energy)
    start_doc, desc = map_descriptor(n_ch, data.energy, (ny, nx), axis_key=axis_key, axis_units=axis_units)
    d = start(class_name, params, event_signals(desc), (ny, nx), start_doc)
    flat = data.spectra.reshape(ny * nx, n_ch)
    order = np.arange(ny * nx) if order is None else np.asarray(order)
    d.process(batches(d.infos[0], flat, order, page_size))
    if finish:
        d.finish()
    return d
