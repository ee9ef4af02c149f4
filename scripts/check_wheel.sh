#!/usr/bin/env bash
# Packaging check (CI runs it after the tests): build the sdist, then the wheel FROM the sdist (so the sdist is
# known to be complete), install the wheel into a fresh virtualenv (no system site-packages) away from the
# checkout, and run the installed package there: a fused loss with backend="cpu" (the C++ extension is
# compiled on first use from the installed package data, into an empty extensions folder), an nn module,
# the version, py.typed and the environment report.
#
#   bash scripts/check_wheel.sh            # PYTHON=python3.11 to choose the interpreter
#
# torch==2.13.0 is installed from this machine's local wheel folder when it has one (LTCL_TORCH_WHEELS,
# default /opt/wheels), else from the package index; TORCH_SPEC overrides the requirement.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WHEELS=${LTCL_TORCH_WHEELS:-/opt/wheels}
WORK=$(mktemp -d /tmp/ltcl_wheel_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
t0=$(date +%s)
step() { echo "[check_wheel +$(( $(date +%s) - t0 ))s] $*"; }

step "build tools in $WORK/build-env"
"$PY" -m venv "$WORK/build-env"
"$WORK/build-env/bin/pip" install -q build "setuptools>=64" wheel

step "sdist, then the wheel from the sdist"
# a copy of the tracked and untracked-but-not-ignored files, so the build leaves nothing in the checkout
mkdir "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf -) \
  | tar -xf - -C "$WORK/src"
"$WORK/build-env/bin/python" -m build --no-isolation --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; echo "check_wheel: the build failed"; exit 1; }
SDIST=$(ls "$WORK"/dist/ltcl_fused-*.tar.gz)
WHEEL=$(ls "$WORK"/dist/ltcl_fused-*.whl)
echo "  $(basename "$SDIST") ($(du -k "$SDIST" | cut -f1) KiB), $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"

step "contents of the sdist and the wheel"
"$WORK/build-env/bin/python" - "$SDIST" "$WHEEL" <<'EOF'
import sys, tarfile, zipfile
sdist, wheel = sys.argv[1], sys.argv[2]
s = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
w = set(zipfile.ZipFile(wheel).namelist())
need_s = ["setup.py", "README.md", "CHANGELOG.md", "csrc/ops.cpp", "csrc/cpu/rowstats_cpu.cpp", "csrc/common/ltcl_math.h",
          "csrc/cuda/rowstats_cuda.cu", "triton_kernels/rowstats.py", "ltcl_fused/py.typed", "ltcl_fused/nn.py"]
need_w = ["ltcl_fused/__init__.py", "ltcl_fused/_version.py", "ltcl_fused/py.typed", "ltcl_fused/nn.py",
          "ltcl_fused/env.py", "ltcl_fused/integrations/pml.py", "ltcl_fused/csrc/ops.cpp",
          "ltcl_fused/csrc/cpu/ssl_cpu.cpp", "ltcl_fused/csrc/common/ltcl_math.h", "ltcl_fused/csrc/cuda/tile_common.cuh",
          "ltcl_fused/triton_kernels/__init__.py", "ltcl_fused/triton_kernels/rowstats.py"]
missing = [f"sdist:{n}" for n in need_s if n not in s] + [f"wheel:{n}" for n in need_w if n not in w]
stray = [n for n in w if n.startswith(("tests/", "benchmarks/", "examples/"))]
if missing or stray:
    sys.exit(f"check_wheel: missing {missing}, should not be in the wheel: {stray}")
print(f"  sdist: {len(s)} files, wheel: {len(w)} files; every required file present")
EOF

step "fresh virtualenv $WORK/venv (no system site-packages): $TORCH_SPEC"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
FIND=()
if ls "$WHEELS"/torch-*.whl >/dev/null 2>&1; then FIND=(--find-links "$WHEELS"); fi
"$VPY" -m pip install -q --no-compile "${FIND[@]}" "$TORCH_SPEC"
step "install the wheel (with the [ext] extra: ninja)"
"$VPY" -m pip install -q --no-compile "${FIND[@]}" "$WHEEL[ext]"

step "run the installed package away from the checkout (C++ extension compiled on first use)"
mkdir "$WORK/run"
cd "$WORK/run"
unset PYTHONPATH TRITON_INTERPRET VIRTUAL_ENV
export TORCH_EXTENSIONS_DIR="$WORK/ext" LTCL_CHECKOUT="$ROOT" LTCL_VENV="$WORK/venv"
"$VPY" - <<'EOF'
import importlib.metadata as md
import os
import sys

import torch
import ltcl_fused as lf
from ltcl_fused import ext

here = os.path.realpath(os.path.dirname(lf.__file__))
venv, checkout = os.path.realpath(os.environ["LTCL_VENV"]), os.path.realpath(os.environ["LTCL_CHECKOUT"])
assert here.startswith(venv) and not here.startswith(checkout), here
assert os.path.realpath(ext.csrc_dir()).startswith(here), ext.csrc_dir()
assert lf.__version__ == md.version("ltcl_fused"), (lf.__version__, md.version("ltcl_fused"))
assert os.path.isfile(os.path.join(here, "py.typed"))
print(f"  ltcl_fused {lf.__version__} from {here}, torch {torch.__version__}")

g = torch.Generator().manual_seed(0)
x = torch.nn.functional.normalize(torch.randn(64, 2, 16, generator=g, dtype=torch.float64), dim=-1)
y = torch.randint(0, 5, (64,), generator=g)
xs = [x.clone().requires_grad_() for _ in range(2)]
fused = lf.afcl(xs[0], y, gamma=2.0, eta=5.0, temperature=0.1, backend="cpu")
dense = lf.afcl(xs[1], y, gamma=2.0, eta=5.0, temperature=0.1, backend="reference")
fused.backward(), dense.backward()
fused, dense = fused.detach(), dense.detach()
assert abs(float(fused) - float(dense)) < 1e-10, (float(fused), float(dense))
assert float((xs[0].grad - xs[1].grad).abs().max()) < 1e-10
info = ext.load()
assert os.path.realpath(info["build_dir"]).startswith(os.path.realpath(os.environ["TORCH_EXTENSIONS_DIR"]))
print(f"  afcl(backend='cpu') = {float(fused):.12f} = reference; extension {info['name']} built in {info['build_dir']}")

module = lf.nn.SupConLoss(temperature=0.1, backend="cpu")
v = module(x, y)
assert torch.equal(v, lf.supcon(x, y, temperature=0.1, backend="cpu"))
assert abs(float(v) - float(lf.supcon(x, y, temperature=0.1, backend="reference"))) < 1e-10
print(f"  {module!r} = {float(v):.12f}")
assert callable(lf.distributed.supcon)
EOF
"$VPY" -m ltcl_fused.env | sed 's/^/  /'
step "OK: the wheel installs and runs from a fresh virtualenv"
