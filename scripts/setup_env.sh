#!/usr/bin/env bash
# Idempotent set-up: virtualenv (unless one is active), torch, the package (editable) and its test/demo deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/env_python.sh)
if [ -z "${VIRTUAL_ENV:-}" ] && [ ! -x "$PY" ]; then
  echo "[setup] creating virtualenv .venv"
  python3 -m venv .venv
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] torch missing, NVIDIA GPU present: pip chooses the CUDA build"
    "$PY" -m pip install -q torch
  else
    echo "[setup] torch missing, no NVIDIA GPU: installing the CPU wheel torch==2.13.0"
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
stamp=.venv-installed.stamp
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || ! "$PY" -c "import ltcl_fused, pytest, sklearn" >/dev/null 2>&1; then
  echo "[setup] installing ltcl_fused (editable) with test and demo dependencies"
  "$PY" -m pip install -q -e ".[test,demo]"
  touch "$stamp"
fi
