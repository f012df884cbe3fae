# beamlens: the quick start is `make demo` and `make test` on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-under-load venv bench clean system-deps lock

# System packages the tests use: promtool (Debian `prometheus`) and headless Chromium for the live
# page. `make system-deps` installs the missing ones when run as root (CI, fresh machines) and
# otherwise prints the apt-get line to run.
SYSTEM_TOOLS := promtool:prometheus chromium:chromium

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Run the daemon on the embedded simulated beamline; serves until Ctrl-C.
demo: $(STAMP)
	$(BIN)/beamlens demo

## Install missing system packages (as root), or say which are missing.
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		tool=$${pair%%:*}; pkg=$${pair#*:}; \
		command -v $$tool >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then echo "system packages present"; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing fonts-dejavu-core; \
	else echo "missing system packages:$$missing; run: sudo apt-get install$$missing" >&2; exit 1; fi

## Run the test suite.
test: $(STAMP)
	$(BIN)/python -m pytest

## Run the test suite three times in a row with every core kept busy by CPU hogs (tests/under_load.py).
test-under-load: $(STAMP)
	$(BIN)/python tests/under_load.py --runs 3

## Run the benchmarks (JSON lines on stdout).
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

## Re-pin the container image's dependencies (hashes) after changing pyproject.toml.
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
		-o requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache test-artifacts
