"""The consumer contract: one small class per analysis, one input interface for events and frames,
and state that is declared, so partial results merge.

A consumer is instantiated once per run (at its RunStart, or when a frame-only series opens one).
The daemon turns Bluesky event data keys and detector frame streams alike into signals
(:class:`SignalInfo`: shape, dtype, units, axes) and offers each signal of the run to the consumer's
:meth:`Consumer.signal`, which either accepts it by returning the buffers it needs, or raises
:class:`NotApplicable`. Data then arrives as :class:`Batch` es of one signal, ``(n, *sig_shape)`` with
the flat nav index of each point, in :meth:`Consumer.process`; points outside the scan are dropped
(and counted once) by the daemon. An event data key and a frame stream of the same run may both be
inputs of one consumer (e.g. a frame sum normalised by an I0 event field): each arrives in batches
of its own, matched by nav index through the buffers.

Everything a consumer keeps is a declared buffer (LiberTEM's ``UDF.get_result_buffers``, with its
private/result distinction): published result buffers and ``private`` state buffers, each of kind
``nav`` (one value or ``extra_shape`` values per scan point, flat ``(nav_size, *extra_shape)``),
``sig`` (shaped like the signal, e.g. component spectra ``(k, n_channels)``) or ``single`` (a fixed
shape). The daemon allocates them (float buffers NaN-filled, others zero), sizes and grows nav
buffers, checkpoints them (no pickled objects), and publishes the non-private ones. A consumer
keeps nothing else that matters: attributes it sets in :meth:`Consumer.signal` are configuration
derived from the signal and its parameters, rebuilt by calling :meth:`Consumer.signal` again.

Partial results merge (STYLE habit 3): two instances that processed disjoint parts of one run
combine with :meth:`Consumer.merge` (``dest`` absorbs ``src``), after which :meth:`Consumer.results`
recomputes the derived result buffers. The default merge follows each buffer's declared ``merge``
rule (``fill`` for nav buffers: take ``src`` where it holds a value; ``sum``/``max``/``min`` element
wise); buffers with rule ``None`` are ``derived`` (recomputed by ``results``) or handled by the
consumer's own override. Order-dependent analyses (mixture fitting on a stream, tracking) set
``mergeable = False``; their stateless per-batch stage (network inference, blob finding) is
:meth:`Consumer.stage`, which the daemon may run on its pool, or anywhere.

Threads: ``signal``, ``process``, ``merge``, ``results``, the document hooks and the ``then``
callbacks of background jobs are called from one thread, in order, so a consumer needs no locking.
Long work (a refit, a final fit) goes to the daemon's pool through :meth:`RunInfo.submit`; its
result is installed by a callback on the daemon's thread. A consumer starts no thread of its own.

Layering: this module imports nothing from ``beamlens.daemon``; the daemon imports consumers.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

BufferKind = Literal["nav", "sig", "single"]
MergeRule = Literal["fill", "sum", "max", "min"]
SignalKind = Literal["event", "frame"]


class ConsumerParams(BaseModel):
    """Base class of every consumer's parameter model (``extra="forbid"``: typos fail at start)."""

    model_config = ConfigDict(extra="forbid")


class NotApplicable(Exception):
    """Raised by :meth:`Consumer.signal` for a signal the consumer does not take, or by a document
    hook for a run it cannot analyse at all; the daemon then does not route that signal (or the
    run) to it, logs why at INFO level, and counts nothing as a failure."""


class BadData(Exception):
    """Raised for data that cannot be analysed (wrong shape, wrong dtype). The daemon logs it and
    counts it under ``reason``; it is not a consumer failure."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class BufferSpec:
    """Declaration of one buffer.

    Attributes:
        name: buffer name, unique within the consumer (``[a-z0-9_]+``).
        kind: ``"nav"``, ``"sig"`` or ``"single"`` (see module docstring).
        extra_shape: trailing shape; for ``nav`` the per-point shape (``()`` for a map), for ``sig``
            and ``single`` the full shape.
        dtype: numpy dtype string; float buffers are filled with NaN at allocation, others with 0.
        units: physical units of the values (``"eV"``, ``"counts"``, ``""`` for dimensionless).
        description: one line for people (web page, file attributes).
        axis: for ``sig`` buffers (and ``nav`` buffers of one spectrum per point), the name of the
            signal axis the last dimension runs along (``"energy"``), published with its values
            when the consumer sets ``run.axes``.
        metric: name of a science gauge in ``beamlens.daemon.metrics.SCIENCE_GAUGES`` that the daemon
            keeps equal to this ``single`` buffer (one sample per element, labelled by index).
        labels: with ``metric``, the gauge's label value of each element (feature or series names)
            instead of its index.
        private: state kept, checkpointed and merged but not published (sufficient statistics,
            stored spectra).
        merge: how :meth:`Consumer.merge` combines this buffer of two partial results by default:
            ``"fill"`` (take the source's values where it has one: not NaN for floats, not 0
            otherwise), ``"sum"``, ``"max"``, ``"min"``; ``None``: derived by
            :meth:`Consumer.results`, or merged by the consumer's own :meth:`Consumer.merge`.
            Default: ``"fill"`` for ``nav`` buffers, ``None`` otherwise.
    """

    name: str
    kind: BufferKind
    extra_shape: tuple[int, ...] = ()
    dtype: str = "float64"
    units: str = ""
    description: str = ""
    axis: str | None = None
    metric: str | None = None
    private: bool = False
    merge: MergeRule | None | Literal["default"] = "default"
    labels: tuple[str, ...] = ()

    @property
    def merge_rule(self) -> MergeRule | None:
        """The effective merge rule (``"fill"`` for nav buffers unless declared otherwise)."""
        if self.merge == "default":
            return "fill" if self.kind == "nav" else None
        return self.merge

    def shape(self, nav_size: int) -> tuple[int, ...]:
        """Array shape for ``nav_size`` points: ``(nav_size, *extra_shape)`` for ``nav``,
        ``extra_shape`` otherwise."""
        return (nav_size, *self.extra_shape) if self.kind == "nav" else self.extra_shape

    def allocate(self, nav_size: int) -> np.ndarray:
        """Return a fresh array of :meth:`shape`; NaN-filled for floats, zeros otherwise."""
        dtype = np.dtype(self.dtype)
        if dtype.kind == "f":
            return np.full(self.shape(nav_size), np.nan, dtype=dtype)
        return np.zeros(self.shape(nav_size), dtype=dtype)

    def layout(self) -> dict[str, Any]:
        """The JSON-able layout a checkpoint records and checks on restore."""
        return {"kind": self.kind, "extra_shape": list(self.extra_shape), "dtype": np.dtype(self.dtype).str,
                "private": self.private}


class Buffers(Mapping[str, np.ndarray]):
    """A consumer's allocated buffers, by name, with attribute access (``self.buffers.total[pos] = x``)
    and their specs in :attr:`specs`. The daemon may rebind an array (a growing nav buffer); a
    consumer must therefore not keep references to the arrays across calls."""

    def __init__(self, arrays: Mapping[str, np.ndarray] | None = None, specs: Mapping[str, BufferSpec] | None = None):
        object.__setattr__(self, "_arrays", dict(arrays or {}))
        object.__setattr__(self, "specs", dict(specs or {}))

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self._arrays[name]
        except KeyError:
            raise AttributeError(f"no buffer {name!r} (declared: {sorted(self._arrays)})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("buffers are written in place (self.buffers.x[...] = v), not rebound")

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def bind(self, name: str, array: np.ndarray, spec: BufferSpec) -> None:
        """Add or replace one buffer (daemon side: allocation, growth, restore)."""
        self._arrays[name] = array
        self.specs[name] = spec

    @classmethod
    def allocate(cls, specs: list[BufferSpec] | Mapping[str, BufferSpec], nav_size: int) -> Buffers:
        """Fresh buffers for ``specs`` with ``nav_size`` points (tests and partial instances)."""
        specs = dict(specs) if isinstance(specs, Mapping) else {s.name: s for s in specs}
        return cls({n: s.allocate(nav_size) for n, s in specs.items()}, specs)


@dataclass(frozen=True)
class Axis:
    """One signal dimension: its kind (``"energy"``, ``"two_theta"``, ``"q"``, ``"row"``, ``"col"``,
    ``"channel"``), units (``"eV"``, ``"deg"``, ``"1/angstrom"``, ``"px"``) and values (float64
    ``(n,)``, or None where only the index is known)."""

    name: str
    units: str = ""
    values: np.ndarray | None = None


@dataclass(frozen=True)
class SeriesInfo:
    """A detector frame series (one acquisition: DECTRIS series, array-1.0 stream, camera movie).

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


@dataclass(frozen=True)
class SignalInfo:
    """One input signal of a run, as the daemon offers it to :meth:`Consumer.signal`.

    Attributes:
        name: the event data key (``kind == "event"``) or the frame source name (``"frame"``).
        kind: ``"event"`` (a data key of the run's primary stream, or of another stream, see
            :attr:`stream`) or ``"frame"`` (a detector frame series).
        sig_shape: shape of one point's value: ``()`` for a scalar reading, ``(n_channels,)`` for a
            spectrum, ``(rows, cols)`` for a frame (px).
        dtype: numpy dtype string of :attr:`Batch.data` (event arrays and numbers: ``"float64"``,
            integer readings ``"int64"``; frames: their wire dtype).
        units: units of the values (the data key's ``units``; frames: ``"counts"`` unless the
            series says otherwise).
        axes: one :class:`Axis` per signal dimension where the daemon knows it (frames: ``row``,
            ``col`` in px); spectral consumers derive energy axes themselves from ``descriptor``.
        descriptor: the primary EventDescriptor (events), for configuration readings such as the
            energy axis; None for frames.
        series: the frame series (frames); None for events.
        stream: the Bluesky stream of an event signal: ``"primary"`` (the scan's points), or
            another named stream (``"baseline"``, a monitor) offered only to consumers that opt in
            through :attr:`Consumer.streams`; then :attr:`name` is ``"<stream>/<data key>"``, only
            numeric scalars are offered, and :attr:`Batch.nav_index` is the event's index in its
            stream (``seq_num - 1``), not a point of the scan grid (such data goes in ``single``
            or private buffers, never in nav buffers at that index).
    """

    name: str
    kind: SignalKind
    sig_shape: tuple[int, ...]
    dtype: str
    units: str = ""
    axes: tuple[Axis, ...] = ()
    descriptor: Mapping[str, Any] | None = None
    series: SeriesInfo | None = None
    stream: str = "primary"

    @property
    def key(self) -> str:
        """The data key of an event signal (:attr:`name` without its ``"<stream>/"`` prefix)."""
        return self.name if self.stream == "primary" else self.name.split("/", 1)[-1]

    @property
    def data_key(self) -> Mapping[str, Any]:
        """The descriptor's ``data_keys`` entry of an event signal (``{}`` for frames)."""
        if self.descriptor is None:
            return {}
        return self.descriptor.get("data_keys", {}).get(self.key, {})


@dataclass
class Batch:
    """Points of one signal, as :meth:`Consumer.process` receives them.

    Attributes:
        signal: the signal the points belong to.
        data: ``(n, *signal.sig_shape)`` in ``signal.dtype`` (read-only by convention; frames may be
            views of the receive buffer).
        nav_index: int64 ``(n,)`` flat indices into the run's nav buffers, all ``>= 0`` (placement
            follows the RunStart ``shape``/``snaking``; points outside the scan never get here).
        seq_num: int64 ``(n,)`` the events' ``seq_num`` (frames: frame number + 1).
        time: float64 ``(n,)`` Unix time of each point, s (frames: receive time).
    """

    signal: SignalInfo
    data: np.ndarray
    nav_index: np.ndarray
    seq_num: np.ndarray
    time: np.ndarray

    def __len__(self) -> int:
        return len(self.nav_index)

    def subset(self, keep: np.ndarray) -> Batch:
        """The points selected by ``keep`` (a boolean mask or index array)."""
        return Batch(self.signal, self.data[keep], self.nav_index[keep], self.seq_num[keep], self.time[keep])


def _no_skip(reason: str, n: int) -> None:
    pass


def _no_pool(job: Callable[..., Any], *args: Any, then: Callable[[Any], None] | None = None) -> None:
    result = job(*args)
    if then is not None:
        then(result)


@dataclass
class RunInfo:
    """A consumer's view of its run, set by the daemon before any hook is called.

    Attributes:
        uid: the RunStart uid of the raw run.
        nav_shape: scan (navigation) shape, e.g. ``(21, 21)`` for a grid scan; ``(n,)`` for a
            one-dimensional scan; ``(0,)`` when the length is unknown (nav buffers then grow).
        start_doc: the RunStart document (read-only by convention).
        skipped: ``skipped(reason, n)`` reports points skipped as unusable (NaN spectra, ...); the
            daemon counts them in ``beamlens_points_skipped_total``.
        axes: signal axes the consumer publishes with its ``sig`` buffers, e.g.
            ``{"energy": (array_of_eV, "eV")}``; filled by the consumer in :meth:`Consumer.signal`.
        submit: ``submit(job, *args, then=callback)`` runs ``job(*args)`` on the daemon's pool (timed
            and charged to this consumer, cancelled when the run ends) and calls ``then(result)``
            on the daemon's thread. Without a daemon (tests, partial instances) the job runs at once.
    """

    uid: str
    nav_shape: tuple[int, ...]
    start_doc: Mapping[str, Any]
    skipped: Callable[[str, int], None] = _no_skip
    axes: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)
    submit: Callable[..., None] = _no_pool

    @property
    def nav_size(self) -> int:
        """Points of the scan (0 when its length is unknown)."""
        return int(np.prod(self.nav_shape)) if self.nav_shape != (0,) else 0


class Consumer:
    """Base class of every analysis plug-in.

    Subclasses set ``name`` (registry name used in configs) and ``Params`` (a
    :class:`ConsumerParams` subclass) and implement :meth:`signal` and :meth:`process`; where a
    buffer's default merge rule does not fit, :meth:`merge`; where published buffers are derived from
    state, :meth:`results`. Document hooks (:meth:`start`, :meth:`descriptor`, :meth:`stop`) are
    optional, for metadata. See the module docstring for the threading and state rules.
    """

    name: ClassVar[str] = "consumer"
    Params: ClassVar[type[ConsumerParams]] = ConsumerParams
    mergeable: ClassVar[bool] = True
    """Whether partial results of disjoint parts of a run combine with :meth:`merge` into the
    sequential result. ``False`` for order-dependent analyses: they run sequentially."""
    streams: ClassVar[tuple[str, ...]] = ()
    """Named event streams besides ``primary`` whose numeric scalar data keys this consumer is
    offered (as ``"<stream>/<key>"`` signals, :attr:`SignalInfo.stream`), ``"*"`` for every one;
    empty (the default): primary data keys and frame series only."""

    def __init__(self, params: ConsumerParams, run: RunInfo):
        self.params = params
        self.run = run
        self.buffers = Buffers()
        self.log = logging.getLogger(f"beamlens.consumers.{self.name}")

    # -- the contract ------------------------------------------------------------------------
    def signal(self, info: SignalInfo) -> list[BufferSpec]:
        """Offered one signal of the run (event data keys in the descriptor's order, hinted first;
        frame series as they start). Return the buffers needed to take it (``[]`` to take it with
        those already declared), or raise :class:`NotApplicable` to leave it. Called again with the
        same signals, in the same order, on a fresh instance resumed from a checkpoint, and must
        then declare the same buffers."""
        raise NotApplicable(f"{type(self).__name__} takes no signals")

    def process(self, batch: Batch, staged: Any = None) -> bool | None:
        """Analyse a batch of a signal this consumer took, writing into :attr:`buffers`.

        Args:
            batch: the points (see :class:`Batch`).
            staged: what :meth:`stage` returned for this batch, if the consumer has a stage.

        Returns:
            True when derived result buffers should be recomputed now (:meth:`results`); None or
            False otherwise.

        Raises:
            BadData: the batch cannot be analysed; the daemon counts its points under ``reason``.
        """
        return None

    #: Set by subclasses that define :meth:`stage`.
    has_stage: ClassVar[bool] = False

    def stage(self, batch: Batch) -> Any:
        """Stateless per-batch work (network inference, blob finding) the daemon may run off its
        thread, concurrently with other batches: reads only ``params`` and what :meth:`signal` set
        up, never :attr:`buffers`. Its result reaches :meth:`process` as ``staged``, in batch order."""
        return None

    def merge(self, dest: Buffers, src: Buffers) -> None:
        """Combine the partial result ``src`` into ``dest`` (both this consumer's buffers, from
        disjoint parts of one run), buffer by buffer by each spec's :attr:`BufferSpec.merge_rule`.
        Buffers without a rule are left for :meth:`results` or an override.

        Raises:
            ValueError: buffers of different shapes (the partials are not of the same run).
        """
        for name, spec in dest.specs.items():
            rule = spec.merge_rule
            if rule is None or name not in src:
                continue
            d, s = dest[name], src[name]
            if d.shape != s.shape:
                raise ValueError(f"buffer {name!r}: cannot merge shape {s.shape} into {d.shape}")
            if rule == "fill":
                has = ~np.isnan(s) if s.dtype.kind in "fc" else s != 0
                np.copyto(d, s, where=has)
            elif rule == "sum":
                d += s
            else:
                both = np.fmax(d, s) if rule == "max" else np.fmin(d, s)
                np.copyto(d, both)

    def results(self) -> None:
        """Recompute derived result buffers from the buffers alone (no other state, no side effect
        beyond writing those buffers): called after :meth:`merge`, after a restore, when
        :meth:`process` returns True and when the run finishes."""

    def finish(self) -> None:
        """The run's data is complete (called before :meth:`stop`): a final fit goes here, usually
        through ``run.submit`` so the daemon stays responsive (the run is ``finishing`` until every
        job has been installed)."""

    # -- optional document hooks -------------------------------------------------------------
    def start(self, doc: Mapping[str, Any]) -> None:
        """RunStart received; ``self.run`` is set."""

    def descriptor(self, doc: Mapping[str, Any]) -> None:
        """An EventDescriptor of this run (metadata only; data arrives through :meth:`signal`)."""

    def stop(self, doc: Mapping[str, Any]) -> None:
        """RunStop received (or the run was closed by the daemon), after :meth:`finish` and its
        jobs: nothing more will arrive."""


def main_signal(consumer: Consumer, info: SignalInfo, data_key: str | None) -> None:
    """Check that ``info`` may become ``consumer``'s one main input (the first suitable signal
    offered, or the one named ``data_key``); consumers record it as ``self.key`` once taken.

    Raises:
        NotApplicable: the consumer already has its main input, or ``data_key`` names another.
    """
    taken = getattr(consumer, "key", None)
    if taken is not None:
        raise NotApplicable(f"already analysing {taken!r}")
    if data_key is not None and info.name != data_key:
        raise NotApplicable(f"not the configured data key {data_key!r}")


def array_signals(info: SignalInfo, ndim: int | tuple[int, ...] = (1, 2)) -> bool:
    """Whether ``info`` is an inline array of ``ndim`` dimensions (a spectrum has 1, a frame 2)."""
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    return len(info.sig_shape) in ndims and np.dtype(info.dtype).kind in "uif"


def finite_rows(x: np.ndarray) -> np.ndarray:
    """Boolean mask ``(n,)`` of rows of ``x`` (``(n, ...)``) whose values are all finite."""
    if x.dtype.kind in "ui":
        return np.ones(len(x), dtype=bool)
    return np.isfinite(x.reshape(len(x), -1)).all(axis=1)
