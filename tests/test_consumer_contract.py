"""The consumer contract on the reference consumer, ``stats``: the same run processed sequentially
and split into k partitions (k = 1, 2, 3, 7, uneven, interleaved; merged in shuffled order) gives
exactly the same maps, for event spectra, detector frames and an I0-normalised total, and the maps
equal numpy's reductions of the same data."""
from __future__ import annotations

import numpy as np
import pytest
from partitions import assert_buffers_equal, checkpoint_round_trip, event_signal, frame_signal, make_batches, run_partitions

from beamlens.consumers.base import Batch, NotApplicable, RunInfo
from beamlens.consumers.stats import StatsConsumer

N = 60


@pytest.fixture
def spectra():
    rng = np.random.default_rng(11)
    x = rng.poisson(20.0, size=(N, 64)).astype(np.float64)
    x[7, 3] = np.nan  # a non-finite point: skipped, stays NaN
    return x


def test_event_spectra_partitions_equal_sequential(spectra):
    sig = event_signal("spectrum", (64,), units="counts")
    batches = make_batches(sig, spectra, batch_size=9)
    seq, merged = run_partitions(StatsConsumer, {}, [sig], batches, N)
    ok = np.isfinite(spectra).all(axis=1)
    np.testing.assert_array_equal(seq.buffers.total[ok], spectra[ok].sum(axis=1))
    np.testing.assert_array_equal(seq.buffers.max[ok], spectra[ok].max(axis=1))
    assert np.isnan(seq.buffers.total[7])
    assert set(merged) >= {"k=1", "k=2", "k=3", "k=7", "uneven", "interleaved"}
    for label, m in merged.items():
        assert_buffers_equal(seq, m, label=label, private=True)


def test_frames_partitions_equal_sequential():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 4000, size=(N, 16, 12), dtype=np.uint16)
    sig = frame_signal("detector", (16, 12), "uint16", n_frames=N)
    order = rng.permutation(N)  # frames placed out of order (snaking, lag) make no difference
    batches = make_batches(sig, frames[order], order, batch_size=5)
    seq, merged = run_partitions(StatsConsumer, {"signal": "frame"}, [sig], batches, N)
    np.testing.assert_array_equal(seq.buffers.total, frames.reshape(N, -1).sum(axis=1, dtype=np.float64))
    np.testing.assert_array_equal(seq.buffers.max, frames.reshape(N, -1).max(axis=1))
    for label, m in merged.items():
        assert_buffers_equal(seq, m, label=label, private=True)


def test_normalised_total_merges_whatever_arrives_first(spectra):
    """The frame sum and its I0 arrive in separate batches in either order; ``total_norm`` is
    derived in ``results()`` from buffers, so partitions agree exactly."""
    rng = np.random.default_rng(5)
    i0 = rng.uniform(0.5, 2.0, size=N)
    sig = event_signal("spectrum", (64,))
    mon = event_signal("I0", ())
    batches = make_batches(mon, i0[N // 2:], np.arange(N // 2, N), 7) + make_batches(sig, spectra, batch_size=9) \
        + make_batches(mon, i0[:N // 2], np.arange(N // 2), 7)
    seq, merged = run_partitions(StatsConsumer, {"normalize_by": "I0"}, [sig, mon], batches, N)
    ok = np.isfinite(spectra).all(axis=1)
    np.testing.assert_allclose(seq.buffers.total_norm[ok], spectra[ok].sum(axis=1) / i0[ok], rtol=1e-15)
    assert seq.buffers.specs["monitor"].private
    for label, m in merged.items():
        assert_buffers_equal(seq, m, label=label, private=True)


def test_stats_takes_the_first_array_and_refuses_the_rest():
    c = StatsConsumer(StatsConsumer.Params(), RunInfo("r", (4,), {}))
    with pytest.raises(NotApplicable):
        c.signal(event_signal("motor", ()))
    assert [s.name for s in c.signal(event_signal("spectrum", (8,)))] == ["total", "max", "mean"]
    with pytest.raises(NotApplicable):
        c.signal(event_signal("other", (8,)))


def test_batch_subset_keeps_columns_together():
    sig = event_signal("x", (2,))
    b = Batch(sig, np.arange(8.0).reshape(4, 2), np.arange(4, dtype=np.int64), np.arange(1, 5), np.zeros(4))
    s = b.subset(np.array([False, True, False, True]))
    np.testing.assert_array_equal(s.nav_index, [1, 3])
    np.testing.assert_array_equal(s.data, [[2, 3], [6, 7]])


@pytest.mark.parametrize("params", [{}, {"normalize_by": "I0"}])
def test_stats_checkpoint_round_trip_equals_the_uninterrupted_run(spectra, tmp_path, params):
    """Checkpointed mid-run in the daemon's format (buffers + JSON, no pickle), restored into a
    fresh instance that gets ``signal()`` again, and carried on: exactly the uninterrupted maps."""
    rng = np.random.default_rng(8)
    sig, mon = event_signal("spectrum", (64,)), event_signal("I0", ())
    batches = make_batches(sig, spectra, batch_size=9) + make_batches(mon, rng.uniform(1, 2, N), batch_size=11)
    whole, resumed = checkpoint_round_trip(StatsConsumer, params, [sig, mon], batches, N, tmp_path / "s.ckpt", split=4)
    assert_buffers_equal(whole, resumed, private=True)


def test_restore_refuses_layouts_that_do_not_match(spectra, tmp_path):
    """A checkpoint whose buffers were declared differently (another version or params of the
    consumer) is refused as a whole, not half-loaded."""
    from beamlens.daemon.checkpoint import CheckpointError, consumer_record, restore_consumer

    sig, mon = event_signal("spectrum", (64,)), event_signal("I0", ())
    c = StatsConsumer(StatsConsumer.Params(normalize_by="I0"), RunInfo("r", (N,), {}))
    for info in (sig, mon):
        for spec in c.signal(info):
            c.buffers.bind(spec.name, spec.allocate(N), spec)
    record, arrays = consumer_record(c, [sig, mon], "s0")
    fresh = StatsConsumer(StatsConsumer.Params(), RunInfo("r", (N,), {}))  # no normalize_by now
    with pytest.raises(CheckpointError, match="refused now|differ"):
        restore_consumer(fresh, {}, record, arrays)
    bad = dict(arrays)
    bad["s0.total"] = arrays["s0.total"].astype(np.float32)
    again = StatsConsumer(StatsConsumer.Params(normalize_by="I0"), RunInfo("r", (N,), {}))
    with pytest.raises(CheckpointError, match="does not fit"):
        restore_consumer(again, {}, record, bad)
    assert not len(again.buffers)
