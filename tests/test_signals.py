"""The daemon's one input path (daemon/signals.py): which data keys become signals and in what order,
how a page's column is stacked (wrong shapes dropped, the rest kept), frame signals, and the JSON
form checkpoints keep."""
from __future__ import annotations

import numpy as np

from beamlens.consumers.base import SeriesInfo
from beamlens.daemon.signals import event_batch, event_signals, frame_signal, signal_from_json, signal_json, stack_events

DESCRIPTOR = {
    "uid": "d", "name": "primary", "run_start": "r",
    "data_keys": {
        "motor": {"source": "m", "dtype": "number", "shape": [], "units": "mm"},
        "count": {"source": "c", "dtype": "integer", "shape": []},
        "spectrum": {"source": "s", "dtype": "array", "shape": [5], "units": "counts"},
        "image": {"source": "i", "dtype": "array", "shape": [2, 3], "external": "FILESTORE:"},
        "label": {"source": "l", "dtype": "string", "shape": []},
        "flag": {"source": "f", "dtype": "boolean", "shape": []},
        "frame": {"source": "f", "dtype": "array", "shape": [4, 4]},
        "huge": {"source": "h", "dtype": "array", "shape": [1 << 20, 1 << 20]},
    },
    "hints": {"det": {"fields": ["frame", "spectrum"]}},
}


def test_event_signals_are_hinted_first_arrays_and_numbers_only():
    sigs = event_signals(DESCRIPTOR)
    assert [s.name for s in sigs] == ["frame", "spectrum", "motor", "count"]
    by = {s.name: s for s in sigs}
    assert by["spectrum"].sig_shape == (5,) and by["spectrum"].dtype == "float64" and by["spectrum"].units == "counts"
    assert by["count"].dtype == "int64" and by["motor"].sig_shape == () and by["motor"].units == "mm"
    assert by["frame"].descriptor is DESCRIPTOR and by["frame"].data_key["shape"] == [4, 4]


def test_stacking_drops_only_the_wrong_shaped_events():
    (spectrum,) = [s for s in event_signals(DESCRIPTOR) if s.name == "spectrum"]
    values = [np.ones(5), [1, 2, 3], np.arange(5.0), "x", None, [[1] * 5]]
    data, ok = stack_events(values, 6, spectrum)
    assert ok.tolist() == [True, False, True, False, False, False]
    np.testing.assert_array_equal(data, [np.ones(5), np.arange(5.0)])
    batch, bad = event_batch(spectrum, values, np.arange(6), np.arange(1, 7), [0.5] * 6)
    assert bad == 4 and batch.nav_index.tolist() == [0, 2] and batch.seq_num.tolist() == [1, 3]
    assert batch.data.dtype == np.float64 and batch.time.tolist() == [0.5, 0.5]
    assert event_batch(spectrum, None, np.arange(2), np.arange(1, 3), None) == (None, 2)  # column missing


def test_integer_readings_stack_as_int64():
    (count,) = [s for s in event_signals(DESCRIPTOR) if s.name == "count"]
    data, ok = stack_events([3, 4, 2**40], 3, count)
    assert ok.all() and data.dtype == np.int64 and data.tolist() == [3, 4, 2**40]


def test_frame_signal_and_json_round_trip():
    series = SeriesInfo(source="det", series_id="7", sig_shape=(3, 4), dtype="uint16", n_frames=10,
                        meta={"format": "array-1.0"})
    sig = frame_signal(series)
    assert sig.name == "det" and sig.kind == "frame" and sig.dtype == "uint16" and sig.units == "counts"
    assert [a.name for a in sig.axes] == ["row", "col"] and sig.axes[1].values.tolist() == [0, 1, 2, 3]
    back = signal_from_json(signal_json(sig))
    assert back.series == series and back.sig_shape == sig.sig_shape and back.dtype == sig.dtype
    np.testing.assert_array_equal(back.axes[0].values, sig.axes[0].values)
    (spectrum,) = [s for s in event_signals(DESCRIPTOR) if s.name == "spectrum"]
    again = signal_from_json(signal_json(spectrum))
    assert again.descriptor == DESCRIPTOR and again.sig_shape == (5,) and again.series is None


def test_other_streams_offer_numeric_scalars_named_by_stream_and_round_trip():
    from beamlens.consumers.base import Consumer
    from beamlens.consumers.stats import StatsConsumer
    from beamlens.consumers.trends import TrendsConsumer
    from beamlens.daemon.runtable import wants_stream

    desc = {"name": "baseline", "data_keys": {
        "cycle": {"dtype": "integer", "shape": [], "units": "cycles", "source": "x"},
        "temp": {"dtype": "number", "shape": [], "source": "x"},
        "img": {"dtype": "array", "shape": [4, 4], "source": "x"},
        "label": {"dtype": "string", "shape": [], "source": "x"}}}
    sigs = event_signals(desc, "baseline")
    assert [(s.name, s.key, s.stream, s.dtype) for s in sigs] == [
        ("baseline/cycle", "cycle", "baseline", "int64"), ("baseline/temp", "temp", "baseline", "float64")]
    assert sigs[0].data_key["units"] == "cycles"
    assert [s.stream for s in event_signals({**desc, "name": "primary"})] == ["primary"] * 3
    back = signal_from_json(signal_json(sigs[0]))
    assert (back.name, back.stream, back.key) == ("baseline/cycle", "baseline", "cycle")
    old = signal_json(event_signals({**desc, "name": "primary"})[0])
    del old["stream"]  # a checkpoint written before streams existed
    assert signal_from_json(old).stream == "primary"
    # consumers that do not opt in are never offered other streams
    assert Consumer.streams == () and StatsConsumer.streams == ()
    assert not wants_stream(StatsConsumer.__new__(StatsConsumer), "baseline")
    assert wants_stream(StatsConsumer.__new__(StatsConsumer), "primary")
    assert wants_stream(TrendsConsumer.__new__(TrendsConsumer), "baseline")
    # hostile values in a stream page: counted as wrong_shape, the rest goes on
    batch, bad = event_batch(sigs[1], [1.5, "x", [1, 2]], np.array([0, 1, 2]), np.array([1, 2, 3]), [0.0, 0.0, 0.0])
    assert bad == 2 and batch.data.tolist() == [1.5] and batch.nav_index.tolist() == [0]
