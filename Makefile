# One target per job; CI runs `make lint` and `make test` (see .ci/run).
PYTHON ?= python3
SO := python/ferroloop/_ferroloop$(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")

.PHONY: help build-dev build-prod lint format services test test-rust test-python bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build-dev: ## editable install with a debug build of the extension
	$(PYTHON) -m pip install -q -e '.[test]' --config-settings=build-args=--profile=dev

build-prod: ## install the release build (what tests and benchmarks use)
	$(PYTHON) -m pip install -q '.[test]'

lint: ## rustfmt, clippy, ruff
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: ## apply rustfmt and ruff format
	cargo fmt --all
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

services: ## install PostgreSQL and Redis (Debian packages) for tests/integration
	tests/integration/install-services.sh

test-rust: ## Rust unit tests (timers, ready queue, …)
	cargo test --quiet

test-python: ## pytest: behaviour tests on both loops, examples, CPython conformance
	$(PYTHON) -m pytest

# Under `make test` a missing PostgreSQL/Redis fails the integration tests instead of
# skipping them: CI must not go green by skipping.
test: export FERROLOOP_REQUIRE_SERVICES = 1
test: build-prod services test-rust test-python upstream-anyio ## the whole suite, from a fresh checkout

bench: ## side-by-side benchmarks in benchmarks/.venv (run.py installs the peers and ferroloop there)
	cargo build --release --manifest-path benchmarks/loadgen/Cargo.toml
	$(PYTHON) benchmarks/run.py $(BENCH_ARGS)

.PHONY: upstream upstream-anyio upstream-aiohttp
upstream: ## AnyIO's and aiohttp's own test suites, stdlib loop vs ferroloop (~40 min)
	$(PYTHON) tests/upstream/run.py $(UPSTREAM_ARGS)

upstream-anyio: ## AnyIO's test suite (asyncio backend), stdlib loop vs ferroloop (~3 min; part of `test`)
	$(PYTHON) tests/upstream/run.py --suite anyio $(UPSTREAM_ARGS)

upstream-aiohttp: ## aiohttp's test suite, stdlib loop vs ferroloop (~36 min; not in `test`)
	$(PYTHON) tests/upstream/run.py --suite aiohttp $(UPSTREAM_ARGS)
