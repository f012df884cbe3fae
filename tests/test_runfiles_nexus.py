"""Run files from real bluesky plans: motor axes in motor units, units on every numeric dataset, a
``@default`` chain that ends at an NXdata, and a file mode that follows the umask. Checked with
``nexusformat`` (NeXpy's library): ``plottable_data`` and its validator against the NeXus base classes.

The documents come from a real RunEngine with ophyd simulated motors and the simulated beamline's
spectrum detector, running ``grid_scan`` (snaking on and off), ``rel_grid_scan``, ``scan`` and
``list_scan``; they are handed to the daemon's router directly (no network needed for files).
"""
from __future__ import annotations

import dataclasses
import os
import stat
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky import plan_stubs as bps
from bluesky import plans as bp
from nexusformat.nexus import nxload
from nexusformat.nexus.validate import validate_file
from ophyd.sim import SynAxis

from beamlens.daemon.documents import Document
from beamlens.daemon.sim.datasets import stxm_map
from beamlens.daemon.sim.beamline import SpectrumDetector

from helpers import wait_for


class Motor(SynAxis):
    """A simulated motor whose readings carry units, as an EpicsMotor's do (from its EGU)."""

    def describe(self):
        out = super().describe()
        for key in out:
            out[key]["units"] = "um"
        return out


def config_yaml(directory: Path) -> str:
    return f"""
consumers:
  - {{name: stats, class: stats}}
  - {{name: pca, class: pca, params: {{n_components: 2, batch_size: 4}}}}
outputs:
  files: {{enabled: true, directory: "{directory}"}}
"""


@pytest.fixture
def run_plan(make_daemon, tmp_path):
    """Run a plan on a real RunEngine, feed its documents to a daemon, return (start doc, run file)."""
    daemon = make_daemon(config_yaml(tmp_path))
    # a 6 x 6 STXM region re-addressed to the stage range the plans move over (nearest point is read)
    data = dataclasses.replace(stxm_map().region(slice(60, 66), slice(40, 46)),
                               y=np.linspace(-1.0, 6.0, 6), x=np.linspace(-3.0, 12.0, 6))
    y = Motor(name="sample_y", egu="um")
    x = Motor(name="sample_x", egu="um")
    det = SpectrumDetector(name="xas", dataset=data, motor_y=y, motor_x=x)

    def run(plan_factory):
        docs = []
        RE = RunEngine({}, context_managers=[])
        RE.subscribe(lambda name, doc: docs.append((name, doc)))
        RE(plan_factory(det, y, x))
        before = len(daemon.files.written)
        for name, doc in docs:
            daemon.router.submit(Document(name, doc, "test", time.time()))
        assert daemon.router.wait_idle(30)
        wait_for(lambda: len(daemon.files.written) == before + 1)
        return docs[0][1], daemon.files.written[-1], docs

    return run


def motor_values(docs, motor):
    return [d["data"][motor] for n, d in docs if n == "event"]


@pytest.mark.parametrize("snake", [False, True])
def test_grid_scan_axes_are_the_motor_positions(run_plan, snake):
    start, path, docs = run_plan(lambda det, y, x: bp.grid_scan(
        [det], y, -1.0, 1.0, 3, x, 10.0, 12.0, 4, snake_axes=snake))
    assert len(start["plan_pattern_args"]["args"]) == 9  # bluesky's snake flag after the second motor
    assert list(start["snaking"]) == [False, snake]
    with h5py.File(path, "r") as f:
        total = f["entry/stats/total"]
        assert total["data"].shape == (3, 4)
        assert list(total.attrs["axes"]) == ["sample_y", "sample_x"]
        assert total.attrs["sample_y_indices"] == 0 and total.attrs["sample_x_indices"] == 1
        np.testing.assert_allclose(total["sample_y"][()], [-1.0, 0.0, 1.0])
        np.testing.assert_allclose(total["sample_x"][()], [10.0, 10 + 2 / 3, 10 + 4 / 3, 12.0])
        assert total["sample_y"].attrs["units"] == "um" and total["sample_x"].attrs["units"] == "um"
        # every map value sits at the motor position it was measured at (snaked rows unflipped)
        events = [d for n, d in docs if n == "event"]
        for e in events:
            iy = int(np.argmin(abs(total["sample_y"][()] - e["data"]["sample_y"])))
            ix = int(np.argmin(abs(total["sample_x"][()] - e["data"]["sample_x"])))
            assert total["data"][iy, ix] == pytest.approx(np.sum(e["data"]["xas_spectrum"]), rel=1e-12)


def test_rel_grid_scan_axes_are_absolute_positions(run_plan):
    def plan(det, y, x):
        yield from bps.mv(y, 5.0, x, -3.0)
        yield from bp.rel_grid_scan([det], y, -1.0, 1.0, 3, x, 0.0, 1.0, 2, snake_axes=True)
    start, path, _ = run_plan(plan)
    assert start["plan_name"] == "rel_grid_scan"
    with h5py.File(path, "r") as f:
        total = f["entry/stats/total"]
        np.testing.assert_allclose(total["sample_y"][()], [4.0, 5.0, 6.0])
        np.testing.assert_allclose(total["sample_x"][()], [-3.0, -2.0])


def test_scan_and_list_scan_have_one_axis_per_motor_on_the_one_dimension(run_plan):
    _, path, _ = run_plan(lambda det, y, x: bp.scan([det], y, 0.0, 1.0, x, 2.0, 4.0, 5))
    with h5py.File(path, "r") as f:
        total = f["entry/stats/total"]
        assert total["data"].shape == (5,) and list(total.attrs["axes"]) == ["sample_y"]
        assert total.attrs["sample_y_indices"] == 0 and total.attrs["sample_x_indices"] == 0
        np.testing.assert_allclose(total["sample_x"][()], np.linspace(2.0, 4.0, 5))
    _, path, _ = run_plan(lambda det, y, x: bp.list_scan([det], y, [0.5, 0.1, 0.9], x, [1.0, 3.0, 2.0]))
    with h5py.File(path, "r") as f:
        total = f["entry/stats/total"]
        np.testing.assert_allclose(total["sample_y"][()], [0.5, 0.1, 0.9])
        np.testing.assert_allclose(total["sample_x"][()], [1.0, 3.0, 2.0])


def test_pattern_axes_without_readings_follow_the_snake_flags():
    from beamlens.daemon.sinks.axes import scan_axes
    start = {"plan_name": "grid_scan", "motors": ["a", "b", "c"], "plan_pattern": "outer_product",
             "plan_pattern_args": {"args": ["A", 0, 1, 2, "B", 0, 2, 3, True, "C", 5, 6, 4, False]}}
    axes = scan_axes(start, (2, 3, 4), {"a": "mm"})
    assert [a.name for a in axes] == ["a", "b", "c"] and [a.dim for a in axes] == [0, 1, 2]
    np.testing.assert_allclose(axes[2].values, np.linspace(5, 6, 4))
    assert axes[0].units == "mm"
    hostile = dict(start, plan_pattern_args={"args": ["A", 0, 1, 10**12, "B", 0, 2, 3, True, "C", 5, 6, 4, False]})
    assert [a.name for a in scan_axes(hostile, (2, 3, 4), {})] == ["scan_dim_0", "scan_dim_1", "scan_dim_2"]


def numeric_datasets(f: h5py.File):
    out = []
    f.visititems(lambda name, obj: out.append(name) if isinstance(obj, h5py.Dataset)
                 and obj.dtype.kind in "iuf" else None)
    return out


def test_run_file_is_valid_nexus_with_default_plot_and_units(run_plan):
    _, path, _ = run_plan(lambda det, y, x: bp.grid_scan([det], y, -1.0, 1.0, 3, x, 10.0, 12.0, 4, snake_axes=True))
    with h5py.File(path, "r") as f:
        missing = [n for n in numeric_datasets(f) if "units" not in f[n].attrs]
        assert missing == [], f"numeric datasets without @units: {missing}"
        assert f["entry/pca/score_1/data"].attrs["units"] == "1"  # dimensionless
        assert f["entry/pca/components/energy"].attrs["units"] == "eV"
    root = nxload(str(path))
    try:
        plot = root.plottable_data  # follows / @default -> entry @default -> NXdata
        assert plot is not None and plot.nxclass == "NXdata"
        assert plot.nxsignal.nxname == "data" and plot.nxsignal.shape == (3, 4)
        assert [a.nxname for a in plot.nxaxes] == ["sample_y", "sample_x"]
    finally:
        root.nxfile.close()
    # NeXus base-class validation (nxvalidate): beamlens' own entry fields (raw_run_uid,
    # exit_status, points_processed, events_missing) are warned about as "not defined in NXentry",
    # which NeXus allows; there must be no error
    warnings, errors = validate_file(str(path))
    assert errors == 0 and warnings <= 4


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_run_file_mode_follows_the_umask(run_plan, umask):
    old = os.umask(umask)
    try:
        _, path, _ = run_plan(lambda det, y, x: bp.scan([det], y, 0.0, 1.0, 3))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
