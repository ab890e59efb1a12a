# hsmkeys: `make run` starts a local HSM-backed KMS, `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export SOFTHSM2_CONF ?= $(CURDIR)/var/softhsm2.conf
CONFIG ?= hsmkeys.yaml
HOST ?= 127.0.0.1
PORT ?= 7300

.PHONY: install system-deps run init test lint unit bench clean

# apt packages only when the tools are missing; the venv only when pyproject.toml changed.
system-deps:
	@if ! command -v softhsm2-util >/dev/null 2>&1 || ! command -v pkcs11-tool >/dev/null 2>&1; then \
		echo "installing softhsm2 and opensc from apt"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q softhsm2 opensc; \
	fi

$(STAMP): pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: system-deps $(STAMP)

init: install
	$(BIN)/hsmkeys --config $(CONFIG) init --create-token

run: init
	@echo "endpoint:     http://$(HOST):$(PORT)"
	@echo "credentials:  $(CURDIR)/var/credentials  (AWS shared-credentials format, profile default)"
	@echo "try:          AWS_SHARED_CREDENTIALS_FILE=var/credentials aws kms create-key --endpoint-url http://$(HOST):$(PORT) --region us-east-1"
	@echo "boto3:        boto3.client('kms', endpoint_url='http://$(HOST):$(PORT)', region_name='us-east-1')  # with AWS_SHARED_CREDENTIALS_FILE=var/credentials"
	exec $(BIN)/hsmkeys --config $(CONFIG) serve --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/ruff check hsmkeys tests scripts
	$(BIN)/mypy --strict hsmkeys

# The suite makes its own throwaway SoftHSM2 tokens in temp dirs (never var/ or the system dir).
test: lint
	@env -u SOFTHSM2_CONF $(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

bench: install
	$(BIN)/python -m pip install -q -e '.[dev]'
	env -u SOFTHSM2_CONF $(BIN)/python scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
