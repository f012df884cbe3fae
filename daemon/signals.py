"""The daemon's one input path: Bluesky data keys and detector frame series become
:class:`~beamlens.consumers.base.SignalInfo`, event pages and frame batches become
:class:`~beamlens.consumers.base.Batch` es.

- **Event signals** (:func:`event_signals`): the data keys of a run's first *primary* descriptor,
  hinted fields first (the descriptor's ``hints``, as bluesky's best-effort callback orders them),
  then the rest in the descriptor's order; inline arrays (``dtype: array`` with a shape, not
  ``external``) and numeric scalars (``number``/``integer`` with shape ``[]``). Strings, booleans,
  external (filled later, by reference) and unbounded keys are not offered.
- **Event batches** (:func:`stack_events`): one data key's column of an EventPage is stacked once per
  page into ``(n, *sig_shape)`` float64 (integer readings int64); an event whose value has another
  shape (or is not numeric) is dropped and reported, the rest of the page goes on.
- **Other streams** (``stream`` other than ``"primary"``, e.g. ``baseline``): offered only to
  consumers that opt in (:attr:`Consumer.streams`), numeric scalars only, named
  ``"<stream>/<data key>"``; their batches' ``nav_index`` is the event's index in its stream
  (``seq_num - 1``): they are not points of the scan grid and are never placed or dropped as
  outside the scan.
- **Frame signals** (:func:`frame_signal`): one per detector series, named after the frame source,
  with ``row``/``col`` axes in px; frames keep their wire dtype.

Placement (seq_num -> nav index) is :mod:`beamlens.daemon.placement`; out-of-scan points are dropped
by the caller before batches are built. Follows the event-model document schemas (data_keys
``dtype``/``shape``/``units``/``external``) and LiberTEM's signal/navigation split.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from beamlens.consumers.base import Axis, Batch, SeriesInfo, SignalInfo

from .limits import MAX_WIRE_INDEX

MAX_SIG_ELEMENTS = 1 << 26
"""An event data key declaring more values per point than this (64 Mi) is not offered: its shape
would size every consumer's stacking of a page."""
AXIS_NAMES = {1: ("channel",), 2: ("row", "col"), 3: ("plane", "row", "col")}


def _shape(value: Any) -> tuple[int, ...] | None:
    """A declared per-point shape: a list of 0..8 positive ints, at most :data:`MAX_SIG_ELEMENTS`."""
    if not isinstance(value, (list, tuple)) or len(value) > 8:
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_WIRE_INDEX for n in value):
        return None
    return tuple(value) if math.prod(value) <= MAX_SIG_ELEMENTS else None


def ordered_keys(descriptor: Mapping[str, Any]) -> list[str]:
    """Data keys of ``descriptor``, hinted fields first (``hints[object]["fields"]``), then the rest
    in the descriptor's order."""
    keys = descriptor.get("data_keys")
    if not isinstance(keys, Mapping):
        return []
    hints = descriptor.get("hints")
    hinted: list[str] = []
    if isinstance(hints, Mapping):
        for obj in hints.values():
            fields = obj.get("fields") if isinstance(obj, Mapping) else None
            if isinstance(fields, list):
                hinted += [f for f in fields if isinstance(f, str) and f in keys and f not in hinted]
    return hinted + [k for k in keys if k not in hinted]


def event_signals(descriptor: Mapping[str, Any], stream: str = "primary") -> list[SignalInfo]:
    """The signals of an EventDescriptor of ``stream``, in the order they are offered to consumers.

    Returns:
        primary: one :class:`SignalInfo` per inline array key (dtype float64) and numeric scalar
        key (``number``: float64, ``integer``: int64), ``descriptor`` attached; another stream:
        its numeric scalar keys only, named ``"<stream>/<data key>"``, ``stream`` set.
    """
    keys = descriptor.get("data_keys", {})
    out = []
    for name in ordered_keys(descriptor):
        dk = keys[name]
        if not isinstance(dk, Mapping) or dk.get("external"):
            continue
        kind, shape = dk.get("dtype"), _shape(dk.get("shape") if dk.get("shape") is not None else [])
        if shape is None:
            continue
        if kind == "array" and shape and stream == "primary":
            dtype = "float64"
        elif kind in ("number", "integer") and shape == ():
            dtype = "int64" if kind == "integer" else "float64"
        else:
            continue
        units = dk.get("units")
        out.append(SignalInfo(name=name if stream == "primary" else f"{stream}/{name}", kind="event",
                              sig_shape=shape, dtype=dtype, units=units if isinstance(units, str) else "",
                              descriptor=descriptor, stream=stream))
    return out


def stack_events(values: Any, n: int, info: SignalInfo) -> tuple[np.ndarray, np.ndarray]:
    """Stack one data key's column of an EventPage.

    Args:
        values: ``page["data"][info.name]`` (a list of ``n`` numbers, lists or ndarrays), or None
            when the page lacks the key.
        n: events in the page.
        info: the signal.

    Returns:
        ``(data, ok)``: ``data`` ``(ok.sum(), *info.sig_shape)`` in ``info.dtype``; ``ok`` bool
        ``(n,)``, False for events whose value is missing, not numeric or of another shape.
    """
    shape, dtype = info.sig_shape, np.dtype(info.dtype)
    ok = np.zeros(n, dtype=bool)
    if not isinstance(values, (list, tuple)) or len(values) != n:
        return np.zeros((0, *shape), dtype=dtype), ok
    try:
        arr = np.asarray(values, dtype=dtype)
        if arr.shape == (n, *shape):
            ok[:] = True
            return arr, ok
    except (ValueError, TypeError, OverflowError):
        pass
    rows = []
    for i, v in enumerate(values):
        if isinstance(v, (str, bytes)):
            continue
        try:
            a = np.asarray(v, dtype=dtype)
        except (ValueError, TypeError, OverflowError):
            continue
        if a.shape == shape:
            ok[i] = True
            rows.append(a)
    return (np.stack(rows) if rows else np.zeros((0, *shape), dtype=dtype)), ok


def event_batch(info: SignalInfo, values: Any, nav_index: np.ndarray, seq_num: np.ndarray,
                time: Sequence[Any] | None) -> tuple[Batch | None, int]:
    """The batch of ``info`` from one page's column, for events already placed (``nav_index >= 0``).

    Returns:
        ``(batch or None when no event is usable, events dropped as wrong_shape)``.
    """
    n = len(nav_index)
    data, ok = stack_events(values, n, info)
    bad = int(n - ok.sum())
    if not ok.any():
        return None, bad
    t = _times(time, n)
    if bad:
        return Batch(info, data, nav_index[ok], seq_num[ok], t[ok]), bad
    return Batch(info, data, nav_index, seq_num, t), 0


def _times(time: Any, n: int) -> np.ndarray:
    try:
        t = np.asarray(time, dtype=np.float64)
        if t.shape == (n,):
            return t
    except (ValueError, TypeError):
        pass
    return np.full(n, np.nan)


def frame_signal(series: SeriesInfo) -> SignalInfo:
    """The signal of a detector frame series: named after its source, ``sig_shape`` and wire dtype
    of its frames, ``counts``, axes ``row``/``col`` (``channel`` for 1-D, ``plane`` first for 3-D)
    with pixel indices as values (px)."""
    names = AXIS_NAMES.get(len(series.sig_shape), tuple(f"dim_{i}" for i in range(len(series.sig_shape))))
    axes = tuple(Axis(a, "px", np.arange(n, dtype=np.float64)) for a, n in zip(names, series.sig_shape))
    return SignalInfo(name=series.source, kind="frame", sig_shape=tuple(series.sig_shape), dtype=series.dtype,
                      units="counts", axes=axes, series=series)


def frame_batch(info: SignalInfo, data: np.ndarray, nav_index: np.ndarray, numbers: np.ndarray,
                received: float) -> Batch:
    """A batch of frames already placed (``nav_index >= 0``); seq_num is frame number + 1, time the
    receive time."""
    n = len(nav_index)
    return Batch(info, data, nav_index.astype(np.int64, copy=False), numbers.astype(np.int64) + 1, np.full(n, received))


def signal_json(info: SignalInfo) -> dict[str, Any]:
    """A JSON-able description of a signal (checkpoints): everything but array axis values, which
    are returned under ``axes[i]["values"]`` as lists of floats (or None)."""
    return {
        "name": info.name, "kind": info.kind, "sig_shape": list(info.sig_shape), "dtype": info.dtype,
        "units": info.units,
        "axes": [{"name": a.name, "units": a.units,
                  "values": None if a.values is None else np.asarray(a.values, dtype=np.float64).tolist()}
                 for a in info.axes],
        "descriptor": info.descriptor, "stream": info.stream,
        "series": None if info.series is None else {
            "source": info.series.source, "series_id": info.series.series_id,
            "sig_shape": list(info.series.sig_shape), "dtype": info.series.dtype, "n_frames": info.series.n_frames,
            "meta": dict(info.series.meta)},
    }


def signal_from_json(d: Mapping[str, Any]) -> SignalInfo:
    """Inverse of :func:`signal_json`.

    Raises:
        KeyError, TypeError, ValueError: a malformed description.
    """
    s = d.get("series")
    series = None if s is None else SeriesInfo(
        source=str(s["source"]), series_id=str(s["series_id"]), sig_shape=tuple(int(x) for x in s["sig_shape"]),
        dtype=str(s["dtype"]), n_frames=None if s.get("n_frames") is None else int(s["n_frames"]),
        meta=dict(s.get("meta") or {}))
    axes = tuple(Axis(str(a["name"]), str(a.get("units", "")),
                      None if a.get("values") is None else np.asarray(a["values"], dtype=np.float64))
                 for a in d.get("axes", []))
    kind = d["kind"]
    if kind not in ("event", "frame"):
        raise ValueError(f"signal kind {kind!r}")
    return SignalInfo(name=str(d["name"]), kind=kind, sig_shape=tuple(int(x) for x in d["sig_shape"]),
                      dtype=str(np.dtype(d["dtype"])), units=str(d.get("units", "")), axes=axes,
                      descriptor=d.get("descriptor"), series=series, stream=str(d.get("stream", "primary")))
