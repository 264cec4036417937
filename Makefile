# Quick start: `make run` (main job on configs/tiny.json, CPU) and `make test` (the test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/tiny.json

.PHONY: setup run test test-slow mutants bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# DS_BUILD_OPS=0: DeepSpeed JIT-builds its ops only when used, never at install time.
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/python -m ril_fast.train --config $(CONFIG)

# Two workers (pytest-xdist), whole modules each, the slow modules first (tests/conftest.py): the tests
# run one torch thread each, so a 2-core machine runs two at once. TEST_WORKERS=0 runs them in-process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q tests -m "not compile_mode and not gpu_check" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Minutes-long checks outside `make test`: torch.compile of the UNet and the real dry run of the GPU
# script (`make test-slow` runs them)
test-slow: setup
	$(BIN)/python -m pytest -q tests -m "compile_mode or gpu_check"

# Planted bugs (tools/mutants.py), each run against the tests that claim the behaviour: minutes, outside
# `make test`; writes benchmarks/results/cpu/mutants.json
mutants: setup
	$(BIN)/python tools/mutants.py

bench: setup
	$(BIN)/python benchmarks/bench_peer.py

clean:
	rm -rf $(VENV) build *.egg-info
