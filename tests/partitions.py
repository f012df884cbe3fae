"""Run a consumer on the new contract without a daemon, sequentially and split into partitions that
are merged, so a test can compare the two (STYLE habit 3: partial results provably mergeable).

Shape of the check (CONTRACT.md, "Merge test shape"): instance A processes every batch of a run
in order; for each partition scheme the run's *points* (nav indices) are split into disjoint parts,
each part is processed by a fresh instance that got the same :meth:`Consumer.signal` calls and
full-size nav buffers (:meth:`Buffers.allocate`), and the parts are folded with
:meth:`Consumer.merge` (in a shuffled order) into a fresh instance, followed by
:meth:`Consumer.finish` and :meth:`Consumer.results`. All the signals of one point go to the same
part (a frame and its I0 reading stay together), and each part sees the run's batches in their
order, cut down to its points.

Typical use::

    seq, merged = run_partitions(StatsConsumer, {}, [sig], batches, nav_size=42)
    for label, m in merged.items():
        assert_buffers_equal(seq, m, label=label)

Background jobs (``run.submit``) run inline and ``stage`` is called before ``process``, as the
daemon would, so the helper works for any consumer of the contract.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from beamlens.consumers.base import Axis, Batch, Buffers, BufferSpec, Consumer, NotApplicable, RunInfo, SeriesInfo, SignalInfo

DEFAULT_KS = (1, 2, 3, 7)


# -- building signals and batches ---------------------------------------------------------------
def event_signal(name: str, sig_shape: tuple[int, ...] = (), dtype: str = "float64", units: str = "",
                 descriptor: Mapping[str, Any] | None = None) -> SignalInfo:
    """An event signal as the daemon offers it (a minimal primary descriptor is made if none given)."""
    if descriptor is None:
        descriptor = {"uid": "desc", "name": "primary", "run_start": "run",
                      "data_keys": {name: {"source": "sim", "dtype": "array" if sig_shape else "number",
                                           "shape": list(sig_shape), "units": units}}}
    return SignalInfo(name=name, kind="event", sig_shape=tuple(sig_shape), dtype=dtype, units=units,
                      descriptor=descriptor)


def frame_signal(source: str, sig_shape: tuple[int, int], dtype: str = "uint16", n_frames: int | None = None,
                 series_id: str = "1") -> SignalInfo:
    """A frame signal as the daemon offers it when a series starts (axes ``row``/``col`` in px)."""
    series = SeriesInfo(source=source, series_id=series_id, sig_shape=tuple(sig_shape), dtype=dtype, n_frames=n_frames)
    axes = tuple(Axis(a, "px", np.arange(n, dtype=np.float64)) for a, n in zip(("row", "col"), sig_shape))
    return SignalInfo(name=source, kind="frame", sig_shape=tuple(sig_shape), dtype=dtype, units="counts", axes=axes,
                      series=series)


def make_batches(signal: SignalInfo, data: np.ndarray, nav_index: np.ndarray | None = None,
                 batch_size: int = 16) -> list[Batch]:
    """Cut ``data`` (``(n, *sig_shape)``) into batches of at most ``batch_size`` points, placed at
    ``nav_index`` (default ``0..n-1``); seq_num is ``nav_index + 1``, time increases by 1 ms."""
    data = np.asarray(data)
    n = len(data)
    nav_index = np.arange(n, dtype=np.int64) if nav_index is None else np.asarray(nav_index, dtype=np.int64)
    out = []
    for i in range(0, n, batch_size):
        sl = slice(i, min(n, i + batch_size))
        out.append(Batch(signal, data[sl], nav_index[sl], nav_index[sl] + 1, 1e9 + np.arange(sl.start, sl.stop) * 1e-3))
    return out


# -- running instances ---------------------------------------------------------------------------
def new_instance(cls: type[Consumer], params: Mapping[str, Any] | Any, signals: Sequence[SignalInfo], nav_size: int,
                 start_doc: Mapping[str, Any] | None = None, uid: str = "run") -> tuple[Consumer, list[SignalInfo]]:
    """A fresh instance that got ``start`` and every ``signal`` call, with full-size buffers.

    Returns:
        ``(consumer, accepted signals)``.
    """
    p = params if not isinstance(params, Mapping) else cls.Params.model_validate(dict(params))
    start_doc = dict(start_doc or {"uid": uid, "time": 0.0, "num_points": nav_size})
    c = cls(p, RunInfo(uid=uid, nav_shape=(nav_size,), start_doc=start_doc))
    c.start(start_doc)
    accepted, specs = [], {}
    for info in signals:
        try:
            got = c.signal(info)
        except NotApplicable:
            continue
        accepted.append(info)
        for s in got:
            specs[s.name] = s
            c.buffers.bind(s.name, s.allocate(nav_size), s)
    return c, accepted


def feed(c: Consumer, batches: Iterable[Batch], accepted: Sequence[SignalInfo]) -> None:
    """Process ``batches`` of the accepted signals (others skipped), stage first, results when asked."""
    names = {s.name for s in accepted}
    for b in batches:
        if b.signal.name not in names or not len(b):
            continue
        staged = c.stage(b) if c.has_stage else None
        if c.process(b, staged):
            c.results()


def subset(batches: Iterable[Batch], points: np.ndarray) -> list[Batch]:
    """The batches cut down to the nav indices in ``points`` (empty ones left out)."""
    out = []
    for b in batches:
        keep = np.isin(b.nav_index, points)
        if keep.any():
            out.append(b.subset(keep))
    return out


def partition_schemes(points: np.ndarray, ks: Sequence[int] = DEFAULT_KS, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Disjoint splits of ``points`` (nav indices): ``k=<k>`` contiguous near-equal parts for each k,
    ``uneven`` (one point, 5 %, 30 %, the rest), ``interleaved`` (random assignment to 3 parts).
    Parts are returned in a shuffled order (the order they are merged in)."""
    rng = np.random.default_rng(seed)
    points = np.unique(points)
    n = len(points)
    schemes: dict[str, list[np.ndarray]] = {}
    for k in ks:
        schemes[f"k={k}"] = [p for p in np.array_split(points, k) if len(p)]
    cuts = sorted({min(n, 1), min(n, max(2, n // 20 + 1)), min(n, max(3, n // 20 + 1 + (3 * n) // 10))})
    schemes["uneven"] = [p for p in np.split(points, cuts) if len(p)]
    owner = rng.integers(0, 3, size=n)
    schemes["interleaved"] = [points[owner == i] for i in range(3) if (owner == i).any()]
    for parts in schemes.values():
        rng.shuffle(parts)
    return schemes


def run_sequential(cls: type[Consumer], params: Any, signals: Sequence[SignalInfo], batches: Sequence[Batch],
                   nav_size: int, finish: bool = True, **kw: Any) -> Consumer:
    """One instance that sees every batch in order, then ``finish()`` and ``results()``."""
    c, accepted = new_instance(cls, params, signals, nav_size, **kw)
    feed(c, batches, accepted)
    if finish:
        c.finish()
    c.results()
    return c


def run_merged(cls: type[Consumer], params: Any, signals: Sequence[SignalInfo], batches: Sequence[Batch],
               nav_size: int, parts: Sequence[np.ndarray], finish: bool = True, **kw: Any) -> Consumer:
    """Each part by a fresh instance, folded with ``merge`` in the order given into a fresh
    instance, then ``finish()`` and ``results()``."""
    dest, accepted = new_instance(cls, params, signals, nav_size, **kw)
    for part in parts:
        c, _ = new_instance(cls, params, signals, nav_size, **kw)
        feed(c, subset(batches, part), accepted)
        dest.merge(dest.buffers, c.buffers)
    if finish:
        dest.finish()
    dest.results()
    return dest


def run_partitions(cls: type[Consumer], params: Any, signals: Sequence[SignalInfo], batches: Sequence[Batch],
                   nav_size: int, ks: Sequence[int] = DEFAULT_KS, seed: int = 0, finish: bool = True,
                   **kw: Any) -> tuple[Consumer, dict[str, Consumer]]:
    """The sequential instance and one merged instance per partition scheme
    (:func:`partition_schemes` over the nav indices the batches touch).

    Args:
        cls: the consumer class.
        params: its parameters (a mapping validated by ``cls.Params``, or a Params instance).
        signals: every signal of the run, in the order the daemon offers them.
        batches: the run's batches in arrival order (any signals).
        nav_size: points of the scan (nav buffers' length).
        ks: partition counts of the contiguous schemes.
        seed: for the shuffled merge order and the interleaved scheme.
        finish: call ``finish()`` on the sequential and merged instances (not on the parts).
        **kw: ``start_doc``/``uid`` for :func:`new_instance`.

    Returns:
        ``(sequential, {scheme label: merged instance})``.
    """
    seq = run_sequential(cls, params, signals, batches, nav_size, finish=finish, **kw)
    points = np.concatenate([b.nav_index for b in batches]) if batches else np.zeros(0, np.int64)
    merged = {label: run_merged(cls, params, signals, batches, nav_size, parts, finish=finish, **kw)
              for label, parts in partition_schemes(points, ks, seed).items()}
    return seq, merged


def checkpoint_round_trip(cls: type[Consumer], params: Any, signals: Sequence[SignalInfo], batches: Sequence[Batch],
                          nav_size: int, path: Any, split: int | None = None, finish: bool = True,
                          **kw: Any) -> tuple[Consumer, Consumer]:
    """The uninterrupted run and one checkpointed after ``split`` batches (default: half) to
    ``path`` (a file; the daemon's format, :mod:`beamlens.daemon.checkpoint`), restored into a fresh
    instance as the daemon restores it (``start``, ``signal`` again, layouts checked, arrays bound,
    ``results()``) and fed the remaining batches.

    Returns:
        ``(uninterrupted, resumed)``, both finished (``finish()``, ``results()``) when ``finish``.
    """
    from beamlens.daemon.checkpoint import FORMAT, consumer_record, read_checkpoint, restore_consumer, write_checkpoint

    split = len(batches) // 2 if split is None else split
    whole = run_sequential(cls, params, signals, batches, nav_size, finish=finish, **kw)
    first, accepted = new_instance(cls, params, signals, nav_size, **kw)
    feed(first, batches[:split], accepted)
    record, arrays = consumer_record(first, accepted, "s0")
    write_checkpoint(path, {"format": FORMAT, "slot": record}, arrays)
    state, arrays = read_checkpoint(path)
    p = params if not isinstance(params, Mapping) else cls.Params.model_validate(dict(params))
    start_doc = dict(kw.get("start_doc") or {"uid": kw.get("uid", "run"), "time": 0.0, "num_points": nav_size})
    resumed = cls(p, RunInfo(uid=kw.get("uid", "run"), nav_shape=(nav_size,), start_doc=start_doc))
    again = restore_consumer(resumed, start_doc, state["slot"], arrays)
    feed(resumed, batches[split:], again)
    if finish:
        resumed.finish()
    resumed.results()
    return whole, resumed


def published(c: Consumer) -> dict[str, np.ndarray]:
    """The consumer's non-private buffers."""
    return {n: a for n, a in c.buffers.items() if not c.buffers.specs[n].private}


def assert_buffers_equal(a: Consumer, b: Consumer, label: str = "", rtol: float = 0.0, atol: float = 0.0,
                         private: bool = False, names: Iterable[str] | None = None,
                         compare: Callable[[str, np.ndarray, np.ndarray], None] | None = None) -> None:
    """Assert ``a`` and ``b`` hold the same buffers (exactly by default; NaN equals NaN).

    Args:
        private: also compare private buffers.
        names: only these buffers.
        compare: a custom comparison ``compare(name, a, b)`` (sign-free PCA components etc.).
    """
    assert set(a.buffers) == set(b.buffers), f"{label}: buffers {sorted(a.buffers)} vs {sorted(b.buffers)}"
    wanted = set(names) if names is not None else {n for n in a.buffers if private or not a.buffers.specs[n].private}
    for name in sorted(wanted):
        x, y = a.buffers[name], b.buffers[name]
        assert x.shape == y.shape and x.dtype == y.dtype, f"{label}: {name} {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        if compare is not None:
            compare(name, x, y)
        elif rtol == 0 and atol == 0:
            np.testing.assert_array_equal(x, y, err_msg=f"{label}: buffer {name}")
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"{label}: buffer {name}")


def specs_of(c: Consumer) -> dict[str, BufferSpec]:
    """The buffer specs a consumer declared (by name)."""
    return dict(c.buffers.specs)


__all__ = ["Buffers", "assert_buffers_equal", "checkpoint_round_trip", "event_signal", "feed", "frame_signal", "make_batches", "new_instance",
           "partition_schemes", "published", "run_merged", "run_partitions", "run_sequential", "specs_of", "subset"]
