"""A bad config fails before anything starts, naming the YAML path of the bad field."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from beamlens.daemon.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent

GOOD_SOURCE = "sources:\n  bluesky:\n    - address: tcp://127.0.0.1:5578\n"


@pytest.mark.parametrize(("text", "path"), [
    ("colour: blue\n", "colour"),
    ("http:\n  port: not-a-port\n", "http.port"),
    ("http:\n  port: 70000\n", "http.port"),
    (GOOD_SOURCE + "consumers:\n  - {name: a, class: stats}\n  - {name: b, class: pca, params: {n_components: 0}}\n",
     "consumers[1].params.n_components"),
    (GOOD_SOURCE + "consumers:\n  - {name: a, class: stats, params: {data_kee: x}}\n", "consumers[0].params.data_kee"),
    ("consumers:\n  - {name: a, class: no.such.module:Thing}\n", "consumers[0].class"),
    ("consumers:\n  - {name: a, class: nonsense}\n", "consumers[0].class"),
    ("sources:\n  bluesky:\n    - address: 127.0.0.1:5578\n", "sources.bluesky[0].address"),
    ("sources:\n  bluesky:\n    - address: tcp://127.0.0.1:5578\n      serializer: pickle\n", "sources.bluesky[0]"),
    ("router:\n  max_page_size: -1\n", "router.max_page_size"),
    ("sources:\n  frames:\n    - {name: d, format: array-1.0, address: tcp://127.0.0.1:5600}\n"
     "limits:\n  memory_budget_mib: 100\n", "limits.memory_budget_mib"),
])
def test_bad_field_is_named(text, path):
    with pytest.raises(ConfigError) as info:
        load_config(text=text, environ={})
    assert path in [p for p, _ in info.value.errors], info.value.errors
    assert path in str(info.value)


def test_env_override_and_its_errors():
    config = load_config(text=GOOD_SOURCE, environ={"BEAMLENS_HTTP__PORT": "9100",
                                                    "BEAMLENS_SOURCES__BLUESKY__0__PREFIX": "raw"})
    assert config.http.port == 9100 and config.sources.bluesky[0].prefix == "raw"
    with pytest.raises(ConfigError) as info:
        load_config(text=GOOD_SOURCE, environ={"BEAMLENS_HTTP__PORT": "abc"})
    assert [p for p, _ in info.value.errors] == ["http.port"]
    with pytest.raises(ConfigError) as info:
        load_config(text=GOOD_SOURCE, environ={"BEAMLENS_SOURCES__BLUESKY__3__PREFIX": "x"})
    assert info.value.errors[0][0] == "BEAMLENS_SOURCES__BLUESKY__3__PREFIX"


def test_pickle_only_with_explicit_opt_in():
    config = load_config(text=GOOD_SOURCE.rstrip() + "\n      serializer: pickle\n      allow_pickle: true\n", environ={})
    assert config.sources.bluesky[0].allow_pickle



def test_shipped_configs_are_valid():
    for name in ("demo.yaml", "beamline.yaml"):
        load_config(ROOT / "configs" / name, environ={})


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beamlens.daemon.cli", *args], capture_output=True, text=True, timeout=60)


def test_check_config_cli(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD_SOURCE + "consumers:\n  - {name: p, class: pca, params: {batch_size: one}}\n")
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2
    assert "consumers[0].params.batch_size" in result.stderr
    result = run_cli("check-config", str(ROOT / "configs" / "beamline.yaml"))
    assert result.returncode == 0, result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("http: [unclosed\n")
    result = run_cli("check-config", str(broken))
    assert result.returncode == 2 and "not valid YAML" in result.stderr


def test_run_rejects_bad_config_before_starting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("http:\n  host: 127.0.0.1\n  prot: 8765\n")
    result = run_cli("run", "--config", str(bad))
    assert result.returncode == 2
    assert "http.prot" in result.stderr
    assert "serving" not in result.stderr


#: What the kubelet injects into every pod of the namespace for a Service named ``beamlens`` with a
#: named port ``http`` (8000/TCP): the Docker-links style variables and the service ones.
KUBERNETES_SERVICE_ENV = {
    "BEAMLENS_SERVICE_HOST": "10.96.12.34",
    "BEAMLENS_SERVICE_PORT": "8000",
    "BEAMLENS_SERVICE_PORT_HTTP": "8000",
    "BEAMLENS_PORT": "tcp://10.96.12.34:8000",
    "BEAMLENS_PORT_8000_TCP": "tcp://10.96.12.34:8000",
    "BEAMLENS_PORT_8000_TCP_PROTO": "tcp",
    "BEAMLENS_PORT_8000_TCP_PORT": "8000",
    "BEAMLENS_PORT_8000_TCP_ADDR": "10.96.12.34",
}


def test_kubernetes_service_variables_are_listed_not_applied_and_not_fatal(caplog):
    env = {**KUBERNETES_SERVICE_ENV, "BEAMLENS_HTTP__PORT": "9100", "BEAMLENS_LOG_LEVEL": "DEBUG",
           "BEAMLENS_CONSUMERS__0__PARAMS__N_COMPONENTS": "4", "BEAMLENS_HTTP__PROT": "1", "HOME": "/root"}
    text = GOOD_SOURCE + "consumers:\n  - {name: p, class: pca}\n"
    with caplog.at_level("WARNING", logger="beamlens.daemon.config"):
        config = load_config(text=text, environ=env)
    assert config.http.port == 9100 and config.log_level == "DEBUG"
    assert config.consumers[0].params == {"n_components": 4}
    assert config.ignored_environment == tuple(sorted([*KUBERNETES_SERVICE_ENV, "BEAMLENS_HTTP__PROT"]))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "BEAMLENS_PORT_8000_TCP_ADDR" in warnings[0].getMessage()
    assert "ignored_environment" not in config_schema_properties()


def config_schema_properties() -> set[str]:
    from beamlens.daemon.config import Config
    return set(Config.model_json_schema(by_alias=True)["properties"])


def test_check_config_lists_ignored_variables_and_passes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD_SOURCE)
    env = {**os.environ, **KUBERNETES_SERVICE_ENV}
    result = subprocess.run([sys.executable, "-m", "beamlens.daemon.cli", "check-config", str(good)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert "BEAMLENS_SERVICE_HOST" in result.stderr and "BEAMLENS_PORT_8000_TCP" in result.stderr
    assert result.stderr.count("BEAMLENS_SERVICE_HOST") == 1
