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
JS_LOCK := tests/js/package-lock.json
JS_DIR := $(CACHE_DIR)/js-$(shell sha256sum $(JS_LOCK) 2>/dev/null | cut -c1-12)
export TALLY_JS_MODULES := $(JS_DIR)/node_modules
export TALLY_SIDECAR_BIN := $(CARGO_TARGET_DIR)/release/tally-sidecar
export TALLY_OPERATOR_BIN := $(CARGO_TARGET_DIR)/release/tally-operator
APT_PACKAGES := clang libclang-dev postgresql runc binutils containerd containernetworking-plugins iptables conntrack
# The one version: the workspace's, in Cargo.toml. The chart's appVersion, the CRD's default image
# and the image tags follow it (tests check each).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE_REGISTRY ?= ghcr.io/tally-dev
export TALLY_IMAGES_DIR := $(CARGO_TARGET_DIR)/images
IMAGES_DIR := $(TALLY_IMAGES_DIR)
CARGO_RELEASE := cargo --locked

.PHONY: help run demo test bench build lint unit integration e2e k8s deps apt rust python js clean-data images

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

run: deps build ## build and start tally-sidecar on 127.0.0.1:4196 (buffer in ./data, events on stdout)
	$(TALLY_SIDECAR_BIN) --config config/local.yaml

demo: deps build k8s helm images ## a control plane and a real node (kwok where containers cannot run), the chart, the operator, an injected workload and a minute of events
	$(CARGO_TARGET_DIR)/release/tally-demo

test: deps lint build k8s helm promtool images unit integration e2e ## everything CI checks: fmt, clippy, unit, integration, control-plane and chart tests
	@echo "make test: all checks passed"

bench: deps build k8s ## measure the sidecar (ingest, drain, RSS, start-up) and the operator (reconcile latency, 500 collectors) against ceilings
	$(CARGO_RELEASE) bench -p tally-tests --bench sidecar
	$(CARGO_RELEASE) bench -p tally-operator --bench operator

images: deps build ## OCI image archives of tally-sidecar and tally-operator, built without Docker, reproducible
	@$(MAKE) --no-print-directory $(IMAGES_DIR)/tally-sidecar-$(VERSION).tar $(IMAGES_DIR)/tally-operator-$(VERSION).tar

# Rebuilt only when the release binary changed (cargo relinks it only then).
$(IMAGES_DIR)/%-$(VERSION).tar: $(CARGO_TARGET_DIR)/release/% images/oci_image.py
	python3 images/oci_image.py --binary $< --ref $(IMAGE_REGISTRY)/$*:$(VERSION) --out $@

.PHONY: bench-outage
bench-outage: deps build ## the data directory during a 10-minute upstream outage at 5k events/s, beside buffer.maxBytes
	$(CARGO_RELEASE) bench -p tally-tests --bench sidecar -- --outage

.PHONY: bench-keep-up
bench-keep-up: deps build ## only the keep-up runs: delivery against full-speed ingest at output batch counts 10, 100, 1000
	$(CARGO_RELEASE) bench -p tally-tests --bench sidecar -- --keep-up

.PHONY: bench-profiles
bench-profiles: deps build ## only the footprints by buffer.profile: idle, 50k events/s, draining a 1 GiB backlog
	$(CARGO_RELEASE) bench -p tally-tests --bench sidecar -- --profiles

.PHONY: bench-peers benthos
bench-peers: deps build benthos ## tally-sidecar beside its peer (the OpenMeter collector's http-server preset on core Benthos), alternating on one workload: ack rate, CPU per event, peak RSS, delivery and kill -9 loss as ratios
	$(CARGO_RELEASE) bench -p tally-tests --bench sidecar -- --peers

benthos: ## build the peer of bench-peers from the github.com/redpanda-data/benthos/v4 Go module (cached by version)
	tests/benches/peers/benthos/build.sh

# Each crate's incremental state lives in its own directory, which every compile of that crate updates and cargo
# never removes. Directories not updated for two days are mostly of builds that no longer happen (old versions of a
# crate, other feature sets) and only take disk: without this the shared target directory grew past 60 GiB. A crate
# whose state was removed compiles in full the next time it changes, once.
build:
	@if [ -d "$(CARGO_TARGET_DIR)/release/incremental" ]; then \
		find "$(CARGO_TARGET_DIR)/release/incremental" -mindepth 1 -maxdepth 1 -type d -mtime +2 -exec rm -rf {} +; fi
	@python3 hack/prune_deps.py "$(CARGO_TARGET_DIR)"
	$(CARGO_RELEASE) build --release --workspace --bins

lint:
	cargo fmt --all -- --check
	$(CARGO_RELEASE) clippy --release --workspace --all-targets -- -D warnings

unit: deps build k8s images ## sidecar and operator tests (the operator's include real control planes, the sidecar binary and the Python SDK)
	$(CARGO_RELEASE) test --release -p tally-sidecar -p tally-operator

integration: build
	$(CARGO_RELEASE) test --release -p tally-tests

e2e: deps build k8s helm promtool images ## control-plane, fake-node, real-node and chart tests (the real node runs the images of `make images`)
	$(CARGO_RELEASE) test --release -p tally-e2e

.PHONY: crds
crds: ## regenerate crds/ and the chart's copy from the Rust types (tests fail when either is stale)
	$(CARGO_RELEASE) run --release -p tally-operator -- crd > crds/meteringcollector.yaml
	cp crds/meteringcollector.yaml charts/tally/files/crds/meteringcollector.yaml

.PHONY: promtool
promtool: ## build promtool from the github.com/prometheus/prometheus Go module (cached by version), for the alert tests
	e2e/promtool/build.sh

.PHONY: helm chart
helm: ## build the Helm CLI from the helm.sh/helm/v3 Go module (cached by version)
	e2e/helm/build.sh

chart: k8s helm build ## helm lint/template charts/tally with every ci/ values file and apply it to a real control plane
	$(CARGO_RELEASE) test --release -p tally-e2e --test chart

k8s: ## build the Kubernetes components (control plane, kubelet, kube-proxy), kwok and CoreDNS from their Go modules (cached by version)
	e2e/k8s/build.sh
	e2e/kwok/build.sh
	e2e/coredns/build.sh

deps: apt rust python js

apt: ## system packages: clang for the RocksDB bindings, PostgreSQL for the output tests, runc and binutils for the images, containerd, CNI plugins, iptables and conntrack for the real node (installed once)
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

js: $(JS_DIR)/.installed

# The OpenMeter JavaScript SDK at the versions the lock file pins, for tests/tests/js_sdk.rs.
$(JS_DIR)/.installed: tests/js/package.json $(JS_LOCK)
	mkdir -p $(JS_DIR)
	cp tests/js/package.json $(JS_LOCK) $(JS_DIR)/
	cd $(JS_DIR) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

clean-data: ## delete the ./data buffer of `make run`
	rm -rf data
