#!/usr/bin/env bash
# The C++ CPU kernels' other vector builds (make test-isa; part of make test). The extension compiles its
# at::vec code for the capability torch dispatches to (ltcl_fused/ext.py: AVX512, AVX2 or DEFAULT); a user on
# another CPU runs another build: AVX2 on most laptops and on AMD Zen 2/3, DEFAULT (no x86 vector flags) on
# aarch64 and others. ATEN_CPU_CAPABILITY makes torch report a lower capability, so every build below this
# machine's is compiled (into its own folder) and the C++ engine's tests run on it.
# Usage: scripts/test_cpu_isa.sh [python]   (ISAS="avx2 default" overrides the list)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$(bash scripts/env_python.sh)}
TESTS="tests/test_cpp_engine.py tests/test_cpp_ssl.py tests/test_dominant_column.py tests/test_symmetric_cpu.py
       tests/test_symmetric_cpu_fused.py tests/test_symmetric_cpu_ssl.py tests/test_symmetric_cpu_ssl_fused_fwd.py"
native=$("$PY" -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
case "$(uname -m)" in
  x86_64|amd64) ;;
  *) echo "[test-isa] $(uname -m): the extension builds DEFAULT only, which make test ran"; exit 0 ;;
esac
if [ -z "${ISAS:-}" ]; then
  case "$native" in
    AVX512*) ISAS="avx2 default" ;;
    AVX2) ISAS="default" ;;
    *) ISAS="" ;;
  esac
fi
[ -n "$ISAS" ] || { echo "[test-isa] native capability $native: no lower build to test"; exit 0; }
base=$(mktemp -d "${TMPDIR:-/tmp}/ltcl-isa.XXXXXX")
trap 'rm -rf "$base"' EXIT
for isa in $ISAS; do
  start=$(date +%s)
  got=$(ATEN_CPU_CAPABILITY=$isa "$PY" -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
  echo "[test-isa] native $native; build $got (ATEN_CPU_CAPABILITY=$isa)"
  if [ "$got" = "$native" ]; then echo "[test-isa] the same build as make test ran (ATEN_CPU_CAPABILITY=$isa not lower or not taken): skipped"; continue; fi
  # shellcheck disable=SC2086
  ATEN_CPU_CAPABILITY=$isa TORCH_EXTENSIONS_DIR="$base/$isa" "$PY" -m pytest $TESTS -q -n 2 -p no:cacheprovider \
    -k "not triton"
  echo "[test-isa] $got: $(( $(date +%s) - start )) s"
done
