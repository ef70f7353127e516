# Newcomer entry points: `make demo` (the embedded default) and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: demo test test-fast lint typecheck check bench install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	RAY_AUTH_MODE=disabled $(VENV)/bin/latent-pipeline demo --workdir demo-out

# the full suite: real Ray, a real S3 endpoint, real models (368 passed in 26 min 5 s on 2
# cores in a fresh-clone CI run on 2026-12-08; 312 took 17 min 35 s on 2026-12-02)
test: install
	RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -q

# the tests that need no Ray (under a minute): options, storage, formats, models, hostile input
test-fast: install
	RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -q -m "not ray and not slow"

lint: install
	$(VENV)/bin/ruff check pipeline tests bench jobs
	$(VENV)/bin/ruff format --check pipeline tests bench jobs

typecheck: install
	$(VENV)/bin/mypy

# what CI (.ci/run) runs after `make install`
check: lint typecheck test

bench: install
	RAY_AUTH_MODE=disabled $(PY) bench/encode.py
