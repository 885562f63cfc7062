# Two commands do all set-up on a fresh machine (README):
#   make demo   -> DLRM + VQ on MovieLens (ml-100k by default)
#   make test   -> the test suite (what CI runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

# MovieLens: $MOVIELENS_ROOT (one folder per release) if set, else a shared copy next to the
# checkout if there is one, else the example downloads into its cache (checksum-verified).
ifeq ($(origin MOVIELENS_ROOT),undefined)
  ifneq ($(wildcard ../shared/data/movielens),)
    export MOVIELENS_ROOT := $(abspath ../shared/data/movielens)
  endif
endif

.PHONY: demo test lint bench-deps clean-venv

$(STAMP): requirements/cpu.txt requirements/torchrec.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/cpu.txt
	$(BIN)/pip install -q --no-deps -r requirements/torchrec.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/dlrm_movielens.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m ruff check vq_torchrec examples tests benchmarks
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/python -m ruff check vq_torchrec examples tests benchmarks

# benchmark-only dependency (the reference quantizer we compare against)
bench-deps: $(STAMP)
	$(BIN)/pip install -q -r requirements/bench.txt
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
