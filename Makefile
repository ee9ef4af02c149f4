# Two commands do all the set-up on a fresh machine:
#   make demo   the main job (long-tailed training demo with ltcl_fused.afcl and friends)
#   make test   the whole test suite (what CI runs, with `make env` before and `make check-wheel` after)
# Both create .venv when no virtualenv is active, install torch==2.13.0 (CPU wheel) only when torch is
# missing and no NVIDIA GPU is present, then the package and its test/demo dependencies.

SHELL := /bin/bash
ENV_PY := $(shell bash scripts/env_python.sh)

# The Triton tests also run on the OLDEST supported Triton (docs/triton.md): a second virtualenv .venv-triton-old
# (torch 2.13.0 CPU, triton 3.3.1, numpy<2.4) runs the interpreter tests and the sm_80/sm_90 codegen of every
# shipped configuration (make test-triton-old; part of make test).
TRITON_OLD_PY := .venv-triton-old/bin/python
TRITON_OLD_TESTS := tests/test_triton_codegen.py tests/test_triton_ssl_codegen.py tests/test_mining_triton_codegen.py \
	tests/test_triton_support.py tests/test_triton_host.py tests/test_triton_engine.py tests/test_triton_losses.py \
	tests/test_triton_ssl.py tests/test_mining.py tests/test_triton_transcendentals.py \
	tests/test_triton_symmetric.py tests/test_triton_split.py tests/test_triton_ssl_symmetric.py

.PHONY: setup env demo demo-synthetic test test-triton-old test-isa docs check-wheel bench
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
	@$(MAKE) --no-print-directory test-triton-old
	@$(MAKE) --no-print-directory test-isa

# (float64 and the mining kernel's GPU path are gated on Triton 3.3: those tests report the gate as a skip;
# LTCL_FULL_CODEGEN=1 asks the mining codegen test for every shipped KP and dtype, each of which must raise the gate)
test-triton-old:
	@bash scripts/setup_triton_old.sh
	env -u TRITON_INTERPRET LTCL_FULL_CODEGEN=1 $(TRITON_OLD_PY) -m pytest $(TRITON_OLD_TESTS) -q -p no:xdist \
		-p no:cacheprovider -k "triton or codegen" -rs --durations=10

# the C++ engine's tests on the vector builds below this machine's (AVX2, DEFAULT; scripts/test_cpu_isa.sh)
test-isa: setup
	bash scripts/test_cpu_isa.sh $(ENV_PY)

docs: setup
	$(ENV_PY) scripts/run_doc_blocks.py

check-wheel:
	bash scripts/check_wheel.sh

bench: setup
	$(ENV_PY) benchmarks/sweep.py
