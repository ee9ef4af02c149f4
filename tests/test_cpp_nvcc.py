"""The CUDA kernels and launchers (csrc/cuda/rowstats_cuda.cu) compile with nvcc and the CUDA toolkit
alone (no torch headers) for sm_80 and sm_90."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU = os.path.join(ROOT, "csrc", "cuda", "rowstats_cuda.cu")


def _nvcc():
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "rowstats_cuda.o"
    cmd = [_nvcc(), "-std=c++17", "-O3", "-c", CU, "-o", str(out), "-Xptxas", "-v",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert out.stat().st_size > 0
    log = proc.stdout + proc.stderr
    archs = set(re.findall(r"Compiling entry function '\w+' for '(sm_\d+)'", log))
    assert archs == {"sm_80", "sm_90"}, log[-3000:]
    # forward, dA and dC kernels for float and double, per architecture
    assert len(re.findall(r"Compiling entry function", log)) == 12, log[-3000:]


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
def test_cuda_sources_need_no_torch_headers():
    for f in ("rowstats_cuda.cu", "rowstats_cuda.h"):
        text = open(os.path.join(ROOT, "csrc", "cuda", f)).read()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), f
