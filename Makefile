# Everything installs into .venv from the package registries; nothing else is needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: test demo lint bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.dev: $(VENV)/bin/activate pyproject.toml
	$(PIP) install -q -e ".[dev]"
	touch $@

$(VENV)/.experiments: $(VENV)/.dev
	$(PIP) install -q -e ".[dev,experiments]"
	touch $@

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check lorax_lite tests experiments
	$(VENV)/bin/ruff format --check lorax_lite tests experiments

test: lint
	$(PY) -m pytest tests

demo: $(VENV)/.experiments
	$(PY) -m experiments.demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
