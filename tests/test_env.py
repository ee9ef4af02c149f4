"""python -m ltcl_fused.env: versions, compilers, CPU vector ISA, GPUs and every backend's status."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from ltcl_fused import backends, env

INTEL = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512vl avx512dq\n"
ZEN2 = "processor\t: 0\nflags\t\t: fpu sse4_2 avx fma avx2\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\nCPU implementer\t: 0x41\n"
OLD = "processor\t: 0\nflags\t\t: fpu sse2 sse4_2\n"


@pytest.mark.parametrize("text,machine,expected", [
    (INTEL, "x86_64", "AVX-512 (avx512f avx512bw avx512vl avx512dq)"),
    (ZEN2, "x86_64", "AVX2 + FMA"),
    (ARM, "aarch64", "NEON (asimd)"),
    (OLD, "x86_64", "SSE4.2"),
    ("", "aarch64", "NEON (aarch64)"),
    ("", "x86_64", "unknown (no /proc/cpuinfo flags)"),
])
def test_cpu_vector_isa_from_cpuinfo(text, machine, expected):
    assert env.cpu_vector_isa(text, machine) == expected


def test_vector_isa_agrees_with_torch_capability():
    cap = torch.backends.cpu.get_cpu_capability()
    isa = env.cpu_vector_isa()
    if cap.startswith("AVX512"):
        assert isa.startswith("AVX-512")
    elif cap == "AVX2":
        assert isa.startswith(("AVX2", "AVX-512"))


@pytest.fixture(scope="module")
def report():
    p = subprocess.run([sys.executable, "-m", "ltcl_fused.env", "--no-build"], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ))
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_report_lists_versions_and_tools(report):
    import ltcl_fused
    for needle in (f"Python                   {platform.python_version()}", torch.__version__, "Triton",
                   "nvcc", "g++", "ninja", "CPU vector ISA", "GPU", ltcl_fused.__version__):
        assert needle in report, needle
    try:
        import triton
        assert triton.__version__ in report
    except ImportError:
        assert "not importable" in report


def test_report_has_every_backend_with_the_dispatchers_reason(report):
    lines = report.splitlines()
    cpu_at = next(i for i, ln in enumerate(lines) if ln.startswith("  on CPU tensors"))
    cuda_at = next(i for i, ln in enumerate(lines) if ln.startswith("  on CUDA tensors"))
    for start, dev in ((cpu_at, torch.device("cpu")), (cuda_at, torch.device("cuda"))):
        block = {ln.split()[0]: ln.split(None, 1)[1] for ln in lines[start + 1:start + 6]}
        assert set(block) == set(env.BACKEND_ORDER)
        for name in ("triton", "torch"):
            reason = backends.get_engine(name).unavailable_reason(dev)
            assert block[name] == ("available" if reason is None else reason)
        assert block["reference"].startswith("available")
    cuda_reason = backends.get_engine("cuda").unavailable_reason(torch.device("cpu"))
    assert cuda_reason in report


def test_full_report_checks_the_cpp_extension(monkeypatch):
    from ltcl_fused import ext
    status = env.backend_status(build=True)
    reason = ext.unavailable_reason()
    assert status["cpu"]["CPU tensors"] == ("available" if reason is None else reason)


def test_a_failing_backend_shows_its_one_line_reason(monkeypatch):
    eng = backends.get_engine("torch")
    monkeypatch.setattr(type(eng), "unavailable_reason", lambda self, device: "broken on purpose: one line")
    info = env.collect(build=False)
    text = env.format_report(info)
    assert text.count("torch     broken on purpose: one line") == 2
    assert "picks: torch" not in text


def test_readme_asks_for_the_report():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        assert "python -m ltcl_fused.env" in f.read()
