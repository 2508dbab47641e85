# One-command set-up and jobs. Everything installs into .venv from pyproject.toml.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: build check test typecheck clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

build: $(VENV)/.installed  ## regenerate generated/ from specs/
	$(VENV)/bin/mapgen build

check: $(VENV)/.installed  ## fail with a diff if generated/ is stale
	$(VENV)/bin/mapgen check

test: $(VENV)/.installed  ## the whole test suite
	$(PY) -m pytest -q

typecheck: $(VENV)/.installed
	$(PY) -m mypy --strict mapgen generated

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache
