# hsmkeys: `make run` starts a local HSM-backed KMS, `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export SOFTHSM2_CONF ?= $(CURDIR)/var/softhsm2.conf
CONFIG ?= hsmkeys.yaml
HOST ?= 127.0.0.1
PORT ?= 7300

.PHONY: install install-test system-deps run init test soak lint unit bench bench-check clean

# apt packages only when the tools are missing; the venv only when pyproject.toml changed.
# `make run` needs only the runtime dependencies; lint and test add the [test] extra.
system-deps:
	@if ! command -v softhsm2-util >/dev/null 2>&1 || ! command -v pkcs11-tool >/dev/null 2>&1; then \
		echo "installing softhsm2 and opensc from apt"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q softhsm2 opensc; \
	fi
	@# tests/catalog starts throwaway PostgreSQL servers (Debian keeps initdb under /usr/lib/postgresql/N/bin).
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "installing postgresql from apt"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q postgresql; \
	fi

$(STAMP): pyproject.toml | system-deps
	@echo "creating $(VENV) and installing hsmkeys with its runtime dependencies (first time: about a minute)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	@echo "installing the test and lint tools (pytest, hypothesis, boto3, mypy, ruff, ...) into $(VENV)"
	$(BIN)/python -m pip install --progress-bar off -e '.[test]'
	touch $@

install: system-deps $(STAMP)

install-test: install $(TEST_STAMP)

init: install
	$(BIN)/hsmkeys --config $(CONFIG) init --create-token

run: init
	@echo "endpoint:     http://$(HOST):$(PORT)"
	@echo "credentials:  $(CURDIR)/var/credentials  (AWS shared-credentials format, profile default)"
	@echo "try, from any directory in another shell (sh, bash, zsh):"
	@echo "  export AWS_SHARED_CREDENTIALS_FILE=$(CURDIR)/var/credentials AWS_DEFAULT_REGION=us-east-1"
	@echo "  KEY_ID=\$$(aws kms create-key --endpoint-url http://$(HOST):$(PORT) --query KeyMetadata.KeyId --output text)"
	@echo "  printf hello > /tmp/p.txt"
	@echo "  aws kms encrypt --endpoint-url http://$(HOST):$(PORT) --key-id \$$KEY_ID --plaintext fileb:///tmp/p.txt \\"
	@echo "      --query CiphertextBlob --output text | base64 -d > /tmp/c.bin"
	@echo "  aws kms decrypt --endpoint-url http://$(HOST):$(PORT) --ciphertext-blob fileb:///tmp/c.bin \\"
	@echo "      --query Plaintext --output text | base64 -d    # prints hello"
	@echo "boto3:        boto3.client('kms', endpoint_url='http://$(HOST):$(PORT)', region_name='us-east-1')  # with AWS_SHARED_CREDENTIALS_FILE set as above"
	exec $(BIN)/hsmkeys --config $(CONFIG) serve --host $(HOST) --port $(PORT)

lint: install-test
	$(BIN)/ruff check hsmkeys tests scripts
	$(BIN)/mypy --strict hsmkeys

# The suite makes its own throwaway SoftHSM2 tokens in temp dirs (never var/ or the system dir).
test: lint
	@env -u SOFTHSM2_CONF $(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# Long reliability runs (tests marked soak): 200 crash runs, 120 s of concurrency, 150 fuzz
# examples per operation. Override with HSMKEYS_CRASH_RUNS, HSMKEYS_CONCURRENCY_SECONDS,
# HSMKEYS_FUZZ_EXAMPLES.
soak: install-test
	env -u SOFTHSM2_CONF HSMKEYS_SOAK=1 $(BIN)/python -m pytest -q -s -p no:cacheprovider -m soak tests/reliability

bench: install
	$(BIN)/python -m pip install -q -e '.[dev]'
	env -u SOFTHSM2_CONF $(BIN)/python scripts/bench.py $(BENCH_ARGS)

# Exit 1 when a speed target is missed (not in CI: figures on shared machines are noisy).
bench-check: install
	$(BIN)/python -m pip install -q -e '.[dev]'
	env -u SOFTHSM2_CONF $(BIN)/python scripts/bench.py --server --check $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
