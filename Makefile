# shardpool: the two commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
CRD := crds/datasource.yaml
CHART_CRD := charts/shardpool/crds/datasource.yaml

.PHONY: help demo test lint unit e2e generate build helm-lint down

help:
	@echo "make demo   - start the local cluster, install shardpool and the examples, print how to query them"
	@echo "make test   - lint, unit and integration tests, generated-file checks, end-to-end suite"
	@echo "make down   - stop the local cluster"

build:
	$(CARGO) build --locked --bin shardpool

## demo: local cluster + shardpool + example sources.
demo: build
	e2e/up.sh
	e2e/install.sh

## test: everything CI runs (the generated-file check is a cargo test: tests/generated.rs).
test: lint unit helm-lint e2e

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

helm-lint:
	source e2e/lib.sh && ensure_helm && "$$HELM" lint --strict charts/shardpool

e2e: build
	e2e/run-tests.sh

down:
	e2e/down.sh
