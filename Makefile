# One command per job; each creates .venv and installs the project first.
#   make test   set up and run the test suite (what CI runs)
#   make bon    set up and run the main job: recipes/bon.py (Best-of-N, the paper's Fig. 2) on its offline default;
#               one launched process that deals its independent jobs (proxies, sample blocks, scores) to one worker
#               process per usable core (--num_workers; same results as one process)
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

# Tests on every core (pytest-xdist), one torch thread per test process: the tiny models gain nothing from a second
# thread, and several processes with two threads each would oversubscribe the cores.
test: setup
	$(PY) -m ruff check trl_bayes recipes scripts tests
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --durations=30 tests

bon: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --mixed_precision no recipes/bon.py

reward: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --mixed_precision no recipes/reward.py

bench: setup
	$(PY) scripts/bench_posterior.py

lint: setup
	$(PY) -m ruff check trl_bayes recipes scripts tests
	$(PY) -m ruff format --check trl_bayes recipes scripts tests
