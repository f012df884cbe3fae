"""The outputs under a 150 x 150 run: what the live page, derived documents and run files cost.

Routes the real 150 x 150 STXM image (123 channels, stats + pca consumers) through the daemon's
router in-process, side by side in one run: once with no outputs, once with the live-page feed,
derived documents (a real bluesky Publisher into a real Proxy) and run files. Then measures one
live-page refresh over the finished run, and the two ways the page can fetch a 150 x 150 map over
real HTTP (float32, JSON). Prints one JSON object per figure.

    python benchmarks/live_page.py [--side 150]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request

from event_model import compose_run

from beamlens.daemon.app import Daemon
from beamlens.daemon.config import load_config
from beamlens.daemon.documents import Document
from beamlens.daemon.sim.datasets import stxm_map
from beamlens.daemon.sim.proxy import ProxyProcess

CONSUMERS = """
http: {port: 0}
consumers:
  - {name: stats, class: stats}
  - {name: pca, class: pca, params: {n_components: 3, batch_size: 64}}
"""


def documents(side: int) -> tuple[str, list[tuple[str, dict]]]:
    data = stxm_map().region(slice(0, side), slice(0, side))
    bundle = compose_run(metadata={"plan_name": "grid_scan", "shape": [side, side], "snaking": [False, True]})
    desc = bundle.compose_descriptor(name="primary", data_keys={
        "xas_spectrum": {"source": "sim", "dtype": "array", "shape": [len(data.energy)]}})
    now = time.time()
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    docs += [("event", desc.compose_event(data={"xas_spectrum": s}, timestamps={"xas_spectrum": now}))
             for s in data.spectra.reshape(side * side, -1)]
    docs.append(("stop", bundle.compose_stop()))
    return bundle.start_doc["uid"], docs


def route(daemon: Daemon, docs: list[tuple[str, dict]]) -> float:
    """Events per second through the router, RunStart to RunStop processed."""
    t0 = time.perf_counter()
    for name, doc in docs:
        daemon.router.submit(Document(name, doc, "bench", time.time()))
    assert daemon.router.wait_idle(600)
    return (len(docs) - 3) / (time.perf_counter() - t0)


def emit(benchmark: str, figure: str, value: float, unit: str, target: str | None = None) -> None:
    print(json.dumps({"benchmark": benchmark, "figure": figure, "value": round(value, 3), "unit": unit, "target": target}))


def fetch(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        n = len(r.read())
    return time.perf_counter() - t0, n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", type=int, default=150)
    args = parser.parse_args()
    side = args.side
    with ProxyProcess() as proxy, tempfile.TemporaryDirectory() as tmp:
        bare = Daemon(load_config(text=CONSUMERS, environ={}))
        outputs = Daemon(load_config(text=CONSUMERS + f"""
outputs:
  documents: {{enabled: true, address: "{proxy.in_address}", event_interval_s: 0.5}}
  files: {{enabled: true, directory: "{tmp}"}}
""", environ={}))
        for d in (bare, outputs):
            d.start()
        try:
            _, docs = documents(side)
            rate_bare = route(bare, docs)
            uid, docs = documents(side)
            rate_outputs = route(outputs, docs)
            name = f"outputs_{side}x{side}"
            emit(name, "router events/s, no outputs", rate_bare, "events/s")
            emit(name, "router events/s, live feed + documents + files", rate_outputs, "events/s")
            emit(name, "throughput with outputs / without", rate_outputs / rate_bare, "ratio", ">= 0.85")

            outputs.feed.refresh()  # the first refresh after the run touches every buffer
            outputs.feed("event_page", outputs.store.get(uid), {})  # as the router does: mark the run touched
            t0 = time.perf_counter()
            outputs.feed.refresh()
            emit(name, "live-page refresh, all buffers of the run", 1e3 * (time.perf_counter() - t0), "ms", "<= 100")
            base = f"{outputs.http.url}/api/runs/{uid}/pca/score_1"
            for ext in ("f32", "json"):
                seconds, size = min(fetch(f"{base}.{ext}") for _ in range(5))
                emit(name, f"map fetch over HTTP ({ext})", 1e3 * seconds, "ms")
                emit(name, f"map size ({ext})", size / 1024, "KiB")
        finally:
            for d in (bare, outputs):
                d.stop()
            written = outputs.files.written if outputs.files else []
            emit(f"outputs_{side}x{side}", "run files written", len(written), "files")


if __name__ == "__main__":
    main()
