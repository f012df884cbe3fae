"""CURVE towards a bluesky >= 1.15 Proxy: the right client key gets the run, a wrong one gets nothing
and the failed handshakes are counted."""
from __future__ import annotations

from beamlens.daemon.sim.beamline import SimulatedBeamline
from beamlens.daemon.sim.datasets import corroding_steel_map
from beamlens.daemon.sim.proxy import ProxyProcess
from helpers import curve_keys, scrape, subscribe, wait_for, wait_run_finished


def curve_yaml(address: str, secret: str, server_public: str) -> str:
    return f"""
sources:
  bluesky:
    - name: test
      address: {address}
      curve: {{secret_key_file: {secret}, server_public_key_file: {server_public}}}
consumers:
  - {{name: stats, class: stats}}
"""


def test_curve_client_keys(tmp_path, make_daemon):
    keys = curve_keys(tmp_path)
    server_secret, client_secret, intruder_secret = keys.server_secret, keys.client_secret, keys.stranger_secret
    server_public, allowed = keys.server_public, keys.allowed_dir

    with ProxyProcess(out_curve=(server_secret, allowed)) as proxy:
        intruder = make_daemon(curve_yaml(proxy.out_address, intruder_secret, server_public))
        good = make_daemon(curve_yaml(proxy.out_address, client_secret, server_public))
        beamline = SimulatedBeamline(proxy.in_address)
        try:
            subscribe(good, proxy)
            steel = corroding_steel_map().region(slice(0, 3), slice(0, 4))
            uid = beamline.map_scan(steel)
            wait_run_finished(good, uid)
        finally:
            beamline.close()
        assert good.store.get(uid).events_done == 12
        wait_for(lambda: scrape(intruder.http.url).get(
            ("beamlens_source_handshake_failures_total", (("reason", "auth"), ("source", "test"))), 0) >= 1)
        m = scrape(intruder.http.url)
        assert m.get(("beamlens_documents_received_total", (("source", "test"), ("type", "start"))), 0) == 0
        assert m[("beamlens_source_connected", (("source", "test"),))] == 0
        assert intruder.store.summaries() == []
