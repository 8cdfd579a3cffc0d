# qbsync developer entry points. `make test` is the one command a newcomer (and CI) runs.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck unit fuzz integration qbittorrent chromium python-venv venv clean \
	rsync demo image-test bench bench-wire bench-throughput bench-lag bench-wan bench-scale

venv: $(STAMP)

$(STAMP): pyproject.toml | python-venv
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian packages the tests need: qbittorrent-nox (integration tests run the real binary) and
# systemd (tests/test_systemd_units.py runs systemd-analyze verify on deploy/*.service).
APT_PACKAGES := qbittorrent-nox systemd

qbittorrent:
	@command -v qbittorrent-nox >/dev/null 2>&1 && command -v systemd-analyze >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(APT_PACKAGES) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	  else \
	    echo "qbittorrent-nox or systemd-analyze is missing: install them (Debian/Ubuntu: sudo apt-get install $(APT_PACKAGES)) and re-run make test" >&2; \
	    exit 1; \
	  fi; }
	@qbittorrent-nox --version
	@systemd-analyze --version | head -1

# A fresh Debian has python3 but not always its venv module (package python3-venv).
python-venv:
	@$(PY) -c 'import ensurepip, venv' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing python3-venv with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	  else \
	    echo "python3's venv module is missing: install it (Debian/Ubuntu: sudo apt-get install python3-venv)" >&2; \
	    exit 1; \
	  fi; }

# The first thing to run: a sample torrent synced between throwaway qBittorrents on 127.0.0.1.
demo: venv qbittorrent
	$(BIN)/qbsync demo $(DEMO_ARGS)

# The benchmarks compare against an rsync daemon on 127.0.0.1.
rsync:
	@command -v rsync >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing rsync with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync >/dev/null; \
	  else \
	    echo "rsync is missing: install it (Debian/Ubuntu: sudo apt-get install rsync) and re-run" >&2; \
	    exit 1; \
	  fi; }

# The status page's browser test drives Debian's chromium, headless.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "chromium is missing: install it (Debian: sudo apt-get install chromium) and re-run make test" >&2; \
	    exit 1; \
	  fi; }

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q tests --ignore=tests/integration --ignore=tests/fuzz

fuzz: venv
	HYPOTHESIS_PROFILE=ci $(BIN)/pytest -q tests/fuzz

integration: venv qbittorrent chromium
	$(BIN)/pytest -q tests/integration

test: venv qbittorrent chromium lint typecheck
	HYPOTHESIS_PROFILE=ci $(BIN)/pytest -q --durations=15 tests

# Build the container image on a local Debian base and smoke-test it (root; see .ci/image-test).
image-test: venv
	.ci/image-test

# End-to-end benchmarks: real qbittorrent-nox (and rsync) on 127.0.0.1; each ends in one
# `RESULT key=value ...` line. BENCH_ARGS passes flags (e.g. BENCH_ARGS="--size-mib 1024").
bench: bench-wire bench-throughput bench-lag bench-wan bench-scale

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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
