"""Map placement follows bluesky's own grid_scan: checked against the motor positions in the events."""
from __future__ import annotations

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky import plans as bp
from ophyd.sim import SynAxis, SynGauss

from beamlens.daemon.placement import flat_positions, nav_shape_from_start, snaking_from_start


@pytest.mark.parametrize("snake", [False, True])
def test_positions_match_grid_scan_motor_positions(snake):
    RE = RunEngine({}, context_managers=[])
    m1, m2, m3 = (SynAxis(name=f"m{i}") for i in (1, 2, 3))
    det = SynGauss("det", m1, "m1", center=0, Imax=1, sigma=1)
    docs = []
    RE(bp.grid_scan([det], m1, 0, 2, 3, m2, 0, 3, 4, m3, 0, 1, 2, snake_axes=snake), lambda n, d: docs.append((n, d)))
    start = docs[0][1]
    shape = nav_shape_from_start(start)
    snaking = snaking_from_start(start, len(shape))
    assert shape == (3, 4, 2)
    events = [d for n, d in docs if n == "event"]
    seq = np.array([e["seq_num"] for e in events])
    flat = flat_positions(seq, shape, snaking)
    got = np.array(np.unravel_index(flat, shape)).T
    want = np.array([[round(e["data"]["m1"]), round(e["data"]["m2"]), round(e["data"]["m3"])] for e in events])
    np.testing.assert_array_equal(got, want)
    assert len(set(flat.tolist())) == 24


def test_unknown_length_and_out_of_range():
    assert nav_shape_from_start({}) == (0,)
    assert nav_shape_from_start({"num_points": 7}) == (7,)
    np.testing.assert_array_equal(flat_positions(np.array([1, 5, 0]), (0,), (False,)), [0, 4, -1])
    np.testing.assert_array_equal(flat_positions(np.array([1, 7, 8]), (7,), (False,)), [0, 6, -1])
