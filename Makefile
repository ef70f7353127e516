# Newcomer entry points: `make demo` (the embedded default) and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: demo test bench install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	RAY_AUTH_MODE=disabled $(VENV)/bin/latent-pipeline demo --workdir demo-out

test: install
	RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -q

bench: install
	RAY_AUTH_MODE=disabled $(PY) bench/encode.py
