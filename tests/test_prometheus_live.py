"""A real Prometheus server (Debian's ``prometheus``, 2.42) scraping a daemon that runs the demo
(the shipped demo.yaml with run files on: steel map, a 30 x 30 corner of the real STXM image, the detector raster and
the defect movie), with the shipped alert rules loaded.

Checks, over the whole demo:

- every query of the Grafana dashboard returns data (a range query from the first to the last
  scrape of the demo; ``$instance`` as ``.*``, ``$__rate_interval`` as 4 scrape intervals);
- every metric an alert rule reads has samples, and every rule evaluated without error;
- no alert is pending or firing on the healthy demo (the thresholds in beamlens_rules.yml are
  above what the demo measures);
- consumer and frame counters exist at 0 from the first scrape (``increase()`` sees a first
  burst), and ``beamlens_source_connected`` is 1 for both frame sources during the demo.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from beamlens.daemon.cli import default_demo_config
from beamlens.daemon.config import load_config
from beamlens.daemon.sim.demo import run_demo

from helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "configs" / "prometheus" / "beamlens_rules.yml"
DASHBOARD = ROOT / "configs" / "grafana" / "dashboards" / "beamlens.json"
SCRAPE_S = 1
RATE_INTERVAL = f"{4 * SCRAPE_S}s"

pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """``prometheus`` on 127.0.0.1 with a temporary TSDB, scraping one target every second."""

    def __init__(self, tmp: Path, target: str):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not found: run `make system-deps` as root (Debian package `prometheus`)")
        shutil.copy(RULES, tmp / RULES.name)
        (tmp / "prometheus.yml").write_text(
            f"global: {{scrape_interval: {SCRAPE_S}s, evaluation_interval: {SCRAPE_S}s}}\n"
            f"rule_files: [{RULES.name}]\n"
            "scrape_configs:\n"
            f"  - job_name: beamlens\n    scrape_timeout: {SCRAPE_S}s\n"
            f"    static_configs: [{{targets: ['{target}'], labels: {{beamline: test}}}}]\n")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def target_up(self) -> bool:
        try:
            targets = self.api("targets")["activeTargets"]
        except OSError:
            return False
        return any(t["health"] == "up" for t in targets)

    def range(self, expr: str, start: float, end: float) -> list[dict]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{SCRAPE_S}s")["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def dashboard_queries() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]


def concrete(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace('"$instance"', '".*"')


@pytest.fixture(scope="module")
def demo_under_prometheus(tmp_path_factory):
    """Run the demo once under a scraping Prometheus; yield (prometheus, start, end)."""
    tmp = tmp_path_factory.mktemp("prometheus")
    config = load_config(default_demo_config())
    # run files on (into the test's folder), so that the output panel has its series too
    files = config.outputs.files.model_copy(update={"enabled": True, "directory": tmp / "runs"})
    config = config.model_copy(update={"http": config.http.model_copy(update={"port": 0}),
                                       "outputs": config.outputs.model_copy(update={"files": files})})
    state: dict = {}

    def announce(message: str) -> None:
        m = re.search(r"live page: http://([0-9.:]+)/", message)
        if m and "prom" not in state:
            state["prom"] = Prometheus(tmp, m.group(1))
            wait_for(state["prom"].target_up, timeout=60, interval=0.2)
            state["start"] = time.time()

    try:
        run_demo(config, stxm_region=(slice(0, 30), slice(0, 30)), serve=False, announce=announce)
        end = time.time()
        prom = state["prom"]
        # the last samples before the daemon stopped are in; rules evaluated on them
        wait_for(lambda: prom.range("up", end - 3, end + 2) != [], timeout=30)
        yield prom, state["start"], end
    finally:
        if "prom" in state:
            state["prom"].stop()


def test_every_dashboard_query_returns_data_during_the_demo(demo_under_prometheus):
    prom, start, end = demo_under_prometheus
    empty = [(title, expr) for title, expr in dashboard_queries() if not prom.range(concrete(expr), start, end)]
    assert not empty, f"dashboard queries with no data on a healthy demo: {empty}"


def test_rule_metrics_have_data_and_rules_evaluate(demo_under_prometheus):
    prom, start, end = demo_under_prometheus
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 10
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    names = set().union(*(re.findall(r"\b(beamlens_[a-z0-9_]+)", r["query"]) for r in rules))
    missing = [n for n in sorted(names) if not prom.range(f'{{__name__="{n}", job="beamlens"}}', start, end)]
    assert not missing, f"metrics read by alert rules but never scraped: {missing}"


def longest_stretch_s(values: list) -> float:
    """Longest run of consecutive samples (one per SCRAPE_S step) of a range-query series."""
    longest = current = 0
    previous = None
    for t, _ in values:
        current = current + 1 if previous is not None and t - previous <= SCRAPE_S + 1e-6 else 1
        longest, previous = max(longest, current), t
    return longest * SCRAPE_S


def rule_for_s() -> dict[str, float]:
    """alert name -> its ``for:`` duration (s) in the shipped rules file."""
    import yaml
    units = {"s": 1, "m": 60, "h": 3600}
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]
    return {r["alert"]: float(r["for"][:-1]) * units[r["for"][-1]] for r in rules}


def test_no_alert_fires_or_stays_pending_on_the_healthy_demo(demo_under_prometheus):
    """No alert fires, and none is pending for longer than a quarter of its rule's ``for:`` (a
    start-of-run transient, such as the unmixing's reconstruction error before its first
    converged background refit, stays far from firing). The demo here is short (a 30 x 30 STXM
    corner); the thresholds themselves come from the full demo's values, stated in
    beamlens_rules.yml."""
    prom, start, end = demo_under_prometheus
    firing = prom.range('ALERTS{alertstate="firing"}', start, end)
    assert not firing, [a["metric"] for a in firing]
    durations = rule_for_s()
    pending = {a["metric"]["alertname"]: longest_stretch_s(a["values"])
               for a in prom.range('ALERTS{alertstate="pending"}', start, end)}
    too_long = {name: s for name, s in pending.items() if s > durations[name] / 4}
    assert not too_long, (too_long, durations)


def test_counters_exist_from_the_first_scrape_and_frame_sources_report_connected(demo_under_prometheus):
    prom, start, end = demo_under_prometheus
    first = start + 2 * SCRAPE_S  # before the steel map's consumers can have failed
    for expr in ('beamlens_consumer_failures_total{consumer="unmixing"}',
                 'beamlens_consumers_quarantined_total{consumer="defects", reason="failures"}',
                 'beamlens_frames_dropped_total{source="demo_detector", reason="overflow"}'):
        (series,) = prom.range(expr, start, first)
        assert float(series["values"][0][1]) == 0.0, expr
    connected = {s["metric"]["source"]: max(float(v) for _, v in s["values"])
                 for s in prom.range("beamlens_source_connected", start, end)}
    assert connected == {"demo": 1.0, "demo_detector": 1.0, "demo_microscope": 1.0, "demo_sem": 1.0}
