# beamlens: the quick start is `make demo` and `make test` on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-under-load venv bench bench-openvino clean system-deps lock image

# System packages the tests use: promtool and the server (Debian `prometheus`), headless Chromium for the
# live page, buildah and mmdebstrap to build and run the container image. `make system-deps` installs the missing ones when run as root (CI, fresh machines) and
# otherwise prints the apt-get line to run.
SYSTEM_TOOLS := promtool:prometheus chromium:chromium buildah:buildah mmdebstrap:mmdebstrap

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# setuptools always tells an editable install with a package-dir mapping that it used a
	@# meta-path finder ("Editable installation."): information, not a problem; the wheel build
	@# itself is warning-free (tests/test_packaging.py).
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet -e '.[test]'
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

## Build the container image with Debian's buildah (no Docker engine or registry needed): the base is
## a Debian bookworm root made with mmdebstrap, imported once as $(BASE_IMAGE).
IMAGE      ?= localhost/beamlens:latest
BASE_IMAGE ?= localhost/beamlens-base:bookworm
BASE_TAR   ?= build/base-bookworm.tar
# The host's CA bundle, mounted for pip during the build only (TLS-intercepting proxies); empty: none.
HOST_CA    ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
image:
	@mkdir -p build
	@if ! buildah inspect --type image $(BASE_IMAGE) >/dev/null 2>&1; then \
		[ -s $(BASE_TAR) ] || mmdebstrap --variant=minbase --include=python3,python3-venv,python-is-python3 bookworm $(BASE_TAR); \
		ctr=$$(buildah from scratch) && buildah add $$ctr $(BASE_TAR) / && buildah commit --rm $$ctr $(BASE_IMAGE); \
	fi
	buildah bud --isolation=chroot --layers --format docker --build-arg BASE=$(BASE_IMAGE) \
		$(if $(HOST_CA),-v $(HOST_CA):/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt) -t $(IMAGE) .

## Run the test suite: the import layering contracts (import-linter, [tool.importlinter] in
## pyproject.toml), then pytest.
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

## Run the test suite three times in a row with every core kept busy by CPU hogs (tests/under_load.py).
test-under-load: $(STAMP)
	$(BIN)/python tests/under_load.py --runs 3

## Run the benchmarks (JSON lines on stdout).
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

## The defects benchmark with onnxruntime's OpenVINO execution provider beside the CPU one, in a
## venv of its own ($(OV_VENV)): the onnxruntime-openvino wheel (the `openvino` extra) replaces the
## onnxruntime module, so onnxruntime itself is removed there first. Not needed by the tests.
OV_VENV  ?= .venv-openvino
OV_STAMP := $(OV_VENV)/.installed
$(OV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(OV_VENV)
	$(OV_VENV)/bin/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(OV_VENV)/bin/python -m pip install --quiet -e .
	$(OV_VENV)/bin/python -m pip uninstall --quiet -y onnxruntime
	$(OV_VENV)/bin/python -m pip install --quiet 'onnxruntime-openvino>=1.18,<2'
	touch $(OV_STAMP)

bench-openvino: $(OV_STAMP)
	$(OV_VENV)/bin/python benchmarks/defects.py

## Re-pin the container image's dependencies (hashes) after changing pyproject.toml.
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
		-o requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) $(OV_VENV) build *.egg-info .pytest_cache test-artifacts
