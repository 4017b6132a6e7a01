# Entry points: `make run` starts a local collector, `make test` runs every check CI runs.
# Everything slow is cached outside the checkout, keyed by version, so warm runs are fast.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tally
export CARGO_TARGET_DIR ?= $(CACHE_DIR)/target
export CARGO_TERM_COLOR ?= never
PYTHON_REQUIREMENTS := tests/python/requirements.txt
VENV := $(CACHE_DIR)/venv-$(shell sha256sum $(PYTHON_REQUIREMENTS) 2>/dev/null | cut -c1-12)
export TALLY_PYTHON := $(VENV)/bin/python
export TALLY_SIDECAR_BIN := $(CARGO_TARGET_DIR)/release/tally-sidecar
APT_PACKAGES := clang libclang-dev postgresql
CARGO_RELEASE := cargo --locked

.PHONY: help run test bench build lint unit integration e2e k8s deps apt rust python clean-data

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

run: deps build ## build and start tally-sidecar on 127.0.0.1:4196 (buffer in ./data, events on stdout)
	$(TALLY_SIDECAR_BIN) --config config/local.yaml

test: deps lint build k8s unit integration e2e ## everything CI checks: fmt, clippy, unit, integration and control-plane tests
	@echo "make test: all checks passed"

bench: deps build ## measure ingest, drain, idle RSS and start-up against this machine's ceilings
	$(CARGO_RELEASE) bench -p tally-tests --bench sidecar

build:
	$(CARGO_RELEASE) build --release --workspace --bins

lint:
	cargo fmt --all -- --check
	$(CARGO_RELEASE) clippy --release --workspace --all-targets -- -D warnings

unit: k8s ## sidecar and operator tests (the operator's include a real control plane)
	$(CARGO_RELEASE) test --release -p tally-sidecar -p tally-operator

integration: build
	$(CARGO_RELEASE) test --release -p tally-tests

e2e: k8s ## tests against a real kube-apiserver, kube-controller-manager and etcd on 127.0.0.1
	$(CARGO_RELEASE) test --release -p tally-e2e

.PHONY: crds
crds: ## regenerate crds/ from the Rust types (a test fails when they are stale)
	$(CARGO_RELEASE) run --release -p tally-operator -- crd > crds/meteringcollector.yaml

k8s: ## build kube-apiserver and kube-controller-manager from the k8s.io/kubernetes Go module (cached by version)
	e2e/k8s/build.sh

deps: apt rust python

apt: ## system packages: clang for the RocksDB bindings, PostgreSQL for the output tests (installed once)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

rust:
	@rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

python: $(VENV)/.installed

$(VENV)/.installed: $(PYTHON_REQUIREMENTS)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $(PYTHON_REQUIREMENTS)
	touch $@

clean-data: ## delete the ./data buffer of `make run`
	rm -rf data
