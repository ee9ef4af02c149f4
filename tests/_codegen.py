"""Shared pieces of the Triton code-generation tests (test_triton_codegen.py, test_triton_ssl_codegen.py,
test_triton_transcendentals.py): the compile subprocess and the checks of one compiled kernel."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _hang import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]

#: the start of a compile script: the kernels loaded for real code generation (not the interpreter)
SCRIPT_HEAD = r"""
import json, torch
from ltcl_fused.backends.triton_engine import _load_kernels
ops = _load_kernels()
assert not ops.interpreted()
"""


def load_triton_kernels():
    """Skips the calling test module where Triton is not installed; otherwise makes ltcl_fused.triton_kernels
    importable (from a source checkout too)."""
    pytest.importorskip("triton")
    from ltcl_fused.backends import get_engine
    get_engine("triton").unavailable_reason("cpu")


def run_compile_script(script, *argv, fp_fusion=False):
    """Runs ``script`` (with the arguments ``argv``) with this Python in a subprocess without TRITON_INTERPRET (real
    code generation for the GPU targets; the checkout first on PYTHONPATH) and returns the JSON it printed after
    ``@@JSON@@``. fp_fusion: set TRITON_DEFAULT_FP_FUSION=1 unless the environment sets it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if fp_fusion:
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    p = subprocess.run([sys.executable, "-c", script, *argv], cwd=str(ROOT), env=env, capture_output=True,
                       text=True, timeout=HANG_GUARD_S)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.split("@@JSON@@", 1)[1])


def by_job(results):
    """The compile reports keyed by job: (kernel, config, dtype, cc, variant)."""
    return {(r["kernel"], r["config"], r["dtype"], r["cc"], r["variant"]): r for r in results}


def check_compiled(res, job, table):
    """The compile report of ``job`` = (kernel, config, dtype, cc, variant) in ``res`` (``by_job``): no error,
    shared memory within the device limit, no register spills, tensor cores in the 16-bit kernels (mma.sync on
    sm_80, wgmma on sm_90), the transcendentals per tile element of ``table`` (the hand-written table of
    tests/test_triton_transcendentals.py, by (kernel, variant))."""
    k, cfg, dt, cc, var = job
    r = res[(k, cfg, dt, cc, var[0])]
    assert "error" not in r, r.get("error")
    assert r["shared"] <= r["shared_limit"], f"shared memory {r['shared']} B > {r['shared_limit']} B"
    assert r["stack"] == 0 and r["local"] == 0, f"register spills: STACK={r['stack']} LOCAL={r['local']} REG={r['reg']}"
    if dt in ("bf16", "fp16"):
        assert r["mma_sync"] if cc == 80 else r["wgmma"], "no tensor-core instructions in the PTX"
    assert r["tile_transcendental_ops"] == table[(k, var[0])]


def check_fake_trace(got):
    """The triton_ops traced under fake tensors (``got`` True), or the Triton 3.3 driver error (skip)."""
    if isinstance(got, str) and "active drivers" in got:
        from ltcl_fused.triton_kernels import support
        if support.triton_version()[:2] < (3, 4):
            pytest.skip(f"Triton {support.triton_version()}: torch's wrap_triton tracing needs a GPU driver ({got})")
    assert got is True
