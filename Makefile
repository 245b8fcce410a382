# The README's commands.  Each creates what it needs (a virtualenv in .venv)
# on a fresh machine, so `make serve` and `make test` are all there is to it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8080
# Where `make serve` listens: this machine only, unless told otherwise
# (LISTEN=8080 listens on every interface).
LISTEN ?= tcp:$(PORT):interface=127.0.0.1
# More webchat options for `make serve`, e.g. ARGS="--allowed-origin http://localhost:8000".
ARGS   ?=

.PHONY: serve test test-fast soak bench bench-quick lint format clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

## serve: run the chat on http://127.0.0.1:$(PORT)/ (Ctrl-C stops it);
##        ARGS="..." for more options, LISTEN=8080 to listen on all interfaces
serve: $(BIN)/.installed
	$(BIN)/twistd --nodaemon --pidfile= webchat --port $(LISTEN) $(ARGS)

## test: the whole suite, under pytest and under trial, plus ruff
test: $(BIN)/.installed
	$(BIN)/python -m pytest
	$(BIN)/python -m twisted.trial tests
	$(BIN)/ruff check src tests twisted benchmarks

## test-fast: the socket-free and in-process-server tests only (pytest -m "not slow"),
##            ~35 s: for after every small change; `make test` before a commit
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

## bench: the benchmarks of issues #5, #13 and #14 against naive baselines (~20 min, needs gcc);
##        BENCH_ARGS="--scenario fanout --senders 1" and so on for options.
##        benchmarks/ runs from this checkout: the wheel does not ship it.
bench: $(BIN)/.installed
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

bench-quick: $(BIN)/.installed
	$(BIN)/python -m benchmarks --quick $(BENCH_ARGS)

## soak: 60 s of chat, a never-reading client and connection churn; RSS before/after
soak: $(BIN)/.installed
	$(BIN)/python -m benchmarks.soak --duration 60 --out bench-results/soak.json

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests twisted benchmarks
	$(BIN)/ruff format --check src tests twisted benchmarks

format: $(BIN)/.installed
	$(BIN)/ruff format src tests twisted benchmarks

clean:
	rm -rf $(VENV) _trial_temp* tests.test_*/ twisted/plugins/dropin.cache
