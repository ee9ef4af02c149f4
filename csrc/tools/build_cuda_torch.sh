#!/usr/bin/env bash
# Build and import the whole ltcl_fused extension (CPU + CUDA sources) against the CUDA build of torch
# (torch==2.14.1, CUDA 13) in a virtualenv of its own. No GPU is needed: the kernels are compiled for
# sm_80 and sm_90 and the ops are checked to be registered for the CUDA dispatch key.
#
#   bash csrc/tools/build_cuda_torch.sh            # venv in /tmp/ltcl_cuda_torch_venv (reused when present)
#   LTCL_CUDA_VENV=/path/to/venv bash csrc/tools/build_cuda_torch.sh
#
# The torch wheel is several GB; pip takes it from this machine's local wheel folders when configured.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LTCL_CUDA_VENV:-/tmp/ltcl_cuda_torch_venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${LTCL_CUDA_TORCH:-torch==2.14.1}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  "$VENV/bin/pip" install "$TORCH_SPEC" ninja numpy
fi
"$VENV/bin/pip" show ninja >/dev/null 2>&1 || "$VENV/bin/pip" install ninja

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$VENV/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
# headers of the CUDA libraries torch's CUDA headers include (cuBLAS, cuSPARSE, ...) live in nvidia/cu13
CU13_INC="$("$VENV/bin/python" -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))")"
export LTCL_EXT_EXTRA_INCLUDE="$CU13_INC${LTCL_EXT_EXTRA_INCLUDE:+:$LTCL_EXT_EXTRA_INCLUDE}"
export CPATH="$CU13_INC${CPATH:+:$CPATH}"
# a separate extensions cache: the CPU torch of the main environment keeps its own build
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"

echo "torch: $("$VENV/bin/python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST include=$CU13_INC"
cd "$REPO"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m ltcl_fused.ext build
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" - <<'PY'
import torch
from ltcl_fused import ext
info = ext.load()
assert info["with_cuda"], "the extension was built without its CUDA sources"
for op in ("rowstats_fwd", "rowstats_bwd", "topk_mining", "ssl_fwd", "ssl_bwd", "ssl_fwd_ranked", "ssl_bwd_ranked",
           "ssl_set_values"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ltcl_fused::{op}", key), (op, key)
# the CPU kernels of this build run without a GPU
from ltcl_fused.engine.contract import dense_forward
A = torch.randn(37, 17, dtype=torch.float64); lab = torch.randint(0, 3, (37,))
got = torch.ops.ltcl_fused.rowstats_fwd(A, A, lab, lab, None, None, 0, 2.0, 2.0, True)
ref = dense_forward(A, A, lab, lab, 0, 2.0, None, None, 2.0, True)
assert all(torch.allclose(g.to(r.dtype), r, rtol=1e-9, atol=1e-9) for g, r in zip(got, ref))
print("OK: extension", info["name"], "with CUDA kernels (sm_80, sm_90) imports against torch", torch.__version__,
      "; CUDA device present:", torch.cuda.is_available())
PY
