#!/usr/bin/env bash
# Idempotent set-up of .venv-triton-old: the OLDEST Triton ltcl_fused supports, for the CI pass that runs the
# Triton interpreter tests and the sm_80/sm_90 code generation there (make test-triton-old; docs/triton.md).
#   torch==2.13.0 (the CPU wheel on this machine's disk), triton==3.3.1, numpy<2.4 (the interpreter of
#   Triton <= 3.6 fails on numpy >= 2.4), pytest, and ltcl_fused itself (editable, no extras).
# Override the Triton version or the folder with TRITON_OLD_VERSION / TRITON_OLD_VENV (e.g. the 3.6.0 check).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRITON_OLD_VENV:-.venv-triton-old}
TRITON_VERSION=${TRITON_OLD_VERSION:-3.3.1}
PY="$VENV/bin/python"
want="torch==2.13.0 triton==$TRITON_VERSION numpy<2.4 pytest"
stamp="$VENV/.ltcl-installed"
if [ ! -x "$PY" ]; then
  echo "[setup-triton-old] creating $VENV"
  python3 -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ setup.py -nt "$stamp" ] \
   || ! "$PY" -c "import torch, triton, numpy, pytest, ltcl_fused" >/dev/null 2>&1; then
  echo "[setup-triton-old] installing $want and ltcl_fused (editable) into $VENV"
  # the CPU wheel of torch (no CUDA libraries); triton is pinned separately, torch's CPU wheel does not pull it
  "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q "triton==$TRITON_VERSION" "numpy<2.4" "pytest>=7"
  "$PY" -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
"$PY" -c "import torch, triton, numpy; print('[setup-triton-old] torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
