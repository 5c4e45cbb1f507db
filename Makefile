# Two commands set up everything: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Torch is pinned on every pip command line: an unpinned resolve would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: demo test campaign bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet "$(TORCH_PIN)" -e ".[all,dev]"
	npm install --prefix $(VENV)/azurite --no-audit --no-fund --silent azurite@3
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cairn.demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The full SIGKILL campaign: 50 kills per mode (sync/async, each of single file/sharded/incremental); about 35 minutes
# on 2 cores (the two incremental modes take 6 to 9 of them).
campaign: $(STAMP)
	CAIRN_KILLS=$${CAIRN_KILLS:-50} $(PY) -m pytest -s tests/test_kill_campaign.py $(PYTEST_ARGS)

# Speed and memory of a checkpoint, against the disk, plain torch, Lightning and Composer (peers in benchmarks/.peers).
bench: $(STAMP)
	$(PY) benchmarks/checkpoint_bench.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
