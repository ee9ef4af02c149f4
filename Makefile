# Two commands do all the set-up on a fresh machine:
#   make demo   the main job (long-tailed training demo with ltcl_fused.afcl and friends)
#   make test   the whole test suite (what CI runs, with `make env` before and `make check-wheel` after)
# Both create .venv when no virtualenv is active, install torch==2.13.0 (CPU wheel) only when torch is
# missing and no NVIDIA GPU is present, then the package and its test/demo dependencies.

SHELL := /bin/bash
ENV_PY := $(shell bash scripts/env_python.sh)

.PHONY: setup env demo demo-synthetic test docs check-wheel bench
setup:
	@bash scripts/setup_env.sh

env: setup
	$(ENV_PY) -m ltcl_fused.env

demo: setup
	$(ENV_PY) -m ltcl_fused.demo

demo-synthetic: setup
	$(ENV_PY) -m ltcl_fused.demo --synthetic

test: setup
	$(ENV_PY) -m pytest tests -q -n 2 --durations=15

docs: setup
	$(ENV_PY) scripts/run_doc_blocks.py

check-wheel:
	bash scripts/check_wheel.sh

bench: setup
	$(ENV_PY) benchmarks/sweep.py
