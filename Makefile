# One-command set-up and jobs. Everything installs into .venv from pyproject.toml.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: build check test typecheck verify-standins bench clean

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

TARGETS := llama3_2_1b llama3_1_8b llama3_1_70b qwen2_5_7b qwen3_8b
LAYOUTS := "--tp 2 --dp 2" "--pp 2 --dp 2" "--tp 2 --pp 2" "--pp 2 --dp 2 --first-stage-layers 1" "--pp 2 --vpp 2 --dp 2"
STANDINS := .standins

MOE_TARGETS := mixtral_8x7b qwen3_30b_a3b qwen3_235b_a22b deepseek_v3
MOE_LAYOUTS := "--ep 2" "--tp 2 --ep 2" "--tp 2 --ep 2 --etp 1" "--pp 2 --ep 2"

verify-standins: $(VENV)/.installed  ## every target's tiny stand-in through `mapgen verify` at each layout
	set -e; for t in $(TARGETS); do \
	  rm -rf $(STANDINS)/$$t; $(VENV)/bin/mapgen standin specs/configs/$$t.json $(STANDINS)/$$t; \
	  for l in $(LAYOUTS); do $(VENV)/bin/mapgen verify generated/$$t.py $(STANDINS)/$$t $$l; done; \
	done
	set -e; for t in $(MOE_TARGETS); do \
	  rm -rf $(STANDINS)/$$t; $(VENV)/bin/mapgen standin specs/configs/$$t.json $(STANDINS)/$$t; \
	  for l in $(MOE_LAYOUTS); do $(VENV)/bin/mapgen verify generated/$$t.py $(STANDINS)/$$t $$l; done; \
	done

bench: $(VENV)/.installed  ## mapgen vs Megatron-Bridge vs the hardware -> benchmarks/results.json
	bash benchmarks/bridge_setup.sh
	$(PY) benchmarks/run.py --json benchmarks/results.json
	$(PY) benchmarks/build_figures.py --json benchmarks/build_figures.json
	$(PY) benchmarks/moe_memory.py --json benchmarks/moe_memory.json

typecheck: $(VENV)/.installed
	$(PY) -m mypy --strict mapgen generated

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache $(STANDINS)
