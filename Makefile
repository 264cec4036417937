# Quick start: `make run` (main job on configs/tiny.json, CPU) and `make test` (the test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/tiny.json

.PHONY: setup run test bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# DS_BUILD_OPS=0: DeepSpeed JIT-builds its ops only when used, never at install time.
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/python -m ril_fast.train --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/bench_lora.py
	$(BIN)/python benchmarks/bench_distill.py

clean:
	rm -rf $(VENV) build *.egg-info
