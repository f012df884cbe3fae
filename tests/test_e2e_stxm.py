"""End to end: RunEngine grid_scan of the real STXM data -> proxy -> daemon -> HTTP maps and /metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest

from beamlens.daemon.sim.datasets import stxm_map

from helpers import http_get, scrape, source_yaml, subscribe, wait_run_finished

CONSUMERS = """
consumers:
  - {name: stats, class: stats}
  - {name: pca, class: pca, params: {n_components: 3, batch_size: 32}}
"""


@pytest.mark.parametrize("snake", [True, False])
def test_stxm_grid_scan_end_to_end(proxy, beamline, make_daemon, snake):
    daemon = make_daemon(source_yaml(proxy.out_address) + CONSUMERS)
    subscribe(daemon, proxy)
    data = stxm_map().region(slice(60, 72), slice(40, 50))  # 12 x 10 points, Fe-rich area
    uid = beamline.map_scan(data, snake=snake)
    wait_run_finished(daemon, uid)

    metrics = scrape(daemon.http.url)
    assert metrics[("beamlens_events_processed_total", ())] == 120
    assert metrics[("beamlens_run_progress_ratio", ())] == 1.0
    assert metrics[("beamlens_documents_received_total", (("source", "test"), ("type", "event")))] == 120

    status, body, ctype = http_get(f"{daemon.http.url}/api/runs/{uid}/stats/total.json")
    assert status == 200 and ctype.startswith("application/json")
    got = json.loads(body)
    assert got["shape"] == [12, 10]
    expected = data.spectra.astype(np.float64).sum(axis=-1)  # pixel (row, col) of the image
    np.testing.assert_allclose(np.array(got["data"], dtype=float), expected, rtol=1e-12)

    status, body, ctype = http_get(f"{daemon.http.url}/api/runs/{uid}/pca/score_1.png")
    assert status == 200 and ctype == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
