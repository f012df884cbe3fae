# beamlens: the quick start is `make demo` and `make test` on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Run the daemon on the embedded simulated beamline; serves until Ctrl-C.
demo: $(STAMP)
	$(BIN)/beamlens demo

## Run the test suite.
test: $(STAMP)
	$(BIN)/python -m pytest

## Run the benchmarks (JSON lines on stdout).
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache test-artifacts
