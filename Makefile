# One command per job; each creates .venv and installs the project first.
#   make test   set up and run the test suite (what CI runs)
#   make bon    set up and run the main job: recipes/bon.py (Best-of-N, the paper's Fig. 2) on its offline default
#   make reward set up and run recipes/reward.py on its offline default
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test bon reward lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m ruff check trl_bayes recipes scripts tests
	$(PY) -m pytest -q --durations=15 tests

bon: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --mixed_precision no recipes/bon.py

reward: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --mixed_precision no recipes/reward.py

bench: setup
	$(PY) scripts/bench_posterior.py

lint: setup
	$(PY) -m ruff check trl_bayes recipes scripts tests
	$(PY) -m ruff format --check trl_bayes recipes scripts tests
