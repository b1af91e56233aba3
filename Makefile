# ckpt-ema: `make demo` and `make test` work on a fresh machine (they install into .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch's CPU build: pinned so that pip never pulls a multi-GB CUDA build on a CPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-slow test-all lint format bench docs clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test,fast,plot]"
	# timm for tests/test_trainers_timm.py, without torchvision (see pyproject.toml; the test stubs its import)
	$(PIP) install --quiet --no-deps "timm>=1.0.20"
	# torchtitan for tests/test_torchtitan.py, without its training-only dependencies (datasets, wandb,
	# tensorboard, torchdata): with them pip's resolver backtracked for over 16 minutes here. Its checkpoint
	# code needs only these three. pip then warns that the others are missing; that is expected.
	$(PIP) install --quiet --no-deps "torchtitan>=0.3"
	$(PIP) install --quiet "tyro>=0.9" "spmd_types==0.2.3" "dill>=0.3"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m ckpt_ema.demo

# make test: every test but those marked slow (real multi-process training, 10,000-file series, the demo);
# make test-slow: those; .ci/run runs both.
test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

test-all: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check ckpt_ema tests benchmarks
	$(VENV)/bin/ruff format --check ckpt_ema tests benchmarks
	$(PY) -m mypy

format: install
	$(VENV)/bin/ruff format ckpt_ema tests benchmarks

bench: install
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# docs/cli.md from the --help of every command (tests/test_docs.py fails when it is stale)
docs: install
	$(PY) -m ckpt_ema.cli.reference > docs/cli.md.tmp
	mv docs/cli.md.tmp docs/cli.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-out
