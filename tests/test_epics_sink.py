"""The EPICS PVAccess output read by a real p4p client in another process (address lists limited
to 127.0.0.1: EPICS_PVA_AUTO_ADDR_LIST=NO, EPICS_PVA_ADDR_LIST=127.0.0.1; the server binds the
configured interface only, loopback here).

Checks: every map the HTTP API serves for the run is an NTNDArray PV with the same values (NaN
where HTTP says null), uncompressed, with dimension sizes (fastest axis first) and a timestamp of
the update; scalar figures (progress, event count, explained variance) are NTScalar PVs equal to
the HTTP API's; the server's effective interface list is the configured one.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from beamlens.daemon.sim.datasets import stxm_map

from helpers import http_get, source_yaml, subscribe, wait_run_finished

pytest.importorskip("p4p", reason="the epics extra (p4p) is in the test extra: make venv")

CLIENT = r"""
import json, math, sys
from p4p.client.thread import Context
names = sys.argv[1:]
out = {}
with Context("pva", nt=False) as ctx:  # raw Values: dimension, codec, timeStamp
    for name, v in zip(names, ctx.get(names, timeout=10)):
        row = {"id": v.getID(), "seconds": v["timeStamp.secondsPastEpoch"] + v["timeStamp.nanoseconds"] * 1e-9}
        if v.getID().startswith("epics:nt/NTNDArray"):
            row["dims"] = [d["size"] for d in v["dimension"]]
            row["codec"] = v["codec.name"]
            row["compressed"], row["uncompressed"] = v["compressedSize"], v["uncompressedSize"]
            row["attributes"] = {a["name"]: a["value"] for a in v["attribute"]}
            data = v["value"]
        else:
            data = v["value"]
        if hasattr(data, "tolist"):
            data = data.tolist()
        if isinstance(data, list):
            data = [None if isinstance(x, float) and math.isnan(x) else x for x in data]
        elif isinstance(data, float) and math.isnan(data):
            data = None
        row["value"] = data
        out[name] = row
print(json.dumps(out))
"""


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(search_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    env.update(EPICS_PVA_AUTO_ADDR_LIST="NO", EPICS_PVA_ADDR_LIST="127.0.0.1", EPICS_PVA_BROADCAST_PORT=str(search_port))
    return env


def get_pvs(names: list[str], search_port: int) -> dict[str, dict]:
    run = subprocess.run([sys.executable, "-c", CLIENT, *names], capture_output=True, text=True, timeout=120,
                         env=client_env(search_port))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def http_json(daemon, path: str):
    status, body, _ = http_get(daemon.http.url + path)
    assert status == 200, path
    return json.loads(body)


def test_maps_and_figures_as_pvs_equal_to_the_http_api(make_daemon, proxy, beamline):
    search_port = free_port(socket.SOCK_DGRAM)
    prefix = f"T{os.getpid()}:beamlens:"
    daemon = make_daemon(
        source_yaml(proxy.out_address)
        + "consumers:\n  - {name: stats, class: stats}\n  - {name: pca, class: pca, params: {n_components: 2, batch_size: 8}}\n"
        + f"outputs:\n  epics: {{enabled: true, prefix: '{prefix}', server_port: 0, search_port: {search_port},"
          " update_interval_s: 0.2}\n")
    conf = daemon.epics.conf()
    assert conf["EPICS_PVAS_INTF_ADDR_LIST"] == "127.0.0.1"
    assert conf["EPICS_PVAS_BROADCAST_PORT"] == str(search_port)
    subscribe(daemon, proxy)
    t0 = time.time()
    uid = beamline.map_scan(stxm_map().region(slice(60, 64), slice(40, 45)))
    wait_run_finished(daemon, uid)
    daemon.epics.update()  # the final values, without waiting for the next interval
    summary = http_json(daemon, f"/api/runs/{uid}")
    maps = [(c, b) for c, info in summary["consumers"].items() for b, spec in info["buffers"].items() if spec["kind"] == "nav"]
    singles = [(c, b) for c, info in summary["consumers"].items() for b, spec in info["buffers"].items() if spec["kind"] == "single"]
    assert ("stats", "total") in maps and ("pca", "score_1") in maps and ("pca", "explained_variance_ratio") in singles
    names = [f"{prefix}{c}:{b}" for c, b in maps + singles] + [f"{prefix}run:{k}" for k in ("uid", "progress", "events", "status")]
    assert set(names) <= set(daemon.epics.pv_names())
    got = get_pvs(names, search_port)

    for consumer, buffer in maps:
        pv = got[f"{prefix}{consumer}:{buffer}"]
        http = http_json(daemon, f"/api/runs/{uid}/{consumer}/{buffer}.json")
        assert pv["id"].startswith("epics:nt/NTNDArray:1.")
        assert pv["dims"] == list(reversed(http["shape"])) == [5, 4], (consumer, buffer)
        assert pv["codec"] == "" and pv["compressed"] == pv["uncompressed"] == 4 * 5 * 8
        assert pv["attributes"]["RunUID"] == uid
        expected = np.array([np.nan if x is None else x for x in np.ravel(np.array(http["data"], dtype=object))], dtype=float)
        np.testing.assert_array_equal(np.array([np.nan if x is None else x for x in pv["value"]], dtype=float), expected)
        assert t0 - 1 <= pv["seconds"] <= time.time() + 1
    for consumer, buffer in singles:
        pv = got[f"{prefix}{consumer}:{buffer}"]
        http = http_json(daemon, f"/api/runs/{uid}/{consumer}/{buffer}.json")
        assert pv["id"].startswith("epics:nt/NTScalar")
        values = pv["value"] if isinstance(pv["value"], list) else [pv["value"]]
        assert values == [x for x in np.ravel(np.array(http["data"], dtype=object))], (consumer, buffer)
    assert got[f"{prefix}run:uid"]["value"] == uid
    assert got[f"{prefix}run:status"]["value"] == summary["status"] == "success"
    assert got[f"{prefix}run:progress"]["value"] == summary["progress"] == 1.0
    assert got[f"{prefix}run:events"]["value"] == summary["events_done"] == 20
    assert got[f"{prefix}run:events"]["id"].startswith("epics:nt/NTScalar")


def test_epics_config_rejects_a_non_address_interface():
    from beamlens.daemon.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="outputs.epics.interfaces"):
        load_config(text="outputs:\n  epics: {enabled: true, interfaces: [eth0]}\n", environ={})
