"""End to end: RunEngine grid_scan of the corroding-steel map -> bluesky 0MQ proxy -> daemon ->
``embedding`` and ``unmixing`` maps and spectra over HTTP, science gauges on /metrics."""
from __future__ import annotations

import json

import numpy as np

from beamlens.daemon.sim.datasets import corroding_steel_map

from helpers import http_get, scrape, source_yaml, subscribe, wait_run_finished

CONSUMERS = """
consumers:
  - {name: embedding, class: embedding, params: {min_points: 40}}
  - {name: unmixing, class: unmixing, params: {n_components: 3}}
"""


def test_both_spectral_consumers_publish_maps_of_a_run(proxy, beamline, make_daemon):
    daemon = make_daemon(source_yaml(proxy.out_address) + CONSUMERS)
    subscribe(daemon, proxy)
    data = corroding_steel_map().region(slice(0, 12), slice(0, 12))  # core to corner: all three phases
    uid = beamline.map_scan(data, snake=True)
    wait_run_finished(daemon, uid)

    url = f"{daemon.http.url}/api/runs/{uid}"
    for consumer, buffer in (("embedding", "progress"), ("embedding", "score_1"), ("unmixing", "abundance_1"),
                             ("unmixing", "residual")):
        status, body, _ = http_get(f"{url}/{consumer}/{buffer}.json")
        assert status == 200, (consumer, buffer)
        got = json.loads(body)
        assert got["shape"] == [12, 12]
        assert np.isfinite(np.array(got["data"], dtype=float)).all(), (consumer, buffer)
        status, body, ctype = http_get(f"{url}/{consumer}/{buffer}.png")
        assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"

    status, body, _ = http_get(f"{url}/unmixing/components.json")
    comps = json.loads(body)
    assert comps["shape"] == [3, 400] and comps["axis"]["units"] == "eV"
    np.testing.assert_allclose(comps["axis"]["values"], data.energy)

    # the abundance maps put metal in the core and goethite in the corner
    maps = [np.array(json.loads(http_get(f"{url}/unmixing/abundance_{j}.json")[1])["data"], dtype=float) for j in (1, 2, 3)]
    core = int(np.argmax([m[-1, -1] for m in maps]))
    corner = int(np.argmax([m[0, 0] for m in maps]))
    assert core != corner

    metrics = scrape(daemon.http.url)
    assert 0 < metrics[("beamlens_reconstruction_error_ratio", (("consumer", "unmixing"), ("index", "0")))] < 0.05
    assert ("beamlens_embedding_residual_ratio", (("consumer", "embedding"), ("index", "0"))) in metrics
