# shardpool: the two commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
CRD := crds/datasource.yaml
CHART_CRD := charts/shardpool/crds/datasource.yaml

.PHONY: help demo test lint unit e2e generate build helm-lint down fuzz bench-scale

help:
	@echo "make demo   - start the local cluster, install shardpool and the examples, print how to query them"
	@echo "make test   - lint, unit and integration tests, generated-file checks, end-to-end suite"
	@echo "make down   - stop the local cluster"
	@echo "make bench-scale - 6,000 sources x 12 connections over 8 shards (bench/scale.sh; 15-30 min, not part of test)"

build:
	$(CARGO) build --locked --bin shardpool

## bench-scale: the scale benchmark (its own cluster; stop a demo cluster first).
bench-scale:
	bench/scale.sh

## demo: local cluster + shardpool (the release build users deploy; `make
## demo DEMO_PROFILE=debug` for a debug build, after `make down`) + examples.
DEMO_PROFILE ?= release
demo:
	$(CARGO) build --locked $(if $(filter release,$(DEMO_PROFILE)),--release) --bin shardpool
	SHARDPOOL_BIN=$(CURDIR)/target/$(DEMO_PROFILE)/shardpool e2e/up.sh
	e2e/install.sh

## test: everything CI runs (the generated-file check is a cargo test: tests/generated.rs).
test: lint unit helm-lint fuzz e2e

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	@out=$$(cd e2e && gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi
	cd e2e && go vet ./...

unit:
	$(CARGO) test --locked

## generate: every generated file, from its one source.
generate:
	$(CARGO) run --locked -q --bin shardpool -- crd > $(CRD)
	cp $(CRD) $(CHART_CRD)

## fuzz: each wire-protocol fuzz target for FUZZ_SECONDS (cargo fuzz, nightly).
FUZZ_SECONDS ?= 20
CARGO_FUZZ_VERSION := 0.13.1
TOOLS := $(CURDIR)/.tools
fuzz:
	@[ -x $(TOOLS)/bin/cargo-fuzz ] && $(TOOLS)/bin/cargo-fuzz --version | grep -q " $(CARGO_FUZZ_VERSION)" \
	  || $(CARGO) install --locked --quiet --root $(TOOLS) cargo-fuzz --version $(CARGO_FUZZ_VERSION)
	cd fuzz && for t in startup messages; do \
	  mkdir -p corpus/$$t && { cp -n seeds/$$t/* corpus/$$t/ 2>/dev/null || true; }; \
	  PATH=$(TOOLS)/bin:$$PATH cargo +nightly fuzz run $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; \
	done

helm-lint:
	source e2e/lib.sh && ensure_helm && "$$HELM" lint --strict charts/shardpool

e2e: build
	e2e/run-tests.sh

down:
	e2e/down.sh
