# Every target sets up what it needs: a fresh clone only needs python3 (>= 3.11) and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= examples/topology.yaml

.PHONY: lab serve test lint typecheck unit install envoy-configs bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml setup.py $(wildcard protos/healthplane/v1/*.proto) | $(BIN)/activate
	$(BIN)/pip install --quiet -e '.[dev,lab]'
	touch $@

install: $(VENV)/.installed

## lab: the demo lab with real processes: front Envoy :10000, 3 backends behind sidecars, healthplane
lab: install
	$(BIN)/healthplane lab

## serve: run the control plane on the example topology (xDS :18000, admin :19000)
serve: install
	$(BIN)/healthplane serve --config $(CONFIG)

## test: lint, type-check and run every test (real Envoy, real sockets)
test: install lint typecheck
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -m "not envoy"

## envoy-configs: regenerate the lab's Envoy bootstraps with `healthplane bootstrap`
# Each file's first line is the command that made it.
envoy-configs: install
	for f in envoy-configs/*.yaml; do \
		cmd=$$(head -n 1 $$f | sed 's/^# //'); \
		{ echo "# $$cmd"; $(BIN)/$$cmd; } > $$f.tmp && mv $$f.tmp $$f; \
	done

bench: install
	$(BIN)/python bench/fanout.py --nodes 100 1000 5000

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
