"""One scan point of one consumer's results, for the live page's "click a pixel" panel.

``GET /api/runs/{uid}/{consumer}/point?nav=12,7`` answers :func:`point_results`: the value of every
``nav`` buffer at that point and, for a consumer that models each spectrum as weights on component
spectra (``score_<i>`` on PCA ``components`` plus the ``mean``; ``abundance_<i>`` on NMF
``components``), the model spectrum at that point and the components it is built from:

    spectrum = mean + sum_i w_i * components[i]        (mean = 0 without a ``mean`` buffer)

A consumer that keeps the spectra it analysed in a private nav buffer (:data:`MEASURED_BUFFERS`:
the spectral consumers' ``spectra`` ``(nav, n_out)`` float64, preprocessed; ``pca``'s ``points``
``(nav, n_values)``, taken as measured) also answers the MEASURED spectrum of the point under
``measured``, exactly as the consumer analysed it: for ``spectra`` after its preprocessing
(non-finite repair, normalisation, energy window, derivative; the raw spectrum itself with
``normalize: none`` and no window), on the same axis as the model. Only this one row is read from the private buffer; private buffers
stay out of every other output (the ``/api`` listing, derived documents, Tiled, run files).

A ``nav`` buffer too large for ``values`` that holds a NaN-padded list of rows per point
(``(n_rows, n_columns)`` per point, at most :data:`MAX_LIST_COLUMNS` columns: the defects consumer's
``positions``, row, col and class of each defect of a frame) is answered under ``lists`` as the
rows that hold a value, so a frame run's click shows that frame's detections.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..results import RunStore
from .jsonsafe import finite_list, json_safe

#: nav buffers whose values weight the ``components`` rows, by name prefix.
WEIGHT_PREFIXES = ("score", "abundance")
#: private nav buffers of per-point analysed spectra a consumer may keep (``(nav, n)``), by
#: name, and whether they hold the spectra after the consumer's preprocessing.
MEASURED_BUFFERS = {"spectra": True, "points": False}
#: a measured spectrum longer than this (a flattened detector image) is not answered.
MAX_MEASURED_CHANNELS = 65536
#: nav buffers with more values per point than this are left out of the answer.
MAX_VALUES_PER_POINT = 64
#: nav buffers of ``(n_rows, n_columns)`` per point with at most this many columns are answered as lists of rows.
MAX_LIST_COLUMNS = 8


def parse_nav(text: str, nav_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Parse ``"r,c"`` (one integer per scan dimension) and check it lies inside ``nav_shape``.

    Raises:
        ValueError: not integers, wrong count, or outside the scan.
    """
    parts = text.split(",")
    if len(parts) != len(nav_shape) or not all(re.fullmatch(r"\d{1,9}", p.strip()) for p in parts):
        raise ValueError(f"nav must be {len(nav_shape)} non-negative integer(s) separated by commas")
    index = tuple(int(p) for p in parts)
    if any(i >= n for i, n in zip(index, nav_shape)):
        raise ValueError(f"nav {index} is outside the scan shape {nav_shape}")
    return index


def point_results(store: RunStore, uid: str, consumer: str, nav_text: str) -> dict[str, Any]:
    """The results of ``consumer`` at one scan point of run ``uid`` (may be ``latest``).

    Returns:
        ``{"run", "consumer", "nav", "nav_shape", "values": {buffer: value or list, units},
        "lists": {buffer: {"rows": [[...], ...], "units"}},
        "model": None or {"axis", "spectrum" (n,), "components" (k, n), "weights" (k,), "mean"},
        "measured": None or {"axis", "spectrum" (n,), "units", "source" (buffer name),
        "preprocessed" (bool), "description"}}``,
        JSON-safe (NaN -> None); ``lists`` holds the rows of list buffers (see the module
        docstring) that are not all NaN, in buffer order.

    Raises:
        KeyError: unknown run or consumer.
        ValueError: a bad ``nav`` (see :func:`parse_nav`).
    """
    run = store.get(uid)
    if run is None:
        raise KeyError(f"no run {uid!r}")
    slot = next((s for s in run.slots if s.name == consumer), None)
    if slot is None:
        raise KeyError(f"no consumer {consumer!r} in run {run.uid}")
    shape = run.published_nav_shape
    index = parse_nav(nav_text, shape)
    flat = int(np.ravel_multi_index(index, shape))
    values: dict[str, Any] = {}
    lists: dict[str, Any] = {}
    weights: dict[int, float] = {}
    for name, spec in slot.specs.items():
        if spec.kind != "nav" or name not in slot.arrays:
            continue
        arr = slot.arrays[name]
        if flat >= len(arr):
            continue
        n_values = int(np.prod(spec.extra_shape))
        if n_values > MAX_VALUES_PER_POINT and len(spec.extra_shape) == 2 and spec.extra_shape[1] <= MAX_LIST_COLUMNS:
            rows = np.asarray(arr[flat], dtype=np.float64)
            lists[name] = {"rows": rows[~np.isnan(rows).all(axis=1)].tolist(), "units": spec.units}
            continue
        if n_values > MAX_VALUES_PER_POINT:
            continue
        value = np.asarray(arr[flat], dtype=np.float64)
        values[name] = {"value": value.tolist(), "units": spec.units}
        m = re.fullmatch(r"([a-z]+)_(\d+)", name)
        if m and m.group(1) in WEIGHT_PREFIXES and value.ndim == 0:
            weights[int(m.group(2))] = float(value)
    return {"run": run.uid, "consumer": consumer, "nav": list(index), "nav_shape": list(shape),
            "values": json_safe(values), "lists": json_safe(lists), "model": _model(store, run.uid, slot, weights),
            "measured": _measured(slot, flat)}


def _measured(slot: Any, flat: int) -> dict[str, Any] | None:
    """The analysed spectrum at flat nav index ``flat`` from the consumer's private
    :data:`MEASURED_BUFFERS`, or None (no such buffer, or no usable spectrum there yet)."""
    buffers = slot.buffers
    specs = dict(buffers.specs)
    name = next((n for n in MEASURED_BUFFERS if n in specs and specs[n].private), None)
    if name is None:
        return None
    spec = specs[name]
    if spec.kind != "nav" or len(spec.extra_shape) != 1 or spec.extra_shape[0] > MAX_MEASURED_CHANNELS:
        return None
    arr = buffers[name]
    if flat >= len(arr):
        return None
    spectrum = np.array(arr[flat], dtype=np.float64)  # one row copied; the buffer itself is not exposed
    if not np.isfinite(spectrum).any():
        return None
    axis = None
    values = slot.consumer.run.axes.get(spec.axis) if spec.axis else None
    if values is not None and np.asarray(values[0]).shape == spectrum.shape:
        axis = {"name": spec.axis, "units": str(values[1]), "values": finite_list(values[0])}
    return {"axis": axis, "spectrum": finite_list(spectrum), "units": spec.units, "source": name,
            "preprocessed": MEASURED_BUFFERS[name], "description": spec.description}


def _model(store: RunStore, uid: str, slot: Any, weights: dict[int, float]) -> dict[str, Any] | None:
    name = next((n for n in ("components", "pca_components") if n in slot.arrays), None)
    if name is None or not weights:
        return None
    snap = store.snapshot(uid, slot.name, name)
    comps = np.asarray(snap.data, dtype=np.float64)
    k = len(weights)
    if comps.ndim != 2 or sorted(weights) != list(range(1, k + 1)) or comps.shape[0] < k:
        return None
    w = np.array([weights[i] for i in range(1, k + 1)])
    mean = None
    if "mean" in slot.arrays and slot.specs["mean"].kind == "sig":
        mean = np.asarray(store.snapshot(uid, slot.name, "mean").data, dtype=np.float64)
        if mean.shape != comps.shape[1:]:
            mean = None
    spectrum = w @ comps[:k] + (mean if mean is not None else 0.0)
    axis = None
    if snap.axis is not None:
        axis = {"name": snap.spec.axis, "units": str(snap.axis[1]), "values": finite_list(snap.axis[0])}
    return {"axis": axis, "spectrum": finite_list(spectrum), "components": finite_list(comps[:k]),
            "weights": finite_list(w), "mean": None if mean is None else finite_list(mean),
            "units": slot.specs[name].units, "source": name}
