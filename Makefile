# structift — every target installs what it needs into .venv (Python 3.11, pip, CPU torch).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Pinned: a looser torch request pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
export NO_MKDOCS_2_WARNING := 1

.PHONY: run demo test test-all test-deep test-seeds lint typecheck docs bench gpu-wheels clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.run-stamp: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH) -e '.[examples]'
	touch $@

$(VENV)/.test-stamp: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH) -e '.[test,docs,examples]'
	touch $@

## The main job: a CRF part-of-speech tagger trained on the Brown corpus (examples/crf_tagger.py).
run: $(VENV)/.run-stamp
	$(BIN)/python examples/crf_tagger.py

demo: $(VENV)/.run-stamp
	$(BIN)/python examples/demo.py

# MathJax renders the docs' TeX; fetched with npm (not vendored), served from the built site.
MATHJAX := docs/assets/mathjax/tex-mml-chtml.js
$(MATHJAX):
	mkdir -p .cache docs/assets
	cd .cache && npm pack --silent mathjax@3.2.2 > /dev/null
	rm -rf docs/assets/mathjax && mkdir -p .cache/mathjax
	tar -xzf .cache/mathjax-3.2.2.tgz -C .cache/mathjax
	mkdir -p docs/assets/mathjax/output/chtml/fonts
	cp .cache/mathjax/package/es5/tex-mml-chtml.js docs/assets/mathjax/
	cp -r .cache/mathjax/package/es5/output/chtml/fonts/woff-v2 docs/assets/mathjax/output/chtml/fonts/
	rm -rf .cache/mathjax

## Lint, type-check, build the docs strictly and run the test suite (what CI runs).
test: $(VENV)/.test-stamp $(MATHJAX)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mkdocs build --strict --quiet --site-dir site
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -n 2 -m "not slow"

## Everything, the slow tests included.
test-all: $(VENV)/.test-stamp
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -n 2

## Every hypothesis property at ten times its CI budget, on random examples (the dev profile;
## prints the total number of examples; tens of minutes).
test-deep: $(VENV)/.test-stamp
	HYPOTHESIS_PROFILE=dev $(BIN)/python -m pytest -n 2 -m "not slow" -q

## The default suite under five seed offsets (tests/seeding.py: STRUCTIFT_TEST_SEED).
SEEDS ?= 1 2 3 4 5
test-seeds: $(VENV)/.test-stamp
	set -e; for s in $(SEEDS); do \
	  echo "== STRUCTIFT_TEST_SEED=$$s"; \
	  STRUCTIFT_TEST_SEED=$$s HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -n 2 -m "not slow" -q; \
	done

lint: $(VENV)/.test-stamp
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: $(VENV)/.test-stamp
	$(BIN)/mypy

docs: $(VENV)/.test-stamp $(MATHJAX)
	$(BIN)/mkdocs build --strict --site-dir site

## Every benchmark at its default size, peers on the same inputs (minutes; not part of CI).
bench: $(VENV)/.test-stamp
	$(BIN)/python benchmarks/chain.py --quick
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/hvp.py
	$(BIN)/python benchmarks/qp.py
	$(BIN)/python benchmarks/unrolled_vs_ift.py
	$(BIN)/python benchmarks/variational.py
	$(BIN)/python benchmarks/attention.py

## Wheels of the peers for a lent GPU machine (Python 3.12, no index there): carry `.whl`.
gpu-wheels: $(VENV)/.test-stamp
	mkdir -p .whl
	$(BIN)/pip wheel -q --no-deps -w .whl torch-struct==0.5 pytorch-crf==0.7.2 qpth==0.0.18
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl cvxpy==1.7.5 clarabel==0.11.1 osqp==1.1.3 cffi pycparser

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .hypothesis .cache docs/assets/mathjax
