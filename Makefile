# qbsync developer entry points. `make test` is the one command a newcomer (and CI) runs.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
comma := ,

.PHONY: test check lint typecheck unit fuzz integration qbittorrent chromium python-venv venv clean \
	rsync demo image-test test-stress stress-ng test-qb5 bench bench-wire bench-throughput \
	bench-lag bench-wan bench-scale bench-bounds

venv: $(STAMP)

$(STAMP): pyproject.toml | python-venv
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# $(call apt_need,CHECK,PACKAGES): run the shell test CHECK; when it fails, install the Debian
# PACKAGES with apt-get (as root), or say what to install and stop. One recipe for every
# system package the project needs, so a fresh machine needs nothing installed by hand.
define apt_need
@{ $(1); } >/dev/null 2>&1 || { \
  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
    echo "installing $(2) with apt-get"; \
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
  else \
    echo "$(2): missing; install (Debian/Ubuntu: sudo apt-get install $(2)) and re-run make" >&2; \
    exit 1; \
  fi; }
endef

# Integration tests run the real qbittorrent-nox; tests/test_systemd_units.py runs
# systemd-analyze verify on deploy/*.service.
qbittorrent:
	$(call apt_need,command -v qbittorrent-nox && command -v systemd-analyze,qbittorrent-nox systemd)
	@qbittorrent-nox --version
	@systemd-analyze --version | head -1

# A fresh Debian has python3 but not always its venv module (package python3-venv).
python-venv:
	$(call apt_need,$(PY) -c 'import ensurepip$(comma) venv',python3-venv)

# The first thing to run: a sample torrent synced between throwaway qBittorrents on 127.0.0.1.
demo: venv qbittorrent
	$(BIN)/qbsync demo $(DEMO_ARGS)

# The benchmarks compare against an rsync daemon on 127.0.0.1.
rsync:
	$(call apt_need,command -v rsync,rsync)

# The status page's browser test drives Debian's chromium, headless.
chromium:
	$(call apt_need,command -v chromium,chromium)

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q tests --ignore=tests/integration --ignore=tests/fuzz

fuzz: venv
	HYPOTHESIS_PROFILE=ci $(BIN)/pytest -q tests/fuzz

# The inner loop, under 90 s on a 2-core machine: lint, types, every unit test and a quick
# pass (HYPOTHESIS_PROFILE=quick) of every property test, on two pytest-xdist workers. No
# integration test and no real qBittorrent: `make test` runs everything.
check: lint typecheck
	HYPOTHESIS_PROFILE=quick $(BIN)/pytest -q -n 2 tests --ignore=tests/integration

# The integration tests on two pytest-xdist workers. They share nothing: each test has its own
# temporary directory, its own qbittorrent-nox and qbsync processes, stopped by PID, and ports
# from free_port (qbsync.qbittorrent.instance) in the worker's own slot of a block below the
# kernel's ephemeral range (tests/conftest.py), so two workers are never given the same port.
INTEGRATION = $(BIN)/pytest -q -n 2 tests/integration

integration: venv qbittorrent chromium
	$(INTEGRATION)

# Unit and property tests, then the integration tests, each on two workers.
test: venv qbittorrent chromium lint typecheck
	HYPOTHESIS_PROFILE=ci $(BIN)/pytest -q -n 2 tests --ignore=tests/integration
	$(INTEGRATION) --durations=15

# stress-ng keeps every core busy for test-stress (a Debian package).
stress-ng:
	$(call apt_need,command -v stress-ng,stress-ng)

# The integration tests with every core busy, three runs in a row: a suite that passes only on
# an idle machine is flaky. stress-ng is started here and stopped by its PID when the runs end.
STRESS_RUNS ?= 3
test-stress: venv qbittorrent chromium stress-ng
	@stress-ng --cpu "$$(nproc)" --timeout 0 --quiet & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid 2>/dev/null' EXIT; \
	for i in $$(seq 1 $(STRESS_RUNS)); do \
	  start=$$(date +%s); \
	  $(INTEGRATION) || { echo "test-stress: run $$i FAILED"; exit 1; }; \
	  echo "test-stress: run $$i of $(STRESS_RUNS) passed in $$(( $$(date +%s) - start )) s under stress-ng --cpu $$(nproc)"; \
	done

# Named integration tests against Debian 13's real qbittorrent-nox 5.1, in a cached debootstrap
# root (root; see .ci/test-qb5). Prints SKIPPED and succeeds where that cannot work.
test-qb5: venv
	.ci/test-qb5

# Build the container image on a local Debian base and smoke-test it (root; see .ci/image-test).
image-test: venv
	.ci/image-test

# End-to-end benchmarks: real qbittorrent-nox (and rsync) on 127.0.0.1; each ends in one
# `RESULT key=value ...` line. BENCH_ARGS passes flags (e.g. BENCH_ARGS="--size-mib 1024").
bench: bench-wire bench-throughput bench-lag bench-wan bench-scale bench-bounds

bench-wire: venv
	$(BIN)/python bench/wire_throughput.py $(BENCH_ARGS)

bench-throughput: venv qbittorrent rsync
	$(BIN)/python -m bench.throughput $(BENCH_ARGS)

bench-lag: venv qbittorrent
	$(BIN)/python -m bench.lag $(BENCH_ARGS)

bench-wan: venv qbittorrent rsync
	$(BIN)/python -m bench.wan $(BENCH_ARGS)

bench-scale: venv qbittorrent
	$(BIN)/python -m bench.scale $(BENCH_ARGS)

# The 32 MiB codec bomb and 26 MiB .torrent files against a destination (no qBittorrent).
bench-bounds: venv
	$(BIN)/python -m bench.bounds $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
