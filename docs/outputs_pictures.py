"""Draw docs/tiled_map.png and docs/epics_map.png from real outputs of a running daemon.

A daemon (``stats`` and ``pca`` on a 12 x 16 region of the real STXM map of
``daemon/sim/datasets.py``, documents composed with event_model as a RunEngine would send them)
writes into a real Tiled server (``tiled.server.SimpleTiledServer`` in a temporary directory) and
serves its PVs over PVAccess (p4p, 127.0.0.1 only). The pictures are drawn with beamlens' own
renderer (``daemon/sinks/render.py``, as ``/api/.../<buffer>.png``) from what the clients read:

- ``tiled_map.png``: ``stats/total`` read back with ``tiled.client``;
- ``epics_map.png``: ``<prefix>pca:score_1`` read with a p4p client (``p4p.client.thread.Context``)
  as an NTNDArray, reshaped from its ``dimension`` sizes (x fastest).

    python docs/outputs_pictures.py         # needs the tiled and epics extras (make venv)
"""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from beamlens.daemon.app import Daemon
from beamlens.daemon.config import load_config
from beamlens.daemon.documents import Document
from beamlens.daemon.results import BufferSnapshot
from beamlens.daemon.sim.datasets import stxm_map
from beamlens.daemon.sinks.render import render_png

DOCS = Path(__file__).resolve().parent
PREFIX = "DOCS:beamlens:"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grid_run(data) -> list[tuple[str, dict]]:
    """The documents of a 2-D grid scan over ``data`` (RunStart ``shape``, motors, energy axis)."""
    from event_model import compose_run

    ny, nx = data.spectra.shape[:2]
    bundle = compose_run(metadata={"scan_id": 1, "plan_name": "grid_scan", "shape": [ny, nx], "snaking": [False, False],
                                   "motors": ["sample_y", "sample_x"]})
    desc = bundle.compose_descriptor(name="primary", data_keys={
        "sample_y": {"source": "sim", "dtype": "number", "shape": [], "units": "um"},
        "sample_x": {"source": "sim", "dtype": "number", "shape": [], "units": "um"},
        "od": {"source": "sim", "dtype": "array", "shape": [len(data.energy)], "units": "OD"}},
        configuration={"det": {"data": {"det_energy": data.energy}, "timestamps": {"det_energy": 0.0},
                               "data_keys": {"det_energy": {"source": "sim", "dtype": "array",
                                                            "shape": [len(data.energy)], "units": "eV"}}}})
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    for iy in range(ny):
        for ix in range(nx):
            values = {"sample_y": float(data.y[iy]), "sample_x": float(data.x[ix]), "od": data.spectra[iy, ix]}
            docs.append(("event", desc.compose_event(data=values, timestamps={k: time.time() for k in values})))
    docs.append(("stop", bundle.compose_stop()))
    return docs


def node(client, *keys):
    """The Tiled node at ``client/keys...``, or None while the sink has not written it yet."""
    for key in keys:
        try:
            client = client[key]
        except KeyError:
            return None
    return client


def status_in_tiled(client, uid: str) -> str | None:
    run = node(client, "beamlens", uid)
    return None if run is None else run.metadata.get("status")


def wait(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def main() -> None:
    from p4p.client.thread import Context
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    logging.basicConfig(level=logging.WARNING)
    data = stxm_map().region(slice(60, 72), slice(40, 56))
    search_port = free_udp_port()
    with tempfile.TemporaryDirectory() as tmp, SimpleTiledServer(directory=tmp) as server:
        config = load_config(text=f"""
consumers:
  - {{name: stats, class: stats, params: {{units: OD}}}}
  - {{name: pca, class: pca, params: {{n_components: 2, batch_size: 16}}}}
outputs:
  tiled: {{enabled: true, uri: "{server.uri.split('?')[0]}", api_key: "{server.api_key}", write_interval_s: 0.05}}
  epics: {{enabled: true, prefix: "{PREFIX}", server_port: 0, search_port: {search_port}, update_interval_s: 0.2}}
""", environ={})
        config = config.model_copy(update={"http": config.http.model_copy(update={"port": 0})})
        daemon = Daemon(config)
        daemon.start()
        try:
            docs = grid_run(data)
            uid = docs[0][1]["uid"]
            for name, doc in docs:
                daemon.router.submit(Document(name, doc, "docs", time.time()))
            assert daemon.router.wait_idle(60)
            client = from_uri(server.uri)
            wait(lambda: status_in_tiled(client, uid) == "success", "the run did not finish in Tiled")
            wait(lambda: node(client, "beamlens", uid, "stats", "total") is not None
                 and node(client, "beamlens", uid, "pca", "score_1") is not None, "the maps did not reach Tiled")
            n = data.spectra.shape[0] * data.spectra.shape[1]
            wait(lambda: np.isfinite(node(client, "beamlens", uid, "stats", "total").read()).sum() == n,
                 "the stats map is not complete in Tiled")
            with urllib.request.urlopen(f"{daemon.http.url}/api/runs/{uid}", timeout=10) as reply:
                axes = json.load(reply)["axes"]  # the scan axes in motor units, as the page draws them
            total = client["beamlens"][uid]["stats"]["total"].read()
            held = daemon.store.snapshot(uid, "stats", "total")
            spec = held.spec
            np.testing.assert_allclose(total, held.data, rtol=1e-12)  # what Tiled holds is the daemon's map
            png = render_png(BufferSnapshot(uid, "stats (read back through tiled.client)", spec, np.asarray(total)), axes=axes)
            (DOCS / "tiled_map.png").write_bytes(png)

            daemon.epics.update()
            os.environ.update(EPICS_PVA_AUTO_ADDR_LIST="NO", EPICS_PVA_ADDR_LIST="127.0.0.1",
                              EPICS_PVA_BROADCAST_PORT=str(search_port))
            with Context("pva", nt=False) as ctx:
                value = ctx.get(f"{PREFIX}pca:score_1", timeout=10)
            dims = [d["size"] for d in value["dimension"]]  # NTNDArray: x (fastest) first
            image = np.asarray(value["value"], dtype=np.float64).reshape(list(reversed(dims)))
            held = daemon.store.snapshot(uid, "pca", "score_1")
            spec = held.spec
            np.testing.assert_allclose(image, held.data, rtol=1e-12)
            png = render_png(BufferSnapshot(uid, "pca (read as a PVAccess NTNDArray with p4p)", spec, image), axes=axes)
            (DOCS / "epics_map.png").write_bytes(png)
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
