"""The consumer interface: one small class per analysis.

A consumer is instantiated once per Bluesky run (at its RunStart) and receives that run's documents
through methods named after them, as in event_model's ``DocumentRouter``: ``start``, ``descriptor``,
``event_page``, ``stop`` and, for detector frame feeds, ``frames``. A method that is not overridden is a
no-op. Events always arrive packed as EventPages (``event_model.pack_event_page``), so a consumer
handles one batch shape only.

Results are declared, not returned (LiberTEM's ``UDF.get_result_buffers``): once the run's primary
descriptor is known, the daemon calls :meth:`Consumer.result_buffers`, allocates every declared
:class:`BufferSpec` and hands the arrays back as ``self.results``. A consumer writes into them in
place; the daemon snapshots and publishes them (HTTP maps, metrics, documents, files).

Buffer kinds:

- ``nav``: one value (or ``extra_shape`` values) per scan point. The daemon allocates it flat,
  ``(nav_size, *extra_shape)``, and the consumer indexes it with the flat nav positions it is handed
  in :meth:`Consumer.event_page`; publishing reshapes it to ``(*nav_shape, *extra_shape)``.
  Float buffers start as NaN so unvisited points show as empty.
- ``sig``: shaped like the signal (spectrum or frame), e.g. component spectra ``(k, n_channels)``.
- ``single``: a fixed shape independent of the scan, e.g. explained-variance ratios ``(k,)``.

Layering: this module imports nothing from ``beamlens.daemon``; the daemon imports consumers.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

BufferKind = Literal["nav", "sig", "single"]


class ConsumerParams(BaseModel):
    """Base class of every consumer's parameter model (``extra="forbid"``: typos fail at start)."""

    model_config = ConfigDict(extra="forbid")


class NotApplicable(Exception):
    """Raised by a consumer that cannot analyse this run (e.g. no array data key); the daemon then
    leaves it idle for the run, logs why at INFO level, and counts nothing as a failure."""


class BadData(Exception):
    """Raised for data that cannot be analysed (wrong shape, wrong dtype). The daemon logs it and
    counts it under ``reason``; it is not a consumer failure."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class BufferSpec:
    """Declaration of one result buffer.

    Attributes:
        name: buffer name, unique within the consumer (``[a-z0-9_]+``).
        kind: ``"nav"``, ``"sig"`` or ``"single"`` (see module docstring).
        extra_shape: trailing shape; for ``nav`` the per-point shape (``()`` for a map), for ``sig``
            and ``single`` the full shape.
        dtype: numpy dtype string; float buffers are filled with NaN at allocation.
        units: physical units of the values (``"eV"``, ``"counts"``, ``""`` for dimensionless).
        description: one line for people (web page, file attributes).
        axis: for ``sig`` buffers, the name of the signal axis the last dimension runs along
            (``"energy"``), published with its values when the consumer sets ``axes``.
        metric: name of a science gauge in ``beamlens.daemon.metrics.SCIENCE_GAUGES`` that the daemon
            keeps equal to this ``single`` buffer (one sample per element, labelled by index).
    """

    name: str
    kind: BufferKind
    extra_shape: tuple[int, ...] = ()
    dtype: str = "float64"
    units: str = ""
    description: str = ""
    axis: str | None = None
    metric: str | None = None

    def allocate(self, nav_size: int) -> np.ndarray:
        """Return a fresh array for this buffer: ``(nav_size, *extra_shape)`` for ``nav``,
        ``extra_shape`` otherwise; NaN-filled for floats, zeros otherwise."""
        shape = (nav_size, *self.extra_shape) if self.kind == "nav" else self.extra_shape
        dtype = np.dtype(self.dtype)
        if dtype.kind == "f":
            return np.full(shape, np.nan, dtype=dtype)
        return np.zeros(shape, dtype=dtype)


class Results:
    """Attribute access to a consumer's allocated buffers (``self.results.total[pos] = ...``)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.__dict__.update(arrays)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.__dict__[name]


@dataclass
class RunInfo:
    """What a consumer knows about its run, set by the daemon before ``start`` is called.

    Attributes:
        uid: the RunStart uid of the raw run.
        nav_shape: scan (navigation) shape, e.g. ``(21, 21)`` for a grid scan; ``(n,)`` for a
            one-dimensional scan; ``(0,)`` growing when the length is unknown.
        start_doc: the RunStart document (read-only by convention).
        skipped: callback ``skipped(reason, n)`` to report points skipped as unusable (NaN spectra,
            ...); the daemon counts them in ``beamlens_points_skipped_total``.
        axes: signal axes the consumer publishes with its ``sig`` buffers, e.g.
            ``{"energy": (array_of_eV, "eV")}``; filled by the consumer.
    """

    uid: str
    nav_shape: tuple[int, ...]
    start_doc: Mapping[str, Any]
    skipped: Callable[[str, int], None] = lambda reason, n: None
    axes: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class SeriesInfo:
    """A detector frame series (one acquisition: DECTRIS series, array-1.0 stream, camera movie),
    as the frame path announces it to frame consumers.

    Attributes:
        source: config name of the frame source.
        series_id: the detector's series id (or unique id), as a string.
        sig_shape: frame shape in numpy order ``(rows, cols)``, px.
        dtype: numpy dtype string of the frames on the wire (e.g. ``"uint16"``).
        n_frames: frames announced for the series, or None when open-ended.
        meta: the rest of the series header (format-specific, JSON-like).
    """

    source: str
    series_id: str
    sig_shape: tuple[int, ...]
    dtype: str
    n_frames: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


class Consumer:
    """Base class of every analysis plug-in.

    Subclasses set ``name`` (registry name used in configs) and ``Params`` (a
    :class:`ConsumerParams` subclass), and override the document methods they need. The daemon calls
    the methods from one thread, in document order, so a consumer needs no locking. It may run
    background work (e.g. a refit) that writes into ``self.results`` later: live snapshots are
    copies taken without a lock and may mix two updates of one buffer; the snapshot taken after
    ``stop`` returns is final.
    """

    name: ClassVar[str] = "consumer"
    Params: ClassVar[type[ConsumerParams]] = ConsumerParams
    inputs: ClassVar[Literal["events", "frames"]] = "events"
    """What the consumer analyses: ``"events"`` (Bluesky event data; buffers are declared after the
    first primary descriptor) or ``"frames"`` (detector frames; buffers are declared after
    :meth:`series`)."""

    def __init__(self, params: ConsumerParams, run: RunInfo):
        self.params = params
        self.run = run
        self.results: Results = Results({})
        self.log = logging.getLogger(f"beamlens.consumers.{self.name}")

    # -- checkpoints -------------------------------------------------------------------------
    transient: ClassVar[tuple[str, ...]] = ()
    """Attributes a checkpoint leaves out (sessions, open files); :meth:`restored` rebuilds them."""

    def __getstate__(self) -> dict[str, Any]:
        """What a checkpoint keeps: everything but the run context (rebuilt by the daemon), the
        result buffers (saved by the daemon beside it) and :attr:`transient` attributes."""
        skip = {"run", "results", *self.transient}
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def restored(self, run: RunInfo, results: Results) -> None:
        """Called on a consumer unpickled from a checkpoint after a daemon restart: rebind the run
        context and buffers; subclasses extend it to rebuild :attr:`transient` attributes."""
        self.run = run
        self.results = results

    # -- documents ---------------------------------------------------------------------------
    def start(self, doc: Mapping[str, Any]) -> None:
        """RunStart received; ``self.run`` is set."""

    def descriptor(self, doc: Mapping[str, Any]) -> None:
        """An EventDescriptor of this run. Raise :class:`NotApplicable` to sit the run out."""

    def result_buffers(self) -> list[BufferSpec]:
        """Declare result buffers; called once, after the first ``descriptor`` of the primary
        stream. Return ``[]`` for none."""
        return []

    def event_page(self, doc: Mapping[str, Any], positions: np.ndarray) -> None:
        """An EventPage of the primary stream.

        Args:
            doc: the EventPage (``data[key]`` is a list with one entry per event).
            positions: int64 array ``(n_events,)`` of flat nav indices where each event belongs
                (placement follows the RunStart ``shape``/``snaking``); ``-1`` where an event falls
                outside the declared scan shape.
        """

    def series(self, info: SeriesInfo) -> None:
        """A frame series starts in this run (frame consumers). Raise :class:`NotApplicable` to
        sit it out (e.g. a frame shape the model cannot take)."""

    def frames(self, frames: np.ndarray, positions: np.ndarray, info: SeriesInfo) -> None:
        """A batch of detector frames of the current series.

        Args:
            frames: ``(n_frames, *info.sig_shape)`` in the wire dtype (``info.dtype``), px.
            positions: int64 ``(n_frames,)`` flat nav indices (from the frame numbers, with the
                RunStart's ``shape``/``snaking``); ``-1`` outside the scan.
            info: the series the frames belong to.
        """

    def stop(self, doc: Mapping[str, Any]) -> None:
        """RunStop received (or the run was closed by the daemon): finalise results."""


def first_array_key(descriptor: Mapping[str, Any], ndim: int | tuple[int, ...] = (1, 2)) -> str:
    """Pick the analysed data key of a descriptor: the first ``dtype == "array"`` key whose shape
    has ``ndim`` dimensions (a spectrum has 1, a frame 2), hinted fields first.

    Raises:
        NotApplicable: if the descriptor has no such key.
    """
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    keys = descriptor.get("data_keys", {})
    hinted = [f for obj in descriptor.get("hints", {}).values() for f in obj.get("fields", [])]
    ordered = [k for k in hinted if k in keys] + [k for k in keys if k not in hinted]
    for key in ordered:
        dk = keys[key]
        if dk.get("dtype") == "array" and len(dk.get("shape") or []) in ndims and not dk.get("external"):
            return key
    raise NotApplicable(f"no inline array data key with {ndims} dimensions in descriptor")


def stack_rows(values: list[Any], sig_shape: tuple[int, ...], dtype: str = "float64") -> np.ndarray:
    """Stack one data key's values from an EventPage into ``(n_events, *sig_shape)``.

    Args:
        values: the page's ``data[key]`` list (ndarrays or nested lists).
        sig_shape: the shape the descriptor declares for the key.

    Raises:
        BadData: reason ``"wrong_shape"`` when any value's shape differs from ``sig_shape``.
    """
    try:
        arr = np.asarray(values, dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise BadData("wrong_shape", f"values do not stack to a regular array: {exc}") from None
    if arr.shape[1:] != tuple(sig_shape):
        raise BadData("wrong_shape", f"values of shape {arr.shape[1:]} where the descriptor declares {tuple(sig_shape)}")
    return arr


def finite_rows(x: np.ndarray) -> np.ndarray:
    """Boolean mask ``(n,)`` of rows of ``x`` (``(n, ...)``) whose values are all finite."""
    return np.isfinite(x.reshape(len(x), -1)).all(axis=1)
