"""The CUDA kernels and launchers (csrc/cuda/*.cu: row statistics, hard-pair mining, SSL row statistics)
compile with nvcc and the CUDA toolkit alone (no torch headers) for sm_80 and sm_90, without register
spills (ptxas -v)."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")

# source -> (kernels per architecture (float and double), whether ptxas must report no spills)
SOURCES = {
    "rowstats_cuda.cu": (8, True),   # forward, dA, dC, symmetric dX
    "mining_cuda.cu": (2, True),     # one mining kernel
    # forward for 1, 2 and 8 scales and Bayesian, dA and dC plain and Bayesian, symmetric dX, the rank pass
    # (keys, keys to values, float and double; segment offsets) and CUB's segmented radix sort (2 kernels per
    # key width + 1)
    "ssl_cuda.cu": (28, True),
}


def _nvcc():
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
@pytest.mark.parametrize("src", sorted(SOURCES))
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path, src):
    n_kernels, no_spills = SOURCES[src]
    out = tmp_path / (src + ".o")
    cmd = [_nvcc(), "-std=c++17", "-O3", "-c", os.path.join(CUDA_DIR, src), "-o", str(out), "-Xptxas", "-v",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert out.stat().st_size > 0
    log = proc.stdout + proc.stderr
    archs = re.findall(r"Compiling entry function '\w+' for '(sm_\d+)'", log)
    assert set(archs) == {"sm_80", "sm_90"}, log[-3000:]
    assert archs.count("sm_80") == n_kernels and archs.count("sm_90") == n_kernels, log[-3000:]
    if no_spills:
        frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert len(frames) == 2 * n_kernels, log[-3000:]
        assert all(f == ("0", "0", "0") for f in frames), log[-3000:]


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
def test_cuda_sources_need_no_torch_headers():
    files = [f for f in os.listdir(CUDA_DIR) if f.endswith((".cu", ".h", ".cuh"))]
    assert {"rowstats_cuda.cu", "mining_cuda.cu", "ssl_cuda.cu", "mining_cuda.h", "ssl_cuda.h"} <= set(files)
    for f in files:
        text = open(os.path.join(CUDA_DIR, f)).read()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), f


def test_extension_lists_the_cuda_sources():
    from ltcl_fused import ext
    names = {os.path.basename(s) for s in ext.sources(with_cuda=True)}
    assert {"rowstats_cuda.cu", "mining_cuda.cu", "ssl_cuda.cu", "binding_cuda.cpp"} <= names
    assert not any(s.endswith(".cu") for s in ext.sources(with_cuda=False))
