"""The features consumer on simulated electrode cross-sections (daemon/sim/electrode.py): the
segmented features match the generator's ground truth; units from the pixel size; merge of
partial results equals the sequential result."""
from __future__ import annotations

import numpy as np
import pytest

from beamlens.consumers.base import Batch, Buffers, RunInfo, SeriesInfo, SignalInfo
from beamlens.consumers.features import FEATURES, LAYER, FeaturesConsumer, FeaturesParams, segment
from beamlens.daemon.sim.electrode import ElectrodeGenerator
from partitions import assert_buffers_equal, make_batches, run_partitions

CYCLES = [0, 50, 100, 200, 400, 700, 1000, 1500, 2000]


def frame_signal(shape, meta=None, name="sem"):
    series = SeriesInfo(source=name, series_id="1", sig_shape=shape, dtype="uint8", n_frames=None, meta=meta or {})
    return SignalInfo(name=name, kind="frame", sig_shape=shape, dtype="uint8", units="counts", series=series)


def run_consumer(frames, params=None, meta=None, uid="r"):
    consumer = FeaturesConsumer(params or FeaturesParams(), RunInfo(uid=uid, nav_shape=(len(frames),), start_doc={}))
    info = frame_signal(frames.shape[1:], meta)
    specs = consumer.signal(info)
    consumer.buffers = Buffers.allocate(specs, len(frames))
    n = len(frames)
    consumer.process(Batch(info, frames, np.arange(n), np.arange(1, n + 1), np.zeros(n)))
    consumer.results()
    return consumer


@pytest.fixture(scope="module")
def movie():
    gen = ElectrodeGenerator(seed=3)
    frames, truths = zip(*(gen.frame(c) for c in CYCLES))
    return gen, np.stack(frames), truths


def test_features_match_ground_truth(movie):
    gen, frames, truths = movie
    c = run_consumer(frames, meta={"pixel_size_um": gen.pixel_size_um, "cycle": 7})
    b = c.buffers
    assert b.specs["void_area"].units == "um^2" and b.specs["surface_layer_thickness"].units == "um"
    for i, t in enumerate(truths):
        assert abs(b.void_fraction[i] - t.void_fraction) <= 0.01, (t.cycle, b.void_fraction[i], t.void_fraction)
        assert abs(b.particle_count[i] - t.particle_count) <= 0.05 * t.particle_count, (t.cycle, b.particle_count[i], t.particle_count)
        assert b.mean_particle_area[i] == pytest.approx(t.mean_particle_area, rel=0.05), t.cycle
        assert b.surface_layer_thickness[i] == pytest.approx(t.surface_layer_thickness, rel=0.05), t.cycle
        assert b.void_area[i] == pytest.approx(t.void_area, rel=0.02)
    # the trends the study reads: particles shrink and crack, voids and the layer grow
    assert b.mean_particle_area[-1] < 0.7 * b.mean_particle_area[0]
    assert b.particle_count[-1] > b.particle_count[0]
    assert b.surface_layer_thickness[-1] > 2 * b.surface_layer_thickness[0]
    assert b.void_fraction[-1] > b.void_fraction[0]
    np.testing.assert_array_equal(b.cycle, 7.0)  # the series header's x
    # the newest frame's segmentation and gauges
    assert b.segmentation.shape == frames.shape[1:] and (b.segmentation == LAYER).any()
    np.testing.assert_array_equal(b.latest, [b[f][-1] for f in FEATURES])
    assert b.specs["latest"].labels == FEATURES


def test_pixel_units_without_a_pixel_size_and_fixed_thresholds(movie):
    gen, frames, truths = movie
    c = run_consumer(frames[:2], FeaturesParams(thresholds=(80, 160)))
    assert c.buffers.specs["void_area"].units == "px^2"
    t = truths[0]
    assert c.buffers.mean_particle_area[0] == pytest.approx(t.mean_particle_area / gen.pixel_size_um**2, rel=0.05)


def test_flat_and_nonfinite_frames_are_skipped_and_counted():
    skipped = []
    consumer = FeaturesConsumer(FeaturesParams(), RunInfo(uid="r", nav_shape=(2,), start_doc={},
                                                           skipped=lambda r, n: skipped.append((r, n))))
    info = SignalInfo(name="img", kind="event", sig_shape=(32, 32), dtype="float64")
    consumer.buffers = Buffers.allocate(consumer.signal(info), 2)
    data = np.stack([np.full((32, 32), 5.0), np.full((32, 32), np.nan)])
    consumer.process(Batch(info, data, np.arange(2), np.arange(1, 3), np.zeros(2)))
    assert sorted(skipped) == [("flat_frame", 1), ("nonfinite", 1)]
    assert np.isnan(consumer.buffers.void_fraction).all()


def test_params_are_checked():
    with pytest.raises(ValueError, match="phase_order"):
        FeaturesParams(phase_order=("pore", "pore", "layer"))
    with pytest.raises(ValueError, match="increase"):
        FeaturesParams(thresholds=(100, 50))


def test_segmentation_order_is_configurable(movie):
    _, frames, _ = movie
    inverted = 255 - frames[0]  # a detector that shows pores bright
    p = FeaturesParams(phase_order=("particle", "layer", "pore"))
    # the same phases, up to pixels exactly at a threshold (which side they go to flips with the grey scale)
    assert (segment(inverted, p) == segment(frames[0], FeaturesParams())).mean() > 0.999


def test_partitions_merge_to_the_sequential_result(movie):
    gen, frames, _ = movie
    info = frame_signal(frames.shape[1:], {"pixel_size_um": gen.pixel_size_um})
    batches = make_batches(info, frames, batch_size=2)
    seq, merged = run_partitions(FeaturesConsumer, FeaturesParams(), [info], batches, nav_size=len(frames))
    assert np.isfinite(seq.buffers.void_fraction).all()
    for label, m in merged.items():
        assert_buffers_equal(seq, m, label=label, private=True)


def test_feature_forecast_across_runs_one_series_per_cycle(tmp_path):
    """The demo's shape: one frame series (one run) per cycle, the cycle in its header; the store
    joins them into one trend, whose forecast holds the later frames' true mean particle area."""
    gen = ElectrodeGenerator(seed=4)
    params = FeaturesParams(store=tmp_path / "trends.sqlite", forecasts=[
        {"feature": "mean_particle_area", "threshold": 0.4, "log_x": True, "refit_every": 2, "horizon": 3000}])
    cycles = [0, 50, 100, 200, 300, 400, 600, 800, 1000]
    for c in cycles:
        img, _ = gen.frame(c)
        consumer = run_consumer(img[None], params, meta={"pixel_size_um": gen.pixel_size_um, "cycle": c}, uid=f"cycle-{c}")
    b = consumer.buffers
    np.testing.assert_allclose(b.mean_particle_area_points[0, :len(cycles)], cycles)
    fx, mean, lower, upper, threshold = b.mean_particle_area_forecast
    assert (threshold == 0.4).all()
    for c in (1500, 2000):
        true = gen.frame(c)[1].mean_particle_area
        k = np.searchsorted(fx, c)
        assert lower[k] <= true <= upper[k], (c, lower[k], true, upper[k])
    assert 1000 < b.crossing[0] < 2500 and b.crossing_pessimistic[0] <= b.crossing[0]
    with pytest.raises(ValueError, match="unique"):
        FeaturesParams(forecasts=[{"feature": "void_area"}, {"feature": "void_area"}])
