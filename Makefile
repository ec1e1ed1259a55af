# Two entry points: `make serve` installs and runs the sidecar on models/default,
# `make test` installs and runs the test suite (what CI runs via .ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve test lint proto bench-server bench-dicom clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Outcomes reported to `make serve` persist in .state/outcomes.sqlite unless CXR_MONITOR_STORE is
# set (to another file, or to '' for none). The DICOM storage node listens beside gRPC on
# DICOM_PORT (`make serve DICOM_PORT=-1` turns it off).
DICOM_PORT ?= 11112

serve: install
	CXR_MONITOR_STORE="$${CXR_MONITOR_STORE-.state/outcomes.sqlite}" $(BIN)/cxr-monitor serve --dicom-port $(DICOM_PORT)

lint: install
	$(BIN)/ruff check monitor tests benchmarks models scripts
	$(BIN)/ruff format --check monitor tests benchmarks models scripts

test: install lint
	bash scripts/ensure-prometheus.sh
	bash scripts/ensure-openssl.sh
	bash scripts/ensure-dicom-tools.sh
	$(BIN)/python -m pytest -q

proto: install
	$(BIN)/python -m monitor.codegen

bench-server: install
	$(BIN)/python benchmarks/bench_server.py --append

bench-dicom: install
	bash scripts/ensure-dicom-tools.sh
	$(BIN)/python benchmarks/bench_dicom_node.py --append

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
