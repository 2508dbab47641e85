# One-command set-up and jobs. Everything installs into a virtualenv from pyproject.toml: the
# runtime and every extra the jobs and the tests use (build: the compiler and the CLI; verify;
# test). A job that only imports generated modules needs the runtime alone (`pip install mapgen`).
#
# Two supported stacks, each in its own virtualenv (see README, "Supported matrix"):
#   make test                 Python 3.11, the local CPU torch 2.13.0 wheel, megatron-core 0.16.1
#   make test STACK=current   Python 3.12, the registry's torch 2.9.1, megatron-core 0.19.2
STACK ?= default
ifeq ($(STACK),current)
PYTHON ?= $(shell ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1 || command -v python3.12)
VENV ?= .venv312
PINS ?= torch==2.9.1 megatron-core==0.19.2
else
PYTHON ?= python3
VENV ?= .venv
PINS ?= torch==2.13.0 megatron-core==0.16.1
endif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: build check test typecheck verify-standins bench clean

$(VENV)/.installed: pyproject.toml
	test -n "$(PYTHON)" || { echo "no Python interpreter for STACK=$(STACK)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(PINS)
	$(PIP) -e '.[build,verify,test]' $(PINS)
	touch $@

build: $(VENV)/.installed  ## regenerate generated/ from specs/
	$(VENV)/bin/mapgen build

check: $(VENV)/.installed  ## fail with a diff if generated/ is stale
	$(VENV)/bin/mapgen check

test: $(VENV)/.installed  ## the whole test suite
	$(PY) -m pytest -q

TARGETS := llama3_2_1b llama3_1_8b llama3_1_70b qwen2_5_7b qwen3_8b phi3_mini_4k qwen3_5_0_8b
LAYOUTS := "--tp 2 --dp 2" "--pp 2 --dp 2" "--tp 2 --pp 2" "--pp 2 --dp 2 --first-stage-layers 1" "--pp 2 --vpp 2 --dp 2"
STANDINS := .standins

# (qwen3_235b_a22b, qwen3_next_80b_a3b, kimi_k2, glm4_5 and qwen3_5_397b_a17b are not checked in:
# tests/test_distributed.py covers them)
MOE_TARGETS := mixtral_8x7b qwen3_30b_a3b deepseek_v3 moonlight_16b_a3b glm4_5_air qwen3_5_35b_a3b
MOE_LAYOUTS := "--ep 2" "--tp 2 --ep 2" "--tp 2 --ep 2 --etp 1" "--pp 2 --ep 2"

# experts with biases (gpt-oss): megatron-core builds them at expert-TP 1 only
BIASED_MOE_TARGETS := gpt_oss_20b
BIASED_MOE_LAYOUTS := "--ep 2" "--tp 2 --etp 1 --dp 2" "--tp 2 --ep 2 --etp 1" "--pp 2 --ep 2"

HYBRID_TARGETS := llama3_2_1b
HYBRID_LAYOUTS := "--tp 2 --dp 2" "--pp 2 --dp 2" "--tp 2 --pp 2"

# HybridModel with gated delta net ('G') layers and an MTP layer (Qwen3-Next): megatron-core 0.19
# (STACK=current); 0.16.1 cannot build it, and `mapgen build` skips the target there
# (not checked in: build it first, `mapgen build specs/qwen3_next.yaml specs/configs/qwen3_next_80b_a3b.json
# -o generated/qwen3_next_80b_a3b_hybrid --model hybrid`, to run these)
GDN_HYBRID_TARGETS ?=
GDN_HYBRID_LAYOUTS := "--tp 2 --dp 2" "--tp 2 --pp 2" "--pp 2 --ep 2"

# DeepSeek-V3.2's DSA layers: megatron-core 0.19 (STACK=current); 0.16.1 cannot build them, and
# `mapgen build` / `mapgen check` skip the target there
ifeq ($(STACK),current)
DSA_TARGETS ?= deepseek_v3_2
endif
DSA_LAYOUTS := "--tp 2 --dp 2" "--pp 2 --dp 2" "--ep 2" "--tp 2 --ep 2"

# Mamba-hybrid models (Nemotron-H: HybridModel / MambaModel from the config's own layer pattern)
MAMBA_TARGETS := nemotron_3_nano_30b_a3b
MAMBA_LAYOUTS := "--tp 2 --dp 2" "--pp 2 --dp 2" "--ep 2" "--tp 2 --ep 2"

# LLaVAModel: no pipeline parallelism (megatron-core keeps the vision tower on the first stage)
LLAVA_TARGETS := llava_1_5_7b
LLAVA_LAYOUTS := "--tp 2" "--dp 2"

# $(call verify_group,TARGETS,LAYOUTS): a fresh stand-in of each target's config, verified at each layout
define verify_group
	set -e; for t in $($(1)); do \
	  rm -rf $(STANDINS)/$$t; $(VENV)/bin/mapgen standin specs/configs/$$t.json $(STANDINS)/$$t; \
	  for l in $($(2)); do $(VENV)/bin/mapgen verify generated/$$t $(STANDINS)/$$t $$l; done; \
	done
endef

verify-standins: $(VENV)/.installed  ## every target's tiny stand-in through `mapgen verify` at each layout
	$(call verify_group,TARGETS,LAYOUTS)
	$(call verify_group,MOE_TARGETS,MOE_LAYOUTS)
	$(call verify_group,BIASED_MOE_TARGETS,BIASED_MOE_LAYOUTS)
	set -e; for t in $(HYBRID_TARGETS); do \
	  for l in $(HYBRID_LAYOUTS); do $(VENV)/bin/mapgen verify generated/$${t}_hybrid $(STANDINS)/$$t $$l; done; \
	done
	set -e; for t in $(GDN_HYBRID_TARGETS); do \
	  for l in $(GDN_HYBRID_LAYOUTS); do $(VENV)/bin/mapgen verify generated/$${t}_hybrid $(STANDINS)/$$t $$l; done; \
	done
	$(call verify_group,DSA_TARGETS,DSA_LAYOUTS)
	$(call verify_group,MAMBA_TARGETS,MAMBA_LAYOUTS)
	$(call verify_group,LLAVA_TARGETS,LLAVA_LAYOUTS)

bench: $(VENV)/.installed  ## mapgen vs Megatron-Bridge vs the hardware -> benchmarks/results-$(STACK).json (and *-$(STACK).json)
	bash benchmarks/bridge_setup.sh
	$(PY) benchmarks/run.py --json benchmarks/results-$(STACK).json | tee benchmarks/results-$(STACK).txt
	$(PY) benchmarks/build_figures.py --targets $(BENCH_TARGETS) --json benchmarks/build_figures-$(STACK).json
	$(PY) benchmarks/moe_memory.py --json benchmarks/moe_memory-$(STACK).json
	$(PY) benchmarks/convert_throughput.py --json benchmarks/convert_throughput-$(STACK).json
	$(PY) benchmarks/export_memory.py --json benchmarks/export_memory-$(STACK).json | tee benchmarks/export_memory-$(STACK).txt
	$(PY) benchmarks/realwidth.py --rounds 2 --profile /tmp/mapgen-realwidth/profiles --json benchmarks/realwidth-$(STACK).json
	$(PY) benchmarks/target_form.py --json benchmarks/target_form-$(STACK).json --markdown benchmarks/target_form-$(STACK).md

# build_figures: the dense targets (the MoE ones take minutes each under mypy; name them here to time them)
BENCH_TARGETS ?= llama3_2_1b,llama3_1_8b,llama3_1_70b,qwen2_5_7b,qwen3_8b,llama3_2_1b_hybrid,phi3_mini_4k

typecheck: $(VENV)/.installed
	$(PY) -m mypy --strict mapgen generated

clean:
	rm -rf .venv .venv312 .mypy_cache .pytest_cache $(STANDINS)
