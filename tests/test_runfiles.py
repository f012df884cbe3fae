"""Run files: NeXus-style HDF5 written atomically at RunStop and at shutdown; a writer killed with
SIGKILL mid-write leaves nothing under the final name.

Runs are composed with event_model's ``compose_run`` and handed to the daemon's router directly
(no network needed to test files): a 2-D grid scan with motor units in the descriptor and an
energy axis in the detector's configuration, as bluesky's ``grid_scan`` writes them.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from event_model import compose_run

from beamlens.consumers.base import Batch, BufferSpec, Consumer, NotApplicable, SignalInfo
from beamlens.daemon import __version__
from beamlens.daemon.documents import Document
from beamlens.daemon.sinks.runfiles import remove_stale_partials

from helpers import scrape, wait_for

NY, NX, NE = 4, 5, 30
ENERGY = np.linspace(7100.0, 7160.0, NE)


class ChecksumConsumer(Consumer):
    """A consumer with a model file: publishes the SHA-256 of its (here, synthetic) weights and
    the per-point dot product of each spectrum with them."""

    name = "checksum"
    WEIGHTS = np.linspace(0.0, 1.0, NE)
    model_sha256 = hashlib.sha256(WEIGHTS.tobytes()).hexdigest()

    def signal(self, info: SignalInfo) -> list[BufferSpec]:
        if info.name != "det_spectrum":
            raise NotApplicable("takes det_spectrum only")
        return [BufferSpec("projection", "nav", units="OD", description="spectrum . weights")]

    def process(self, batch: Batch, staged: Any = None) -> None:
        self.buffers.projection[batch.nav_index] = batch.data @ self.WEIGHTS


def config_yaml(directory: Path) -> str:
    return f"""
consumers:
  - {{name: stats, class: stats, params: {{units: OD}}}}
  - {{name: pca, class: pca, params: {{n_components: 2, batch_size: 8}}}}
  - {{name: checksum, class: "test_runfiles:ChecksumConsumer"}}
outputs:
  files: {{enabled: true, directory: "{directory}"}}
"""


def grid_run(spectra: np.ndarray, *, stop: bool = True) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """Documents of a ``grid_scan``-like run over ``spectra`` ``(NY, NX, NE)`` (not snaked)."""
    bundle = compose_run(metadata={
        "scan_id": 7, "plan_name": "grid_scan", "shape": [NY, NX], "snaking": [False, False],
        "motors": ["stage_y", "stage_x"], "plan_pattern": "outer_product",
        "plan_pattern_args": {"args": ["stage_y", -1.0, 1.0, NY, "stage_x", 0.0, 2.0, NX]}})
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={"det_spectrum": {"source": "sim", "dtype": "array", "shape": [NE], "units": "OD"},
                   "stage_y": {"source": "sim", "dtype": "number", "shape": [], "units": "mm"},
                   "stage_x": {"source": "sim", "dtype": "number", "shape": [], "units": "mm"}},
        configuration={"det": {"data": {"det_energy": ENERGY}, "timestamps": {"det_energy": 0.0},
                               "data_keys": {"det_energy": {"source": "sim", "dtype": "array", "shape": [NE], "units": "eV"}}}},
        object_keys={"det": ["det_spectrum"]})
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    for i, spectrum in enumerate(spectra.reshape(NY * NX, NE)):
        y, x = divmod(i, NX)
        docs.append(("event", desc.compose_event(
            data={"det_spectrum": spectrum, "stage_y": -1.0 + y * 2.0 / (NY - 1), "stage_x": x * 2.0 / (NX - 1)},
            timestamps={"det_spectrum": 0.0, "stage_y": 0.0, "stage_x": 0.0})))
    if stop:
        docs.append(("stop", bundle.compose_stop()))
    return bundle.start_doc["uid"], docs


def submit(daemon, docs) -> None:
    for name, doc in docs:
        daemon.router.submit(Document(name, doc, "test", time.time()))
    assert daemon.router.wait_idle(30)


def spectra(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, 1.0, size=(NY, NX, NE))


def test_run_file_at_stop_has_shapes_units_and_provenance(make_daemon, tmp_path):
    daemon = make_daemon(config_yaml(tmp_path))
    data = spectra()
    uid, docs = grid_run(data)
    submit(daemon, docs)
    wait_for(lambda: len(daemon.files.written) == 1)
    (path,) = daemon.files.written
    assert path == tmp_path / f"beamlens_scan7_{uid[:8]}.nxs"
    assert not list(tmp_path.glob(".*.partial"))

    with h5py.File(path, "r") as f:
        assert f.attrs["default"] == "entry" and f.attrs["creator_version"] == __version__
        entry = f["entry"]
        assert entry.attrs["NX_class"] == "NXentry" and entry.attrs["default"] == "plot" and entry["plot"].attrs["NX_class"] == "NXdata"
        assert entry["raw_run_uid"].asstr()[()] == uid and entry["exit_status"].asstr()[()] == "success"
        assert entry["points_processed"][()] == NY * NX
        assert entry["program_name"].attrs["version"] == __version__
        config = json.loads(entry["configuration/data"].asstr()[()])
        assert config["outputs"]["files"]["directory"] == str(tmp_path)
        assert json.loads(entry["raw_run_start/data"].asstr()[()])["uid"] == uid

        total = entry["stats/total"]
        assert total.attrs["NX_class"] == "NXdata" and total.attrs["signal"] == "data"
        assert list(total.attrs["axes"]) == ["stage_y", "stage_x"]
        assert total["data"].shape == (NY, NX) and total["data"].attrs["units"] == "OD"
        np.testing.assert_allclose(total["data"][()], data.sum(axis=-1), rtol=1e-12)
        np.testing.assert_allclose(total["stage_x"][()], np.linspace(0.0, 2.0, NX))
        assert total["stage_x"].attrs["units"] == "mm" and total.attrs["stage_x_indices"] == 1

        pca = entry["pca"]
        assert pca.attrs["NX_class"] == "NXprocess"
        assert pca["program"].asstr()[()] == "beamlens.consumers.pca:PCAConsumer"
        assert json.loads(pca["parameters/data"].asstr()[()])["n_components"] == 2
        comps = pca["components"]
        assert comps["data"].shape == (2, NE) and list(comps.attrs["axes"]) == [".", "energy"]
        assert comps["energy"].attrs["units"] == "eV"
        np.testing.assert_allclose(comps["energy"][()], ENERGY)
        assert pca["explained_variance_ratio/data"].shape == (2,)
        assert "model_sha256" not in pca

        checksum = entry["checksum"]
        assert checksum["model_sha256"].asstr()[()] == ChecksumConsumer.model_sha256
        np.testing.assert_allclose(checksum["projection/data"][()], data @ ChecksumConsumer.WEIGHTS, rtol=1e-12)
    assert scrape(daemon.http.url)[("beamlens_run_files_written_total", ())] == 1


def test_open_run_is_written_as_incomplete_at_shutdown(make_daemon, tmp_path):
    daemon = make_daemon(config_yaml(tmp_path))
    uid, docs = grid_run(spectra(1), stop=False)
    submit(daemon, docs[:12])  # start, descriptor, 10 of 20 events
    assert daemon.files.written == []
    daemon.stop()
    (path,) = tmp_path.glob("*.nxs")
    with h5py.File(path, "r") as f:
        assert f["entry/exit_status"].asstr()[()] == "incomplete"
        assert f["entry/points_processed"][()] == 10
        total = f["entry/stats/total/data"][()]
        assert np.isfinite(total).sum() == 10 and total.shape == (NY, NX)


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import h5py, numpy as np
    from beamlens.consumers.base import BufferSpec
    from beamlens.daemon.results import BufferSnapshot
    from beamlens.daemon.sinks.runfiles import Axis, ConsumerResults, RunRecord, write_run_file

    # slow every dataset down, and say so, so that the test can kill this process mid-write
    create = h5py.Group.create_dataset
    def slow_create(self, *args, **kwargs):
        dset = create(self, *args, **kwargs)
        print("dataset", flush=True)
        time.sleep(0.05)
        return dset
    h5py.Group.create_dataset = slow_create

    snaps = [BufferSnapshot("run", "big", BufferSpec(f"map_{i}", "nav", units="OD"), np.random.rand(64, 64))
             for i in range(400)]
    record = RunRecord(uid="0123456789abcdef", start_doc={"scan_id": 1}, status="success", opened=0.0,
                       closed=1.0, events_done=4096,
                       nav_axes=[Axis("y", np.arange(64.0)), Axis("x", np.arange(64.0))],
                       consumers=[ConsumerResults("big", {"class": "x", "params": {}, "beamlens_version": "0"}, snaps)])
    write_run_file(record, Path(sys.argv[1]))
    print("done", flush=True)
""")


def test_writer_killed_mid_write_leaves_no_file_under_the_final_name(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(20):  # 20 datasets written, hundreds to go
            line = proc.stdout.readline()
            assert line == "dataset\n", f"writer stopped early: {line!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "beamlens_scan1_01234567.nxs").exists()
    (partial,) = tmp_path.glob(".*.partial")
    assert partial.name.startswith(f".beamlens_scan1_01234567.nxs.{proc.pid}.")
    # the next writer on this directory removes the dead writer's leftovers, and only those
    mine = tmp_path / f".other.nxs.{os.getpid()}.x.partial"
    mine.touch()
    assert remove_stale_partials(tmp_path) == [partial]
    assert mine.exists()
